"""Dynamic loss scaling for fp16 training.

fp16 gradients underflow below ~6e-8; multiplying the loss by S shifts them into range, and the
optimizer divides by S again. S starts high; a step whose gradients contain inf/NaN is skipped and S is
halved (`backoff`); after `growth_interval` good steps in a row S doubles. Skipped steps are counted.
"""

from __future__ import annotations

import math


class DynamicLossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ) -> None:
        self.scale = init_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, grad_norm: float) -> bool:
        """Record the unscaled gradient norm of this step; returns True when the step must be skipped."""
        if not math.isfinite(grad_norm):
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped_steps += 1
            return True
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps, self.skipped_steps = (
            state["scale"],
            state["good_steps"],
            state["skipped_steps"],
        )
