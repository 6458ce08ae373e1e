"""Which group is active: the order of groups within a cycle and the cycle count.

bottom_up visits groups 0..k-1 every cycle, top_down k-1..0, random a fresh permutation every
cycle drawn with `torch.randperm(k, generator=g)` from a CPU generator seeded with `seed`.
"""
from __future__ import annotations

from typing import List

import torch

STRATEGIES = ("bottom_up", "top_down", "random")


class Rotation:
    def __init__(self, k: int, strategy: str = "bottom_up", seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.k = k
        self.strategy = strategy
        self.generator = torch.Generator().manual_seed(int(seed))
        self.cycle = 0
        self.position = 0
        self.order = self._draw()

    def _draw(self) -> List[int]:
        if self.strategy == "bottom_up":
            return list(range(self.k))
        if self.strategy == "top_down":
            return list(range(self.k - 1, -1, -1))
        return torch.randperm(self.k, generator=self.generator).tolist()

    @property
    def active(self) -> int:
        return self.order[self.position]

    def advance(self) -> None:
        """Move to the next group; a new cycle draws its order."""
        self.position += 1
        if self.position == self.k:
            self.cycle += 1
            self.position = 0
            self.order = self._draw()

    def state_dict(self) -> dict:
        return {"strategy": self.strategy, "k": self.k, "cycle": self.cycle, "position": self.position,
                "order": list(self.order), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["strategy"] != self.strategy or state["k"] != self.k:
            raise ValueError(f"rotation state is for strategy={state['strategy']!r} with {state['k']} groups, "
                             f"this optimizer has strategy={self.strategy!r} with {self.k}")
        self.cycle, self.position, self.order = int(state["cycle"]), int(state["position"]), list(state["order"])
        self.generator.set_state(state["generator"])
