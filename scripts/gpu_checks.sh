#!/usr/bin/env bash
# The GPU checks in one prepared run (at most ~8 minutes on one H200), for a machine with one or
# more CUDA GPUs and torch + Triton preinstalled. Nothing is fetched from a network: what the
# machine lacks (megatron-core, omegaconf, math-verify, Ray, ...) travels in .gpu-carry/, made on
# a CPU machine by `bash ../shared/gpu/pack.sh .gpu-carry` and named in the device tool's carry.
#
#   OUT=/some/dir bash scripts/gpu_checks.sh          # from the repository root, on the GPU machine
#   DRY_RUN=1 bash scripts/gpu_checks.sh              # anywhere: print and check every step
#   BUDGET_S=480 ...                                  # skip the steps that would start after this
#
# Steps, most valuable first (each keeps its output in $OUT/<step>.txt, whose last line is
# machine-readable: RESULT step=<name> status=ok|failed|skipped|dry_run seconds=<s>). A step that
# would start after BUDGET_S seconds (default 480) is skipped, so one run fits the device tool's
# 10-minute command limit and leaves device time for a re-run.
#   kernel_tests     the Triton log-prob/entropy and loss kernels against the torch oracle
#   profile_kernels  fused vs naive vs Liger vs Cut Cross-Entropy at the 7B shape (time, memory,
#                    error, roofline fraction); profile_kernels_32b: the 32B TP8 local shape
#   bench_*          tools/bench_policy.py: tokens/s, MFU and peak memory beside the planner's
#                    prediction, 8 x 4096 tokens at the 1.5B shape (recompute none, selective,
#                    full) and the 0.5B shape (none, full)
#   or1_check        `or1 check` on one GPU at bf16 (policy vs transformers, train step)
#   policy_tests     the policy on GPUs over NCCL (local spec fp32/bf16, TE where installed)
#                    and the NCCL weight-update group
#   convert          the converter's HF -> Megatron -> HF round trip on a GPU machine
#                    (its ranks compute on the CPU over gloo)
#   bench_sync       colocated weight sync over CUDA IPC into a GPU engine vs a device copy
#   demo_gpu         `or1 train --config configs/demo_gpu.yaml --max-steps 3`, sync verified
# The exit status is 1 if any step failed.
set -uo pipefail
OUT=${OUT:-/tmp/or1_gpu_checks}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 0 ] && [ -d .gpu-carry/whl ]; then  # ../shared/gpu/unpack.sh's three lines
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu-carry/whl/*.whl
  [ -f .gpu-carry/ray-slim.tar.xz ] && tar -C /tmp/site -xJf .gpu-carry/ray-slim.tar.xz
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
BEGIN=$(date +%s)
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run it, keep its output, end with a RESULT line
  local name=$1 limit=$2; shift 2
  local file="$OUT/$name.txt" start rc
  echo "== $name: $*" | tee "$file"
  start=$(date +%s)
  if [ "$DRY_RUN" != 0 ]; then
    echo "RESULT step=$name status=dry_run seconds=0" | tee -a "$file"
    return
  fi
  if [ $(( start - BEGIN )) -ge "$BUDGET_S" ]; then
    echo "RESULT step=$name status=skipped seconds=0 (past BUDGET_S=$BUDGET_S)" | tee -a "$file"
    return
  fi
  # never run past the budget by more than this step's own limit
  limit=$(( limit < BUDGET_S - (start - BEGIN) + 60 ? limit : BUDGET_S - (start - BEGIN) + 60 ))
  timeout "$limit" "$@" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  local verdict=ok
  [ "$rc" -eq 0 ] || { verdict=failed; status=1; }
  echo "RESULT step=$name status=$verdict seconds=$(( $(date +%s) - start )) rc=$rc" | tee -a "$file"
}
have() { "$PY" -c "import $1" 2> /dev/null; }

if [ "$DRY_RUN" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
else
  # What a dry run can check here: every step's files exist and parse, the GPU demo config
  # validates, the GPU tests are collected.
  "$PY" -m py_compile tools/profile_kernels.py tools/kernel_anchors.py tools/bench_policy.py \
    tools/bench_weight_sync.py || status=1
  "$PY" -m or1_megatron.cli config --config configs/demo_gpu.yaml > "$OUT/demo_gpu_config.txt" || status=1
  "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_policy_gpu.py \
    tests/test_rollout_weight_group.py tests/test_kernels_triton.py > "$OUT/collect.txt" || status=1
  tail -n 1 "$OUT/collect.txt"
fi

step kernel_tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_logprob.py \
  tests/test_kernels_policy_loss.py tests/test_kernels_triton.py
step profile_kernels 120 "$PY" tools/profile_kernels.py --tokens 8192 --hidden 3584 --vocab 152064 \
  --dtype bfloat16 --device cuda --compare liger,cce
step profile_kernels_32b 90 "$PY" tools/profile_kernels.py --tokens 16384 --hidden 5120 --vocab 19008 \
  --dtype bfloat16 --device cuda --compare liger,cce
if [ "$DRY_RUN" != 0 ] || have megatron.core; then
  bench() {  # bench NAME MODEL RECOMPUTE: 8 x 4096 tokens, one sequence per micro-batch
    step "bench_$1" 120 "$PY" tools/bench_policy.py --model "$2" --micro-batch-tokens 4096 \
      --micro-batches 8 --recompute "$3" --device cuda --steps 3
  }
  bench 1p5b_none qwen2.5-1.5b none
  bench 0p5b_none qwen2.5-0.5b none
  bench 1p5b_selective qwen2.5-1.5b selective
  bench 1p5b_full qwen2.5-1.5b full
  bench 0p5b_full qwen2.5-0.5b full
  step or1_check 150 "$PY" -m or1_megatron.cli check --tp 1 --device cuda --dtype bf16
  step policy_tests 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_policy_gpu.py \
    tests/test_rollout_weight_group.py
  step convert 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_convert_checkpoint.py -k "round_trip"
  step bench_sync 150 "$PY" tools/bench_weight_sync.py --model-size 1G --device cuda \
    --transport colocated --repeats 3
else
  echo "RESULT step=megatron status=skipped seconds=0 (megatron-core missing: carry .gpu-carry/)" \
    | tee "$OUT/megatron.txt"
  status=1
fi
if [ "$DRY_RUN" != 0 ] || { have ray && have omegaconf && have math_verify; }; then
  step demo_gpu 240 "$PY" -m or1_megatron.cli train --config configs/demo_gpu.yaml \
    --run-dir "$OUT/demo_gpu" --max-steps 3
else
  echo "RESULT step=demo_gpu status=skipped seconds=0 (ray/omegaconf/math-verify missing)" \
    | tee "$OUT/demo_gpu.txt"
  status=1
fi
exit $status
