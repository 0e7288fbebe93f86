"""An adaptive CPU thread count for training: one thread or all cores, whichever trains faster now.

Why: torch's OpenMP regions need every thread of the team. When another CPU-bound process takes a
core, a step on all cores waits at every region for the descheduled thread and can fall below a
one-thread step, while a fixed single thread gives up much of the quiet speed
(benchmarks/busy_machine.py measures both). So the trainer measures instead, when another process
keeps the CPU busy (`OtherLoad`; on a quiet machine all cores are right, and a trial's single-thread
steps would only cost time): it times `window` steps at each setting, keeps the faster one, and
checks again once at least `period` steps and `period_s` seconds have passed
(the load of a shared machine changes by the minute; a choice made while another job ran must not
stick for long).

The thread count does not change what is computed beyond floating-point summation order; runs that
must be bit-exact (`--deterministic`) and runs with an explicit `--threads N` keep a fixed count.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import torch

BUSY = 0.3  # cores kept busy by other processes above which the machine counts as shared


class OtherLoad:
    """Cores kept busy by other processes while the block ran: the machine's busy time (/proc/stat)
    less this process's own CPU time, over the wall time. Without /proc/stat, the 1-minute load
    average before the block (which counts this process only if it was already busy). Also usable
    without `with`: `start()`, then `read()` as often as wanted (the load since the start)."""

    def start(self) -> OtherLoad:
        self._t, self._own, self._busy = time.perf_counter(), time.process_time(), _busy_seconds()
        self.cores = 0.0
        return self

    def read(self) -> float:
        wall = time.perf_counter() - self._t
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            self.cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.inf
        elif wall > 0:
            self.cores = max(0.0, (busy - self._busy - (time.process_time() - self._own)) / wall)
        return self.cores

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.read()


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ThreadTuner:
    """Call `step_begins()` before and `step_ends()` after every training step."""

    def __init__(self, window: int = 6, period: int = 60, period_s: float = 30.0, most: int | None = None,
                 other_load: Callable[[], float] | None = None):
        """`other_load()`: the cores other processes kept busy since the last trial (or skipped one);
        by default measured (`OtherLoad`)."""
        most = most or torch.get_num_threads()
        self._load = None if other_load is not None else OtherLoad().start()
        self.other_load = other_load or self._load.read
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
            if self.current == self.choices[0] and self.other_load() < BUSY:  # quiet, on all cores: stay
                self.countdown, self.chosen_at = self.period, time.perf_counter()
                self._restart_load()
            else:
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
            self._restart_load()

    def _restart_load(self) -> None:
        if self._load is not None:
            self._load.start()

    def _set(self, threads: int) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.current = threads

    def mean_threads(self, since: dict[int, int] | None = None) -> float:
        """The average thread count over the steps taken (since the `steps_at` snapshot `since`)."""
        counts = {c: n - (since or {}).get(c, 0) for c, n in self.steps_at.items()}
        total = sum(counts.values())
        return sum(c * n for c, n in counts.items()) / total if total else float(self.current)
