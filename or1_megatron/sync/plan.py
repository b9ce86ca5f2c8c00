"""What the coordinator hands the trainer's sending ranks for one push, and what they report back.

Plain picklable dataclasses (they cross process boundaries: forked ranks today, Ray later) and
the weight-sync errors. No logic beyond naming.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from or1_megatron.errors import OR1Error


class WeightSyncError(OR1Error):
    """A sync failed: an engine refused weights, stayed down, or a wait ran past its timeout."""


class SyncVerificationError(WeightSyncError):
    """An engine's log-probabilities on the probe batch differ from the trainer's after a sync."""


@dataclass(frozen=True)
class EngineTarget:
    """One engine as the senders address it."""

    index: int
    url: str
    tp_size: int = 1


@dataclass(frozen=True)
class PushPlan:
    """One push of the full weights to `targets`, all tensors tagged with `version`."""

    transport: str
    version: str
    targets: tuple[EngineTarget, ...]
    bucket_bytes: int
    timeout_s: float
    # disk: the directory of this version; distributed: where engines reach the senders.
    disk_dir: str = ""
    master_address: str = "127.0.0.1"
    group_prefix: str = "or1_sync"
    # CPU: the trainer's parameters live in shared memory (engines and TP rank 0 read them there).
    share_parameters: bool = True

    def only(self, indices: set[int]) -> "PushPlan":
        """The same push, restricted to some engines (re-feeding restarted engines)."""
        return replace(self, targets=tuple(t for t in self.targets if t.index in indices))


@dataclass
class PushReport:
    """What one trainer rank did in a push (non-sending ranks report sent=False)."""

    rank: int
    pp_stage: int
    sent: bool
    buckets: int = 0
    bytes: int = 0
    tensors: int = 0
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # engine url -> why it got nothing
    # TP > 1: how TP rank 0 got its peers' shards ("shared_memory" or "point_to_point").
    tp_shards: str = ""
