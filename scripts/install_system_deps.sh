#!/usr/bin/env bash
# Debian packages the tests and the trainer use: bubblewrap isolates model-written code in the
# code-reward sandbox; slurmctld, slurmd, slurm-client and munge run the one-node Slurm cluster
# that tests/test_slurm.py submits real jobs to. Needs root (CI and these machines run as root);
# a no-op when everything is present.
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
  echo "install_system_deps: missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install_system_deps: installed ${missing[*]}"
