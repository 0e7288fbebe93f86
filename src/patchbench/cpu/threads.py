"""An adaptive CPU thread count for training: one thread or all cores, whichever trains faster now.

Why: torch's OpenMP regions need every thread of the team. When another CPU-bound process takes a
core, a step on all cores waits at every region for the descheduled thread and can fall below a
one-thread step, while a fixed single thread gives up much of the quiet speed
(benchmarks/busy_machine.py measures both). So the trainer
measures instead: it times `window` steps at each setting, keeps
the faster one, and checks again once at least `period` steps and `period_s` seconds have passed
(the load of a shared machine changes by the minute; a choice made while another job ran must not
stick for long).

The thread count does not change what is computed beyond floating-point summation order; runs that
must be bit-exact (`--deterministic`) and runs with an explicit `--threads N` keep a fixed count.
"""

from __future__ import annotations

import statistics
import time

import torch


class ThreadTuner:
    """Call `step_begins()` before and `step_ends()` after every training step."""

    def __init__(self, window: int = 6, period: int = 60, period_s: float = 30.0, most: int | None = None):
        most = most or torch.get_num_threads()
        self.choices = [most, 1] if most > 1 else [1]
        self.window, self.period, self.period_s = window, period, period_s
        self.chosen_at = float("-inf")  # when the last trial ended (none yet: the first step starts one)
        self.current = most
        self.steps_at = {c: 0 for c in self.choices}  # steps trained at each count
        self.plan: list[int] = []  # the thread counts of the coming trial steps
        self.times: dict[int, list[float]] = {}  # step times of the trial under way
        self.countdown = 0  # steps until the next trial
        self._trial: int | None = None
        self._tick = 0.0

    def step_begins(self) -> None:
        self._trial = None
        due = self.countdown <= 0 and time.perf_counter() - self.chosen_at >= self.period_s
        if len(self.choices) > 1 and due and not self.times:
            self.times = {c: [] for c in self.choices}
            self.plan = [c for c in self.choices for _ in range(self.window)]
        if self.plan:
            self._trial = self.plan.pop(0)
            self._set(self._trial)
        self._tick = time.perf_counter()

    def step_ends(self) -> None:
        elapsed = time.perf_counter() - self._tick
        self.steps_at[self.current] += 1
        if self._trial is None:
            self.countdown -= 1
            return
        self.times[self._trial].append(elapsed)
        if not self.plan:  # the trial is complete: keep the faster count (each one's first step is a warm-up)
            speed = {c: statistics.median(t[1:] or t) for c, t in self.times.items()}
            self._set(min(speed, key=speed.get))
            self.times, self.countdown, self.chosen_at = {}, self.period, time.perf_counter()

    def _set(self, threads: int) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.current = threads

    def mean_threads(self, since: dict[int, int] | None = None) -> float:
        """The average thread count over the steps taken (since the `steps_at` snapshot `since`)."""
        counts = {c: n - (since or {}).get(c, 0) for c, n in self.steps_at.items()}
        total = sum(counts.values())
        return sum(c * n for c, n in counts.items()) / total if total else float(self.current)
