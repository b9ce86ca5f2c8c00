#!/usr/bin/env bash
# The GPU checks in one run, for a machine with one CUDA GPU and torch + Triton preinstalled
# (the project's borrowed H200: about 5 of its 15 minutes). Nothing is fetched from a network:
# packages the machine lacks (megatron-core for the policy tests) travel as wheels in .whl/.
#
#   OUT=/some/dir bash scripts/gpu_checks.sh      # from the repository root
#
# 1. the Triton log-prob/entropy and loss kernels against the torch oracle (tests marked gpu);
# 2. the kernel profile at a 7B-like shape (fused vs naive memory and time, side by side);
# 3. with megatron-core importable: the policy's GPU tests (TE layer spec where installed) and
#    the NCCL weight-update group (skips on one GPU).
# Each step's output goes to $OUT/<step>.txt; the exit status is 1 if any step failed.
set -uo pipefail
OUT=${OUT:-/tmp/or1_gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
step() {  # step NAME COMMAND...: run it, keep its output, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt" || status=1
}
step gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step versions python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
step kernel_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_logprob.py \
  tests/test_kernels_policy_loss.py tests/test_kernels_triton.py
step profile_kernels python3 tools/profile_kernels.py --tokens 8192 --hidden 4096 --vocab 152064 \
  --dtype bfloat16 --device cuda
if python3 -c "import megatron.core" 2> /dev/null; then
  step policy_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_policy_gpu.py \
    tests/test_rollout_weight_group.py
else
  echo "megatron-core is not installed: carry its wheel in .whl/ for the policy's GPU tests" \
    | tee "$OUT/policy_tests.txt"
fi
exit $status
