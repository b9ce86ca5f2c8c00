#!/usr/bin/env bash
# Debian packages the tests and the trainer use: bubblewrap isolates model-written code in the
# code-reward sandbox. Needs root (CI and these machines run as root); a no-op when present.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: bubblewrap (bwrap) is missing; install it with: sudo apt-get install -y bubblewrap" >&2
  exit 1
fi
apt-get update -qq
apt-get install -y -qq bubblewrap >/dev/null
echo "install_system_deps: installed bubblewrap $(bwrap --version)"
