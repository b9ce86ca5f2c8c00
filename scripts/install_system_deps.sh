#!/usr/bin/env bash
# Debian packages the tests and the trainer use, each optional for a user without root:
#   bubblewrap                    isolates model-written code in the code-reward sandbox; without it
#                                 code rewards run in the rlimits fallback (a warning at start) and
#                                 tests/test_sandbox.py is skipped for non-root users;
#   slurmctld slurmd slurm-client munge
#                                 the one-node Slurm cluster tests/test_slurm.py submits real jobs
#                                 to; without them (or without root) those tests are skipped.
# As root it installs what is missing (CI and these machines run as root). Without root it says
# what is missing, what that skips, and the command to install it, then goes on: the CPU demo
# needs none of them. OR1_REQUIRE_SYSTEM_DEPS=1 makes a missing package an error instead.
set -euo pipefail
# command -> Debian package that provides it
declare -A PROVIDERS=(
  [bwrap]=bubblewrap
  [slurmctld]=slurmctld
  [slurmd]=slurmd
  [sbatch]=slurm-client
  [munged]=munge
)
missing=()
for cmd in "${!PROVIDERS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PROVIDERS[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: not root, so not installing: ${missing[*]}" >&2
  case " ${missing[*]} " in
    *" bubblewrap "*) echo "  - without bubblewrap: code rewards run in the rlimits fallback (no filesystem or network isolation) and the sandbox tests are skipped" >&2 ;;
  esac
  case " ${missing[*]} " in
    *" slurm"*|*" munge "*) echo "  - without Slurm: the Slurm cluster tests are skipped (they also need root to start slurmd)" >&2 ;;
  esac
  echo "  to install them: sudo apt-get install -y ${missing[*]}" >&2
  if [ "${OR1_REQUIRE_SYSTEM_DEPS:-0}" = "1" ]; then
    exit 1
  fi
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install_system_deps: installed ${missing[*]}"
