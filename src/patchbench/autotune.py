"""Speed settings chosen for the machine at hand: `channels_last` and `fast_kernels` set to `auto`.

Neither setting changes the function a model computes, only how fast a step runs, and which is
faster depends on the machine: channels_last at channel counts that are not multiples of 8 or 16
falls off oneDNN's fast paths on some CPUs, and patchbench's CPU operators pay only where they beat oneDNN. So
rather than a rule, `resolve` times a few train steps of the run's own model (its configuration,
per-process batch, largest training size and precision) under each candidate setting, interleaved,
and keeps the fastest. A candidate whose first step takes over `CAP` times the best first step is
dropped unmeasured.

The choice is cached in `<cache>/probes/` under a key of everything it depends on (`probe_key`: the
CPU's model and flags or the GPU's name, torch and patchbench versions, threads, model, batch, size,
precision). A probe taken while other processes kept more than 0.3 cores busy (`cpu.threads.BUSY`) is used for
the run at hand but never cached. Explicit true/false values are honoured as given, without a probe;
so is `deterministic`, where a timing must not decide anything: `auto` is then NCHW with the
kernels on where they fit.
The probe runs inside `torch.random.fork_rng`: whether it ran or came from the cache, training draws
the same random numbers.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import patchbench
from patchbench import rundir
from patchbench.cpu.threads import BUSY, OtherLoad
from patchbench.device import cpu_features, cpu_name, device_name
from patchbench.errors import UserError

CAP = 3.0  # a candidate whose first step is over CAP x the best first step is dropped
ROUNDS = 3  # timed steps per candidate, interleaved, after the first (warm-up) step


@dataclass(frozen=True)
class Choice:
    channels_last: bool
    fast_kernels: bool

    def __str__(self) -> str:
        return f"{'channels_last' if self.channels_last else 'NCHW'}, kernels {'on' if self.fast_kernels else 'off'}"


@dataclass
class Resolution:
    """What runs, and how it was decided: given, cached, probed (or recorded for this machine)."""

    choice: Choice
    how: str
    step_s: dict[str, float] = field(default_factory=dict)  # str(candidate) -> median step time
    dropped: list[str] = field(default_factory=list)  # candidates cut by CAP after one step
    machine: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {**asdict(self.choice), "how": self.how, "step_s": self.step_s, "dropped": self.dropped,
                "machine": self.machine}

    @classmethod
    def from_record(cls, doc: dict) -> Resolution:
        return cls(Choice(bool(doc["channels_last"]), bool(doc["fast_kernels"])), doc.get("how", "recorded"),
                   dict(doc.get("step_s") or {}), list(doc.get("dropped") or []), dict(doc.get("machine") or {}))


def candidates(channels_last: bool | str, fast_kernels: bool | str, kernels_apply: bool) -> list[Choice]:
    """Every combination the settings allow: `auto` offers both values, true/false only itself; kernels
    that fit no layer of the model (or another device than the CPU) are off."""
    layouts = [False, True] if channels_last == "auto" else [bool(channels_last)]
    kernels = ([False, True] if fast_kernels == "auto" else [bool(fast_kernels)]) if kernels_apply else [False]
    return [Choice(cl, k) for cl in layouts for k in kernels]


def machine_key(device: torch.device) -> dict:
    """What a measured speed belongs to: the processor (model and flags, or the GPU) and the software."""
    if device.type == "cpu":
        where = {"cpu": cpu_name(), "flags": hashlib.sha256(cpu_features().encode()).hexdigest()[:16]}
    else:
        where = {"device": device_name(device)}
    return {**where, "torch": torch.__version__, "patchbench": patchbench.__version__}


def probe_key(device: torch.device, **setting) -> dict:
    """The cache key of one probe: the machine, the thread count and the run's settings (`setting`)."""
    return {**machine_key(device), "threads": torch.get_num_threads(), **setting}


# ----------------------------------------------------------------------------- choosing


Measure = Callable[[list[Choice]], tuple[dict[Choice, float], list[Choice], float]]


def choose(key: dict, options: list[Choice], measure: Measure, cache_dir: Path | None,
           log: Callable[[str], None] = lambda msg: None) -> Resolution:
    """The fastest of `options`: from the cache under `key`, else by `measure` (-> median step seconds
    per candidate, the candidates dropped, the other processes' load in cores), cached when the
    machine was quiet."""
    machine = {k: key[k] for k in ("cpu", "flags", "device", "torch", "patchbench") if k in key}
    if len(options) == 1:
        return Resolution(options[0], "given", machine=machine)
    doc = {"key": key, "options": [asdict(o) for o in options]}
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / "probes" / f"{digest}.json"
        cached = _read(path, doc)
        if cached is not None:
            return Resolution(Choice(**cached["choice"]), "cached", cached["step_s"], cached["dropped"], machine)
    step_s, dropped, load = measure(options)
    best = min(step_s, key=step_s.get)
    timings = {str(o): round(s, 4) for o, s in step_s.items()}
    shown = ", ".join(f"[{o}] {s * 1e3:.0f} ms" for o, s in step_s.items())
    if load > BUSY:
        log(f"speed probe: {best} ({shown}); {load:.1f} cores were busy with other work, so it is not cached")
        return Resolution(best, f"probed ({load:.1f} other cores busy, not cached)", timings,
                          [str(o) for o in dropped], machine)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.atomic_write_json(path, {**doc, "choice": asdict(best), "step_s": timings,
                                            "dropped": [str(o) for o in dropped]})
        except (OSError, UserError) as e:  # a read-only cache costs a probe next time, nothing else
            log(f"speed probe: cannot cache it in {path.parent} ({e})")
    log(f"speed probe: {best} ({shown}" + (f"; dropped after one step: {', '.join(map(str, dropped))}" if dropped
                                            else "") + ")")
    return Resolution(best, "probed", timings, [str(o) for o in dropped], machine)


def _read(path: Path, doc: dict) -> dict | None:
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == doc["key"] and cached.get("options") == doc["options"]:
            Choice(**cached["choice"])
            return cached
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return None


# ----------------------------------------------------------------------------- measuring


def time_options(build: Callable[[], nn.Module], options: list[Choice], *, batch_size: int, img_size: int,
                 amp: str, device: torch.device, num_classes: int, rounds: int = ROUNDS, cap: float = CAP
                 ) -> tuple[dict[Choice, float], list[Choice], float]:
    """Median train-step seconds of `build()`'s model under each candidate (see `choose`)."""
    from patchbench.bench import Settings, make_step, time_steps, warm_up
    from patchbench.cpu.layers import use_fast_kernels

    dtype = {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}[amp]
    steps, first = {}, {}
    with OtherLoad() as load:
        for option in options:
            model = build()
            if option.fast_kernels:
                use_fast_kernels(model)
            step = make_step(model, Settings(dtype, option.channels_last), mode="train", batch_size=batch_size,
                             img_size=img_size, device=device, num_classes=num_classes)
            first[option] = warm_up(step, 1, device)
            if first[option] <= cap * min(first.values()):
                steps[option] = step
        kept = {o: s for o, s in steps.items() if first[o] <= cap * min(first.values())}
        times = time_steps(kept, rounds, device)
    dropped = [o for o in options if o not in kept]
    return {o: statistics.median(t) for o, t in times.items()}, dropped, load.cores


def resolve(build: Callable[[], nn.Module], *, channels_last: bool | str, fast_kernels: bool | str,
            device: torch.device, batch_size: int, img_size: int, amp: str, num_classes: int, setting: dict,
            cache_dir: Path | None, recorded: dict | None = None, deterministic: bool = False,
            log: Callable[[str], None] = lambda msg: None) -> Resolution:
    """The layout and kernels a run trains with on this machine. `setting` identifies the model
    configuration in the cache key; `recorded` is what the run chose before (config.json): kept when it
    was decided on this same machine, so a resumed run continues as it started."""
    from patchbench.cpu.layers import use_fast_kernels

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        kernels_apply = device.type == "cpu" and fast_kernels is not False and use_fast_kernels(build()) > 0
        options = candidates(channels_last, fast_kernels, kernels_apply)
        if deterministic and len(options) > 1:
            fixed = Choice(channels_last is True, kernels_apply and fast_kernels is not False)
            return Resolution(fixed, "deterministic: fixed, not probed", machine=machine_key(device))
        key = probe_key(device, **setting, batch_size=batch_size, img_size=img_size, amp=amp)
        if recorded is not None and len(options) > 1:
            before = Resolution.from_record(recorded)
            if before.machine and before.machine == {k: key.get(k) for k in before.machine} \
                    and before.choice in options:
                return Resolution(before.choice, "as recorded for this machine", before.step_s, before.dropped,
                                  before.machine)

        def measure(opts):
            return time_options(build, opts, batch_size=batch_size, img_size=img_size, amp=amp, device=device,
                                num_classes=num_classes)

        return choose(key, options, measure, cache_dir, log)
