"""The OR1 training loop of DESIGN section 3, one method per phase.

    prompts -> engines (group_size samples each) -> rewards -> GRPO advantages
      -> rejection sampling (drop all-equal groups) -> old log-probs (fused kernel)
      -> N_SGD mini-batch updates (token-mean PPO clip + adaptive entropy bonus)
      -> weight sync (verified) -> metrics, evaluation, checkpoint

The `Trainer` owns the driver-side state that a checkpoint must carry (`TrainerState`) and the
order of the phases; the pieces it drives are built by `controller.run` and passed in: the policy
ranks (`call(fn, *args)`), the sampling session (router, tokenizer, reward pool), the weight-sync
coordinator and the metrics writer. It never touches a tensor of the policy itself.
"""
from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from or1_megatron.algo import AdaptiveEntropyController, filter_uniform_groups, group_advantages
from or1_megatron.algo.importance import MismatchStats, aligned_engine_logprobs, importance_weights
from or1_megatron.config.schema import OR1Config
from or1_megatron.config.stages import Stage, resolve_stages, stage_at, total_steps
from or1_megatron.controller import ranks
from or1_megatron.controller.batch import TrainBatch, TrainSample, mini_batches
from or1_megatron.controller.checkpoints import CheckpointDirs
from or1_megatron.controller.hf_exports import HfExports
from or1_megatron.controller.metrics import MetricsWriter
from or1_megatron.controller.rollout import RolloutBatch, collect_rollouts, load_rollout, save_rollout
from or1_megatron.controller.sampler import PromptSampler
from or1_megatron.data.filters import SolveTracker, online_filter
from or1_megatron.data.records import ProblemRecord
from or1_megatron.eval.sampling import SamplingSession, SamplingSettings, prompt_token_ids

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """The driver's part of a checkpoint (the policy ranks save theirs beside it)."""

    step: int = 0                 # rollout steps done
    stage: int = 0
    warmup_done: bool = False
    sampler: dict = field(default_factory=dict)
    entropy_control: dict = field(default_factory=dict)
    solve_tracker: dict = field(default_factory=dict)
    filtered_uids: list = field(default_factory=list)  # dropped by online filters so far
    # algo.mode=one_step_off: the batch generated during the last step for the next one (a file
    # under <run_dir>/pending/, relative), checkpointed rather than regenerated: the weights
    # that generated it are a step older than any checkpoint's.
    pending_rollout: str = ""


class StopFlag:
    """Set by SIGTERM: the loop finishes its step, checkpoints and returns."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Catch SIGTERM from now on (call it after ray.init, which installs its own handler)."""
        def on_sigterm(signum: int, frame: Any) -> None:
            log.warning("SIGTERM: finishing this step, then checkpointing")
            self.requested = True

        signal.signal(signal.SIGTERM, on_sigterm)


class Trainer:
    def __init__(self, config: OR1Config, *, ranks_group: Any, session: SamplingSession,
                 coordinator: Any, metrics: MetricsWriter, checkpoints: CheckpointDirs,
                 train_records: Sequence[ProblemRecord], heldout_records: Sequence[ProblemRecord],
                 reference_response: Callable[[ProblemRecord], str] | None = None,
                 stop: StopFlag | None = None, hf_exports: HfExports | None = None):
        self.config = config
        self.hf_exports = hf_exports
        self.ranks = ranks_group
        self.session = session
        self.coordinator = coordinator
        self.metrics = metrics
        self.checkpoints = checkpoints
        self.all_records = list(train_records)
        self.heldout = list(heldout_records)
        self.reference_response = reference_response
        self.stop = stop or StopFlag()
        self.stages = resolve_stages(config)
        self.total_steps = total_steps(config)
        self.sampler = PromptSampler(self.all_records, config.run.seed)
        e = config.algo.entropy
        self.entropy_control = AdaptiveEntropyController(
            target=e.target, delta=e.delta, coef_min=e.coef_min, coef_max=e.coef_max, coef=e.coef_init)
        self.solve_tracker = SolveTracker()
        self.state = TrainerState()
        self.run_dir = checkpoints.root.parent
        self.pending: RolloutBatch | None = None  # one_step_off: the next step's batch

    # ------------------------------------------------------------ state

    def restore(self, saved: dict) -> None:
        self.state = TrainerState(**saved)
        if self.state.filtered_uids:
            dropped = set(self.state.filtered_uids)
            self.sampler.replace_records([r for r in self.all_records if r.uid not in dropped])
        self.sampler.load_state_dict(self.state.sampler)
        self.entropy_control.load_state_dict(self.state.entropy_control)
        self.solve_tracker.load_state_dict(self.state.solve_tracker)
        if self.state.pending_rollout:
            self.pending = load_rollout(self.run_dir / self.state.pending_rollout,
                                        {r.uid: r for r in self.all_records})

    def save(self) -> None:
        self.state.sampler = self.sampler.state_dict()
        self.state.entropy_control = self.entropy_control.state_dict()
        self.state.solve_tracker = self.solve_tracker.state_dict()
        self.state.pending_rollout = ""
        if self.pending is not None:
            name = f"pending/batch_{self.state.step + 1:07d}.json"
            save_rollout(self.pending, self.run_dir / name)
            self.state.pending_rollout = name
        path = self.checkpoints.for_step(self.state.step)
        start = time.perf_counter()
        self.ranks.call(ranks.save_checkpoint, str(path), {"trainer": asdict(self.state)})
        self.checkpoints.prune(self.config.checkpoint.keep)
        kept = {f"batch_{step + 1:07d}.json" for step, _ in self.checkpoints.complete()}
        for stale in (self.run_dir / "pending").glob("batch_*.json"):
            if stale.name not in kept:
                stale.unlink()
        log.info("checkpoint %s saved in %.1f s", path, time.perf_counter() - start)
        final = self.state.step == self.total_steps
        if self.hf_exports is not None and (self._due(self.config.checkpoint.hf_every) or final):
            self.hf_exports.export(self.ranks, self.state.step)

    # ------------------------------------------------------------ the run

    async def run(self) -> None:
        if not self.state.warmup_done:
            await self.warm_up()
        else:
            await self.sync_weights()  # fresh engines take the resumed weights
        while self.state.step < self.total_steps and not self.stop.requested:
            stage = stage_at(self.stages, self.state.step)
            if stage.index != self.state.stage:
                self.enter_stage(stage)
            metrics = await self.train_step(stage)
            self.state.step += 1
            if self._due(self.config.data.eval_every) or self.state.step == self.total_steps:
                metrics.update(await self.evaluate())
            self.metrics.write(self.state.step, metrics, self.total_steps)
            if self._due(self.config.checkpoint.every_steps) or self.state.step == self.total_steps:
                self.save()
        if self.stop.requested and self.state.step < self.total_steps:
            log.warning("stop requested: checkpointing at step %d", self.state.step)
            self.save()

    def _due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def enter_stage(self, stage: Stage) -> None:
        """The online filter: drop prompts solved in every sample during the previous stage."""
        log.info("entering %s at step %d (max response %d tokens, %d/%d/%d)", stage.key,
                 self.state.step, stage.max_response_length, stage.rollout_prompts,
                 stage.mini_batch_prompts, stage.group_size)
        if self.config.algo.online_filter:
            result = online_filter(self.sampler.records, self.solve_tracker)
            kept = {r.uid for r in result.kept}
            self.state.filtered_uids += [r.uid for r in self.sampler.records if r.uid not in kept]
            self.sampler.replace_records(result.kept)
        self.solve_tracker = SolveTracker()
        self.state.stage = stage.index

    async def warm_up(self) -> None:
        """Supervised warm-up (the demo), the first sync, the step-0 evaluation, checkpoint 0."""
        w = self.config.warmup
        if w.sft_steps:
            self.ranks.call(ranks.restart_lr_schedule, w.sft_lr, 0)
            rng = random.Random(f"{self.config.run.seed}:warmup")
            start = time.perf_counter()
            for step in range(1, w.sft_steps + 1):
                batch = rng.sample(self.all_records, min(w.sft_batch, len(self.all_records)))
                out = self.ranks.call(ranks.train_supervised, *self._supervised(batch))[0]
                if step % 10 == 0 or step == w.sft_steps:
                    log.info("warm-up step %d/%d: nll %.4f (%.0f s)", step, w.sft_steps,
                             out["nll_sum"] / out["tokens"], time.perf_counter() - start)
            self.ranks.call(ranks.restart_lr_schedule, self.config.optim.lr,
                            self.config.optim.warmup_steps)
        sync_s = await self.sync_weights()
        metrics: dict[str, Any] = {"stage": 0, "time/sync_s": sync_s}
        if self.config.data.eval_every:
            metrics.update(await self.evaluate())
        self.metrics.write(0, metrics, self.total_steps)
        self.state.warmup_done = True
        self.save()

    def _supervised(self, records: Sequence[ProblemRecord]) -> tuple[list[list[int]], list[int]]:
        tokenizer = self.session.tokenizer
        sequences, prompt_lengths = [], []
        for record in records:
            prompt = prompt_token_ids(tokenizer, record)
            response = tokenizer(self.reference_response(record), add_special_tokens=False)["input_ids"]
            sequences.append(prompt + response + [tokenizer.eos_token_id])
            prompt_lengths.append(len(prompt))
        return sequences, prompt_lengths

    # ------------------------------------------------------------ one step

    async def generate(self, batch_number: int, stage: Stage) -> RolloutBatch:
        """Rollout batch `batch_number` (1-based): its prompts, seeds and settings depend on the
        number alone, so both modes and a resumed run sample the same batch."""
        r, a = self.config.rollout, self.config.algo
        return await collect_rollouts(
            self.session, self.sampler.next_batch(stage.rollout_prompts), stage.group_size,
            stage.max_response_length, r.temperature, r.top_p,
            seed=self.config.run.seed * 1_000_003 + batch_number - 1,
            return_logprob=a.is_correction != "none" or a.mode == "one_step_off")

    def _prefetches(self, stage: Stage) -> bool:
        """one_step_off: generate the next batch during this step (not across a stage boundary:
        the next stage's online filter must see this stage's rewards first)."""
        following = self.state.step + 1
        return (self.config.algo.mode == "one_step_off" and following < self.total_steps
                and stage_at(self.stages, following).index == stage.index)

    async def train_step(self, stage: Stage) -> dict[str, Any]:
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        off_policy = self.pending is not None
        with _timed(timings, "rollout"):  # 0 when the batch was generated during the last step
            rollout = self.pending or await self.generate(self.state.step + 1, stage)
        self.pending = None
        # The next batch, from the engines' current weights (a step behind once this one trains).
        prefetch = (asyncio.create_task(self.generate(self.state.step + 2, stage))
                    if self._prefetches(stage) else None)
        metrics: dict[str, Any] = {"stage": stage.index, **rollout.metrics(),
                                   "rollout/off_policy_steps": float(off_policy)}
        batch, group_metrics = self.build_batch(rollout)
        metrics.update(group_metrics)
        if batch.samples:
            await self._engines_memory("release", ["kv_cache", "weights"])
            with _timed(timings, "old_logprob"):
                # In a thread: a prefetching rollout shares this event loop.
                entropy = await asyncio.to_thread(self.old_logprobs, batch)
            metrics.update(self.importance_weights(batch))
            coef_before = self.entropy_control.coef
            alpha = self.entropy_control.step(entropy) if self.config.algo.entropy.enabled else 0.0
            metrics.update({"actor/entropy": entropy, "actor/entropy_coef": coef_before,
                            "actor/entropy_bonus": alpha})
            with _timed(timings, "train"):
                metrics.update(await asyncio.to_thread(self.update_policy, batch, stage, alpha))
            # The trainer hands its cached GPU memory back before the engines take theirs.
            self.ranks.call(ranks.release_cached_memory)
            await self._engines_memory("resume", ["weights"])
        else:
            log.warning("step %d: every group had equal rewards; no update", self.state.step + 1)
        if prefetch is not None:
            with _timed(timings, "rollout_wait"):  # the engines finish the next batch first
                self.pending = await prefetch
        if batch.samples:
            timings["sync"] = await self.sync_weights(resume_kv_cache=True)
        else:
            timings["sync"] = 0.0
        timings["step"] = time.perf_counter() - step_start
        metrics.update({f"time/{k}_s": v for k, v in timings.items()})
        metrics["perf/tokens_per_s"] = metrics["rollout/response_tokens"] / timings["step"]
        return metrics

    def importance_weights(self, batch: TrainBatch) -> dict[str, float]:
        """The engine/trainer mismatch of the batch, and the IS weights when a correction is on."""
        a = self.config.algo
        if any(s.engine_logprobs is None for s in batch.samples):
            return {}
        stats = MismatchStats()
        weights = []
        for sample, old in zip(batch.samples, batch.old_logprobs):
            engine = aligned_engine_logprobs(len(sample.prompt_ids), sample.engine_logprobs)
            w, sample_stats = importance_weights(old, engine, sample.response_mask(),
                                                 a.is_correction, a.is_cap)
            weights.append(w)
            stats.add(sample_stats)
        if a.is_correction != "none":
            batch.is_weights = weights
        return stats.metrics()

    def build_batch(self, rollout: RolloutBatch) -> tuple[TrainBatch, dict[str, float]]:
        """GRPO advantages, then rejection sampling of the groups whose rewards are all equal."""
        rewards = rollout.rewards()
        for group in rollout.groups:
            self.solve_tracker.update([group.record.uid] * len(group.rewards), group.rewards)
        advantages = group_advantages(rewards, self.config.algo.advantage_eps)
        groups = filter_uniform_groups(rewards)
        keep = groups.keep if self.config.algo.drop_uniform_groups else torch.ones_like(groups.keep)
        samples = [TrainSample(g.prompt_ids, response, float(advantages[p, j]), p,
                               g.engine_logprobs[j] if g.engine_logprobs else None)
                   for p, g in enumerate(rollout.groups) if keep[p]
                   for j, response in enumerate(g.responses)]
        return TrainBatch(samples), groups.metrics()

    def old_logprobs(self, batch: TrainBatch) -> float:
        """Fill the batch's old log-probs; return the mean entropy over its response tokens."""
        merged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in self.ranks.call(ranks.old_logprobs, batch.sequences):
            merged.update(part or {})
        batch.old_logprobs = [merged[i][0] for i in range(len(batch.samples))]
        total = sum(float((merged[i][1] * s.response_mask()).sum())
                    for i, s in enumerate(batch.samples))
        return total / batch.response_tokens()

    def update_policy(self, batch: TrainBatch, stage: Stage, alpha: float) -> dict[str, float]:
        """N_SGD optimizer steps, each the exact token mean over its mini-batch."""
        a = self.config.algo
        sums: dict[str, float] = {}
        parts = mini_batches(batch, stage.sgd_steps)
        shared = self.ranks.share(batch)  # one copy to the ranks' hosts for all N_SGD steps
        for indices in parts:
            out = self.ranks.call(ranks.train_policy, shared, indices, alpha, a.clip_low,
                                  a.clip_high, a.dual_clip)[0]
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + value
        steps = len(parts)
        tokens = max(sums.get("tokens", 0.0), 1.0)
        return {
            "actor/pg_loss": sums.get("pg_loss_sum", 0.0) / tokens,
            "actor/clipfrac": sums.get("clipfrac_sum", 0.0) / tokens,
            "actor/approx_kl": sums.get("approx_kl_sum", 0.0) / tokens,
            "actor/grad_norm": sums.get("grad_norm", 0.0) / steps,
            "actor/lr": sums.get("lr", 0.0) / steps,
            "actor/sgd_steps": float(steps),
            "actor/train_tokens": tokens,
        }

    # ------------------------------------------------------------ engines

    def push_weights(self, plan: Any) -> list[Any]:
        """Every policy rank's part of a push (the coordinator's `push`)."""
        return self.ranks.call(ranks.push_weights, plan)

    def score_probe(self, sequences: list[list[int]]) -> list[list[float]]:
        return next(r for r in self.ranks.call(ranks.score_sequences, sequences) if r is not None)

    async def refeed_engine(self, client: Any) -> None:
        """The router's hook for an engine it restarted: the current weights, not the base ones."""
        index = next(i for i, e in enumerate(self.coordinator.engines) if e.url == client.url)
        await self.coordinator.refeed(index, self.push_weights)

    async def sync_weights(self, resume_kv_cache: bool = False) -> float:
        """Push the trainer's weights to every engine, then (with sync.verify) check them with
        the probe batch, which generates: a colocated engine needs its KV cache back first."""
        report = await self.coordinator.sync(self.push_weights)
        if report.restarted:
            log.warning("weight sync %s restarted %s", report.version, report.restarted)
        if resume_kv_cache:
            await self._engines_memory("resume", ["kv_cache"])
        if self.config.sync.verify:
            report.verify_max_diff = await self.coordinator.verify(self.score_probe)
        return report.seconds

    async def _engines_memory(self, action: str, tags: list[str]) -> None:
        """Colocated placement: engines hand memory to the trainer and take it back."""
        if self.config.rollout.placement != "colocated":
            return
        clients = self.coordinator.clients
        calls = [c.release_memory_occupation(tags) if action == "release"
                 else c.resume_memory_occupation(tags) for c in clients]
        await asyncio.gather(*calls)

    async def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (mean correctness over data.eval_samples samples per problem)."""
        d, r = self.config.data, self.config.rollout
        if not self.heldout:
            return {}
        start = time.perf_counter()
        settings = SamplingSettings(max_new_tokens=self.stages[0].max_response_length,
                                    temperature=r.temperature, top_p=r.top_p, seed=self.config.run.seed)
        outcomes = await self.session.sample(self.heldout, [d.eval_samples] * len(self.heldout),
                                             settings, label="evaluation")
        correct = sum(o.correct for o in outcomes)
        samples = sum(o.samples for o in outcomes)
        out = {"eval/heldout_accuracy": correct / samples, "time/eval_s": time.perf_counter() - start}
        for source in sorted({o.data_source for o in outcomes}):
            mine = [o for o in outcomes if o.data_source == source]
            out[f"eval/{source}/accuracy"] = sum(o.correct for o in mine) / sum(o.samples for o in mine)
        return out


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
