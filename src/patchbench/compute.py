"""Training compute, and the steps a compute budget buys.

Training compute is counted as 3 x the forward MACs of one image at the step's resolution (backward
= input + weight gradients = 2 x forward; MACs as `torch.utils.flop_counter` counts convolutions and
matmuls, see patchbench.flops) x the images the step trains on, summed over the steps; evaluation
does not count. A run given a `budget` trains the number of steps whose compute is closest to it,
so every model in a study spends the same compute whatever it costs per image; the last epoch stops
when the budget is spent. Progressive resizing splits the training sizes evenly over the run: over
its epochs for an --epochs run, over its steps for a budgeted one (a budget may buy less than one
epoch per size), and the schedule is laid out over exactly those steps.

    plan = plan_steps(budget=40e12, epochs=None, steps_per_epoch=147, batch_size=64,
                      train_sizes=(96, 112, 128), img_size=128, macs_at={96: ..., 112: ..., 128: ...})
    plan.steps, plan.epochs, plan.segments(epoch), plan.train_macs
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps of a run and the training size of each; the last epoch may be cut short."""

    steps: int
    steps_per_epoch: int
    phases: tuple[tuple[int, int], ...]  # (end step, exclusive; size), in order, the last ending at `steps`
    train_macs: float  # 3 x forward MACs x images, over all the steps

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Steps of `epoch` (0-based): a whole epoch's, or what is left for the last one."""
        return max(0, min(self.steps_per_epoch, self.steps - epoch * self.steps_per_epoch))

    def segments(self, epoch: int) -> list[tuple[int, int, int]]:
        """(first batch, end batch (exclusive), size) of each part of `epoch` trained at one size."""
        start, end = epoch * self.steps_per_epoch, epoch * self.steps_per_epoch + self.steps_in(epoch)
        out, begin = [], 0
        for stop, size in self.phases:
            lo, hi = max(begin, start), min(stop, end)
            if lo < hi:
                out.append((lo - start, hi - start, size))
            begin = stop
        return out

    def size_at_end(self, epoch: int) -> int:
        """The size of `epoch`'s last step."""
        return self.segments(epoch)[-1][2]

    def epoch_macs(self, epoch: int, batch_size: int, macs_at: dict[int, float]) -> float:
        """Training compute of `epoch`'s steps."""
        return sum((end - first) * step_macs(size, batch_size, macs_at) for first, end, size in self.segments(epoch))


def macs_tag(macs: float) -> str:
    """A compute budget written short, as the flag takes it: 5e12 -> "5T", 2.5e12 -> "2.5T", 8e11 -> "800G"."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.4g}{unit}"
    return f"{macs:.4g}"


def split_sizes(train_sizes: tuple[int, ...], img_size: int, n: int) -> tuple[int, ...]:
    """The size of each of `n` units (epochs or steps): `train_sizes` in equal shares (else img_size)."""
    sizes = train_sizes or (img_size,)
    return tuple(sizes[min(len(sizes) - 1, i * len(sizes) // n)] for i in range(n))


def _phases(per_unit: tuple[int, ...], unit: int) -> tuple[tuple[int, int], ...]:
    """Runs of equal sizes as (end step, size), each unit `unit` steps long."""
    phases: list[tuple[int, int]] = []
    for i, size in enumerate(per_unit):
        if phases and phases[-1][1] == size:
            phases[-1] = ((i + 1) * unit, size)
        else:
            phases.append(((i + 1) * unit, size))
    return tuple(phases)


def step_macs(size: int, batch_size: int, macs_at: dict[int, float]) -> float:
    """Training compute of one step of `batch_size` images at `size` (3 x forward MACs x images)."""
    return 3.0 * macs_at[size] * batch_size


def _macs(phases, batch_size, macs_at) -> float:
    total, begin = 0.0, 0
    for stop, size in phases:
        total += (stop - begin) * step_macs(size, batch_size, macs_at)
        begin = stop
    return total


def plan_steps(*, budget: float | None, epochs: int | None, steps_per_epoch: int, batch_size: int,
               train_sizes: tuple[int, ...], img_size: int, macs_at: dict[int, float]) -> StepPlan:
    """The steps of a run of `epochs` whole epochs, or of the compute `budget` (MACs): the step count
    whose compute is closest to it. `macs_at` maps each training size to one image's forward MACs."""
    if steps_per_epoch < 1:
        raise ValueError("a run needs at least one step per epoch")
    if budget is None:
        phases = _phases(split_sizes(train_sizes, img_size, epochs), steps_per_epoch)
        return StepPlan(epochs * steps_per_epoch, steps_per_epoch, phases, _macs(phases, batch_size, macs_at))

    def cost(steps: int) -> float:  # the sizes split evenly over the steps, as over epochs without a budget
        return _macs(_phases(split_sizes(train_sizes, img_size, steps), 1), batch_size, macs_at)

    lo, hi = 1, 2
    while cost(hi) < budget:  # cost grows with the step count: bracket the budget, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) < budget else (lo, mid)
    steps = min((lo, hi), key=lambda n: abs(cost(n) - budget))
    phases = _phases(split_sizes(train_sizes, img_size, steps), 1)
    return StepPlan(steps, steps_per_epoch, phases, _macs(phases, batch_size, macs_at))
