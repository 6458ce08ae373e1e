"""Which group is active: the order of groups within a cycle and the cycle count.

bottom_up visits groups 0..k-1 every cycle, top_down k-1..0, random a fresh permutation every
cycle drawn with `torch.randperm(k, generator=g)` from a CPU generator seeded with `seed`.
"""
from __future__ import annotations

from typing import List

import torch

STRATEGIES = ("bottom_up", "top_down", "random")


class Rotation:
    """The order of k groups under a strategy; `active` is the group to update next."""

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
        """Restore a state_dict(); a state that cannot be this rotation's raises ValueError and
        changes nothing."""
        try:
            strategy, k, cycle, position = state["strategy"], state["k"], int(state["cycle"]), int(state["position"])
            order = [int(i) for i in state["order"]]
            generator = torch.Generator()
            generator.set_state(state["generator"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"rotation state is malformed: {exc}") from None
        if strategy != self.strategy or k != self.k:
            raise ValueError(f"rotation state is for strategy={strategy!r} with {k} groups, "
                             f"this optimizer has strategy={self.strategy!r} with {self.k}")
        if cycle < 0 or not 0 <= position < k or sorted(order) != list(range(k)):
            raise ValueError(f"rotation state is out of range: cycle {cycle}, position {position}, "
                             f"order {order} for {k} groups")
        if strategy != "random" and order != self._draw():
            raise ValueError(f"rotation state has order {order}, not {strategy}'s")
        self.cycle, self.position, self.order = cycle, position, order
        self.generator.set_state(generator.get_state())
