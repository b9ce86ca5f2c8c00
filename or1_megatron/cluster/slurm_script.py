"""The sbatch script that runs `or1 train` on a Ray cluster spanning a Slurm job's nodes.

Owns the script's text only (submission lives in `cluster.submit`). The job:
  - starts a Ray head on its first node and Ray workers on the others (srun steps running
    `cluster.ray_node`), with a per-job token for Ray's token authentication;
  - waits, bounded by join_timeout_s, until every node has joined;
  - runs `or1 train ... ray.address=<head>` on the first node, per-node logs in <run_dir>/slurm;
  - ends non-zero within seconds when the driver fails or any Ray node's step dies, stopping
    everything it started (no hang on a half-dead cluster);
  - gets SIGTERM signal_lead_s before its time limit (`--signal=B:TERM@lead`), lets the driver
    checkpoint and requeues itself, so the next run resumes (`--resume auto`). Preemption with
    PreemptMode=REQUEUE sends the same SIGTERM and Slurm requeues the job itself; a user's
    scancel also lets the driver checkpoint, but does not requeue.
Every value from the user is shell-quoted; paths in #SBATCH lines are double-quoted.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path


def time_limit_seconds(text: str) -> int | None:
    """Seconds of a Slurm --time value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None if unlimited."""
    if text.strip().lower() in ("", "infinite", "unlimited"):
        return None
    days, _, rest = text.strip().rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        day_s = int(days) * 86400 if days else 0
    except ValueError:
        raise ValueError(f"--time {text!r} is not a Slurm time limit") from None
    if any(p < 0 for p in parts) or len(parts) > 3:
        raise ValueError(f"--time {text!r} is not a Slurm time limit")
    if days:  # D-H, D-H:M, D-H:M:S
        units = (3600, 60, 1)
    else:     # M, M:S, H:M:S
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    return day_s + sum(p * u for p, u in zip(parts, units))


# A job must leave this much time after the pre-limit signal, or it would requeue before
# training makes any progress, again and again.
MIN_USEFUL_S = 300


@dataclass(frozen=True)
class SlurmJob:
    config: Path                 # absolute path of the run config
    run_dir: Path                # absolute; logs go to <run_dir>/slurm
    workdir: Path                # the job's working directory (relative paths in overrides)
    bin_dir: Path                # the environment whose `or1`, `python` and `ray` run
    nodes: int
    gpus_per_node: int
    job_name: str = "or1"
    partition: str = ""
    time: str = ""
    max_steps: int | None = None
    overrides: tuple[str, ...] = ()
    ray_cpus_per_node: int = 0   # 0: the CPUs Slurm gives the node
    signal_lead_s: int = 120     # SIGTERM this long before the time limit
    join_timeout_s: int = 300    # bound on the Ray head starting and on all nodes joining
    sbatch_args: tuple[str, ...] = field(default=())  # extra #SBATCH options (--account=...)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"need nodes >= 1 and gpus_per_node >= 0, got {self.nodes}, {self.gpus_per_node}")
        if self.signal_lead_s < 60:
            raise ValueError(f"signal_lead_s={self.signal_lead_s}: the driver needs at least 60 s to "
                             "checkpoint and the job to requeue")
        limit = time_limit_seconds(self.time)
        if limit is not None and limit < self.signal_lead_s + MIN_USEFUL_S:
            raise ValueError(f"--time {self.time}: the job gets SIGTERM {self.signal_lead_s} s before its "
                             f"limit; give it at least {self.signal_lead_s + MIN_USEFUL_S} s")
        for path in (self.run_dir, self.workdir):
            if '"' in str(path) or "\n" in str(path):
                raise ValueError(f"{path}: a path in an #SBATCH line cannot contain '\"' or a newline")

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def stop_grace_s(self) -> int:
        """What the driver gets to checkpoint: the lead less 30 s to stop Ray and requeue."""
        return self.signal_lead_s - 30

    def train_args(self) -> list[str]:
        """`or1` arguments of the driver, before the ray.address the script appends."""
        args = ["train", "--config", str(self.config), "--run-dir", str(self.run_dir), "--resume", "auto"]
        if self.max_steps is not None:
            args += ["--max-steps", str(self.max_steps)]
        return args + list(self.overrides)


def _sbatch_lines(job: SlurmJob) -> list[str]:
    lines = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        # whole nodes: Ray schedules the node's CPUs and GPUs itself
        "--exclusive",
    ]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.partition:
        lines.append(f"--partition={job.partition}")
    if job.time:
        lines.append(f"--time={job.time}")
    lines += [
        f'--chdir="{job.workdir}"',
        f'--output="{job.log_dir}/job-%j.out"',
        # a requeued job appends to the same log
        "--open-mode=append",
        f"--signal=B:TERM@{job.signal_lead_s}",
        "--requeue",
        *job.sbatch_args,
    ]
    return [f"#SBATCH {line}" for line in lines]


# The job's logic; reads only the variables the header defines.
BODY = r'''
log() { echo "[$(date '+%F %T')] or1-slurm: $*"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# stop_pid PID GRACE: SIGTERM, SIGKILL after GRACE seconds, reap; returns the exit status.
stop_pid() {
  local pid=${1:-} grace=$2 waited=0
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null
  while alive "$pid" && (( waited < grace )); do sleep 1; waited=$((waited + 1)); done
  alive "$pid" && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

# The last lines of each Ray node's log, prefixed with the node's name (ray-<role>-<node>-<job>.log).
node_logs() {
  local f node
  for f in "$LOG_DIR"/ray-*-"$SLURM_JOB_ID".log; do
    [ -f "$f" ] || continue
    node=${f##*/ray-}; node=${node%-"$SLURM_JOB_ID".log}
    tail -n 3 "$f" | sed "s/^/  $node| /"
  done
}

HEAD_PID= WORKERS_PID= DRIVER_PID=
nodes_alive() { alive "$HEAD_PID" && { [ -z "$WORKERS_PID" ] || alive "$WORKERS_PID"; }; }

# finish STATUS: stop what this job started (driver first: it holds the Ray connection), exit.
finish() {
  trap '' TERM INT
  stop_pid "$DRIVER_PID" 30
  # srun ends the steps by killing their tasks: it reports them as "Killed"
  [ -n "$HEAD_PID" ] && log "stopping the Ray nodes"
  stop_pid "$WORKERS_PID" 20
  stop_pid "$HEAD_PID" 20
  # a failed run keeps the head's Ray logs in $RAY_TMP on the first node for debugging
  (( $1 == 0 )) && [ -n "${RAY_TMP:-}" ] && rm -rf "$RAY_TMP"
  log "exit $1"
  exit "$1"
}

# True when the job's end is within the signal lead (+ a minute): the SIGTERM came from the
# time limit, not from scancel, so the run should go on in a requeued job.
near_time_limit() {
  local end
  end=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'EndTime=[^ ]*' | head -n 1 | cut -d= -f2)
  [[ "$end" =~ ^[0-9]{4}- ]] || return 1
  (( $(date -d "$end" +%s) - $(date +%s) <= SIGNAL_LEAD + 60 ))
}

on_term() {
  trap '' TERM INT
  local had_driver=${DRIVER_PID:+1}
  log "SIGTERM: the driver gets ${STOP_GRACE}s to checkpoint"
  stop_pid "$DRIVER_PID" "$STOP_GRACE"
  log "driver stopped with status $?"
  DRIVER_PID=
  # requeue only a run that was training: one stopped while Ray started has nothing to resume
  if [ -n "$had_driver" ] && near_time_limit; then
    log "time limit ahead: requeueing; the next run resumes from the last checkpoint"
    stop_pid "$WORKERS_PID" 20; WORKERS_PID=
    stop_pid "$HEAD_PID" 20; HEAD_PID=
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    log "scontrol requeue failed"
  fi
  finish 143
}

mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
# Token authentication with a secret per job, read by every Ray process and the driver.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$LOG_DIR/ray-token-$SLURM_JOB_ID"
(umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH") \
  || { log "cannot write $RAY_AUTH_TOKEN_PATH"; exit 1; }
trap on_term TERM INT

HEAD_NODE=$SLURMD_NODENAME   # the batch script runs on the allocation's first node
NUM_NODES=$SLURM_JOB_NUM_NODES
# node-local, fresh for every run: Ray's sockets, logs and the head's address file (job ids
# restart at 1 on a reinstalled cluster, and a stale address would send the job to a dead head)
RAY_TMP=$(mktemp -d "/tmp/ray-or1-$SLURM_JOB_ID-XXXXXX") || { log "cannot create a directory in /tmp"; exit 1; }
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NUM_NODES node(s): $SLURM_JOB_NODELIST"

SRUN=(srun --overlap --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --mem=0 --kill-on-bad-exit=1)
(( GPUS_PER_NODE > 0 )) && SRUN+=(--gpus-per-node="$GPUS_PER_NODE")
RESOURCES=(--num-cpus "$RAY_CPUS" --num-gpus "$GPUS_PER_NODE")

"${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --output="$LOG_DIR/ray-head-%N-%j.log" \
  "$BIN/python" -m or1_megatron.cluster.ray_node head --temp-dir "$RAY_TMP" "${RESOURCES[@]}" &
HEAD_PID=$!
ADDRESS=$(timeout $((JOIN_TIMEOUT + 30)) "$BIN/python" -m or1_megatron.cluster.ray_node address \
  --temp-dir "$RAY_TMP" --timeout "$JOIN_TIMEOUT") \
  || { log "the Ray head did not start within ${JOIN_TIMEOUT}s (see $LOG_DIR/ray-head-*.log)"; finish 1; }
log "Ray head at $ADDRESS"

if (( NUM_NODES > 1 )); then
  "${SRUN[@]}" --nodes=$((NUM_NODES - 1)) --ntasks=$((NUM_NODES - 1)) --exclude="$HEAD_NODE" \
    --output="$LOG_DIR/ray-worker-%N-%j.log" \
    "$BIN/python" -m or1_megatron.cluster.ray_node worker --address "$ADDRESS" \
    --timeout "$JOIN_TIMEOUT" "${RESOURCES[@]}" &
  WORKERS_PID=$!
fi

timeout $((JOIN_TIMEOUT + 60)) "$BIN/python" -m or1_megatron.cluster.ray_node wait --address "$ADDRESS" \
  --nodes "$NUM_NODES" --timeout "$JOIN_TIMEOUT" &
WAIT_PID=$!
while alive "$WAIT_PID"; do
  if ! nodes_alive; then
    kill "$WAIT_PID" 2>/dev/null
    JOINED=$(timeout 60 "$BIN/python" -m or1_megatron.cluster.ray_node joined --address "$ADDRESS" \
      --timeout 30 2>/dev/null) || JOINED="unknown: the head did not answer"
    log "a Ray node step exited before all $NUM_NODES node(s) joined (joined: $JOINED):"
    node_logs
    finish 1
  fi
  sleep 1
done
wait "$WAIT_PID" || { log "the Ray cluster did not reach $NUM_NODES node(s) within ${JOIN_TIMEOUT}s:"; node_logs; finish 1; }

DRIVER_LOG="$LOG_DIR/driver-$SLURM_JOB_ID.log"
log "all $NUM_NODES node(s) joined; driver: or1 ${TRAIN_ARGS[*]} (log: $DRIVER_LOG)"
"$BIN/or1" "${TRAIN_ARGS[@]}" "ray.address=$ADDRESS" >> "$DRIVER_LOG" 2>&1 &
DRIVER_PID=$!
while alive "$DRIVER_PID"; do
  if ! nodes_alive; then
    log "a Ray node failed during training (see $LOG_DIR/ray-*.log): stopping the driver"
    finish 1
  fi
  sleep 2
done
wait "$DRIVER_PID"
STATUS=$?
DRIVER_PID=
log "driver exited with status $STATUS"
if (( STATUS != 0 )); then
  tail -n 20 "$DRIVER_LOG" | sed 's/^/  driver| /'
fi
finish "$STATUS"
'''


def render_sbatch(job: SlurmJob) -> str:
    """The complete sbatch script for `job`."""
    q = shlex.quote
    header = [
        "#!/bin/bash",
        "# or1 train on a Ray cluster spanning this job's nodes; written by tools/submit_slurm.py.",
        *_sbatch_lines(job),
        "set -uo pipefail",
        "",
        f"BIN={q(str(job.bin_dir))}   # or1, python and ray of the submitting environment",
        f"RUN_DIR={q(str(job.run_dir))}",
        'LOG_DIR="$RUN_DIR/slurm"',
        f"GPUS_PER_NODE={job.gpus_per_node}",
        f"RAY_CPUS={job.ray_cpus_per_node}   # 0: the CPUs Slurm gives each node",
        f"JOIN_TIMEOUT={job.join_timeout_s}   # seconds for the Ray head to start and all nodes to join",
        f"SIGNAL_LEAD={job.signal_lead_s}",
        f"STOP_GRACE={job.stop_grace_s}   # seconds the driver gets to checkpoint after SIGTERM",
        "TRAIN_ARGS=(" + " ".join(q(arg) for arg in job.train_args()) + ")",
    ]
    return "\n".join(header) + "\n" + BODY
