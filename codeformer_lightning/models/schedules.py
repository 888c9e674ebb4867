"""Small schedule objects for the training recipes: values per step range, degradation mix, LR.

The published stage III recipe changes the fidelity weight and the degradation strength at fixed
iterations. Here such recipes are data (config tables), read through these objects, never ``if``
ladders inside a training step:

>>> w = StepTable([[0, 1.0], [40000, 1.3], [80000, 0.0], [120000, 1.3]])
>>> w(0), w(39999), w(40000), w(200000)
(1.0, 1.0, 1.3, 1.3)

Steps are Lightning's 0-based ``global_step`` (the number of optimiser steps already taken). The
published code counts iterations from 1 and switches "after iteration N", which is step N here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class StepTable:
    """A piecewise-constant function of the training step.

    ``entries``: ``[[start_step, value], ...]`` with strictly increasing start steps, the first
    one 0; ``table(step)`` is the value of the last entry whose start is ``<= step``. A plain
    number (or a table with one entry) is a constant.
    """

    def __init__(self, entries: Iterable[Sequence[Any]] | float | int) -> None:
        if isinstance(entries, (int, float)):
            entries = [[0, entries]]
        rows = [tuple(e) for e in entries]
        if not rows:
            raise ValueError("a StepTable needs at least one [start_step, value] entry")
        for row in rows:
            if len(row) != 2:
                raise ValueError(f"StepTable entries are [start_step, value] pairs, got {list(row)}")
        starts = [int(s) for s, _ in rows]
        if starts[0] != 0:
            raise ValueError(f"the first StepTable entry must start at step 0, got {starts[0]} (entries {rows})")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"StepTable start steps must strictly increase, got {starts}")
        self.starts = starts
        self.values = [v for _, v in rows]

    @classmethod
    def of(cls, value: StepTable | Iterable[Sequence[Any]] | float | int) -> StepTable:
        """``value`` as a StepTable (tables pass through; lists and numbers are converted)."""
        return value if isinstance(value, StepTable) else cls(value)

    def __call__(self, step: int) -> Any:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.values[bisect.bisect_right(self.starts, step) - 1]

    def as_list(self) -> list[list[Any]]:
        return [[s, v] for s, v in zip(self.starts, self.values)]

    def __repr__(self) -> str:
        return f"StepTable({self.as_list()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepTable) and self.as_list() == other.as_list()


class DegradationMix:
    """Which degradation a stage III step trains on: "small" (image + code losses) or "large".

    ``small_every``: a :class:`StepTable` (or its entries, or a number) of periods ``n``: within a
    range, every ``n``-th step is a small-degradation step and the others are large-degradation
    (code-path only) steps; ``n = 1``: all small; ``n = 0``: all large. With the published
    counting, step ``s`` is small when ``(s + 1) % n == 0``.
    The published stage III: ``[[0, 1], [80000, 0], [120000, 15]]``.
    """

    def __init__(self, small_every: StepTable | Iterable[Sequence[Any]] | int = 1) -> None:
        self.small_every = StepTable.of(small_every)
        bad = [v for v in self.small_every.values if int(v) != v or v < 0]
        if bad:
            raise ValueError(f"small_every periods must be integers >= 0, got {bad}")

    def is_large(self, step: int) -> bool:
        n = int(self.small_every(step))
        if n == 0:
            return True
        return (step + 1) % n != 0

    def never_large(self) -> bool:
        """True when no step of the table is a large-degradation step."""
        return all(int(v) == 1 for v in self.small_every.values)

    def __repr__(self) -> str:
        return f"DegradationMix(small_every={self.small_every.as_list()})"


class CosineRestartLR(LRScheduler):
    """Cosine annealing with restarts (the published stage III schedule), stepped once per step.

    Period ``i`` lasts ``periods[i]`` steps; within it the rate falls from
    ``restart_weights[i] * base_lr`` (plus ``eta_min``) to ``eta_min`` along half a cosine:
    ``eta_min + w_i * (base_lr - eta_min) * (1 + cos(pi * t / period_i)) / 2``. After the last
    period the rate stays at ``eta_min``. Published stage III: ``periods=[150000],
    restart_weights=[1], eta_min=2e-5`` with a base rate of 5e-5.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        periods: Sequence[int],
        restart_weights: Sequence[float] = (1.0,),
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        periods = [int(p) for p in periods]
        restart_weights = [float(w) for w in restart_weights]
        if not periods or any(p <= 0 for p in periods):
            raise ValueError(f"periods must be positive step counts, got {periods}")
        if len(restart_weights) != len(periods):
            raise ValueError(
                f"restart_weights ({len(restart_weights)}) and periods ({len(periods)}) must have the same length"
            )
        self.periods = periods
        self.restart_weights = restart_weights
        self.eta_min = float(eta_min)
        self._ends = [sum(periods[: i + 1]) for i in range(len(periods))]
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The share of ``base_lr - eta_min`` in effect at ``step``."""
        i = bisect.bisect_right(self._ends, step)
        if i >= len(self.periods):
            return 0.0
        t = (step - (self._ends[i] - self.periods[i])) / self.periods[i]
        return self.restart_weights[i] * 0.5 * (1.0 + math.cos(math.pi * t))

    def get_lr(self) -> list[float]:
        factor = self.factor(max(self.last_epoch, 0))
        return [self.eta_min + factor * (base - self.eta_min) for base in self.base_lrs]
