"""MAGIC's adaptive entropy control: an entropy bonus switched on only while entropy is low.

After each step the controller moves its coefficient c by `delta` towards keeping the rollout
entropy at `target` (up when below, down when above), clamped to [coef_min, coef_max]; the bonus
applied in a step is alpha = c * 1{e <= target}, so a policy above target gets no bonus at all.
Its state, c alone, is part of every checkpoint (state_dict / load_state_dict), so a resumed run
applies the same coefficients as one that never stopped; target, delta and the clamp come from
the run's config, so a new stage may change them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdaptiveEntropyController:
    target: float = 0.2
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0
    coef: float = 0.0  # c, the controller's state

    def __post_init__(self) -> None:
        if self.delta < 0:
            raise ValueError(f"entropy control delta must be >= 0, got {self.delta}")
        if not self.coef_min <= self.coef_max:
            raise ValueError(f"entropy control coef_min={self.coef_min} > coef_max={self.coef_max}")
        self.coef = min(max(self.coef, self.coef_min), self.coef_max)

    def step(self, entropy: float) -> float:
        """The bonus coefficient alpha for a step whose rollout entropy is `entropy`; then update c."""
        alpha = self.coef if entropy <= self.target else 0.0
        moved = self.coef + self.delta if entropy < self.target else self.coef - self.delta
        self.coef = min(max(moved, self.coef_min), self.coef_max)
        return alpha

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        unknown = set(state) - {"coef"}
        if unknown:
            raise KeyError(f"unknown entropy controller state {sorted(unknown)}")
        self.coef = min(max(float(state["coef"]), self.coef_min), self.coef_max)
