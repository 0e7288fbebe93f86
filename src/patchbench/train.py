"""The training loop: `train_run(cfg, out_dir)` trains one model and writes its run directory.

    summary = train_run(get_preset("quick").config_for("resnet9"), "runs/resnet9")

Read it in three parts, as torchvision's reference script: `setup` builds everything a run needs
(data, model, optimizer, state restored from a checkpoint), `train_one_epoch` is the step loop, and
`run_epochs` is the epoch loop (validate, record, checkpoint). The features are switches of the
config: mixed precision, channels_last, torch.compile, EMA of the weights, gradient clipping,
mixup/cutmix with soft targets, progressive resizing, a held-out validation split, data-parallel
over torchrun's processes, and an adaptive CPU thread count. `amp=auto` is resolved when the run is
created (and kept on resume); `channels_last` and `fast_kernels` set to `auto` are resolved for the
machine at hand each time the run starts (patchbench.autotune), and every epoch records what ran. The run directory is the record (see
patchbench.rundir and docs/ARCHITECTURE.md).

Exact resume: every random choice of the data is a function of (seed, epoch, batch) and the
schedule is a function of the step, so a checkpoint needs only the weights, the optimizer, the
step and the RNG states (for dropout and drop path). A checkpoint is written after every epoch,
and also mid-epoch when SIGINT/SIGTERM arrives; resuming then starts the epoch at the next batch
without making the batches already trained on.

Data-parallel (torchrun): every process runs this same code. `cfg.train.batch_size` is the global
batch, split evenly over the ranks; each rank trains on its shard of every global batch, DDP
averages the gradients, metrics are summed over ranks, and only rank 0 writes files. All ranks
draw the same global RNG stream (seeded alike), which keeps checkpoints independent of the number
of ranks: a run written by N processes resumes on M.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from patchbench import rundir
from patchbench.autotune import Resolution, resolve
from patchbench.checkpoint import (
    load_checkpoint,
    load_weights,
    optimizer_from_parts,
    optimizer_to_parts,
    remove_leftovers,
    rng_from_parts,
    rng_to_parts,
    save_checkpoint,
)
from patchbench.compute import StepPlan, plan_steps
from patchbench.config import RunConfig, cache_root, current_name, fields_of
from patchbench.cpu.layers import use_fast_kernels
from patchbench.cpu.memory import keep_freed_memory
from patchbench.cpu.threads import ThreadTuner
from patchbench.device import (
    autocast,
    cpu_name,
    device_name,
    environment,
    resolve_amp,
    resolve_device,
)
from patchbench.errors import UserError
from patchbench.evaluate import evaluate_model
from patchbench.flops import count_macs, count_params
from patchbench.metrics import Meter
from patchbench.models import arguments, check_overrides, create_model, label
from patchbench.models.layers import kaiming_init_
from patchbench.optim import create_optimizer, lr_at, set_lr, total_steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run directory keeps the last good checkpoint."""


@dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 without one)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group from the environment (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, 0, resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    owns = False
    if not torch_dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local, dev, owns)


class EMA:
    """Exponential moving average of the weights (buffers such as BN statistics are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1.0 - self.decay)
            else:
                e.copy_(m)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps and checkpoints before exiting.

    A second signal gets the previous handler (a second Ctrl-C interrupts at once).
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old[signum])

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The run's model, built for the evaluation size; a ViT trained at other sizes too (--train-sizes)
    resamples its position embedding to them (`dynamic_img_size`, the same function at the built size)."""
    overrides = dict(cfg.model.overrides)
    if overrides.setdefault("img_size", cfg.data.img_size) != cfg.data.img_size:
        raise UserError(f"model override img_size={overrides['img_size']} differs from the data's img_size="
                        f"{cfg.data.img_size}; set --img-size instead")
    if any(size != cfg.data.img_size for size in cfg.data.train_sizes) and \
            "dynamic_img_size" in arguments(cfg.model.name):
        overrides.setdefault("dynamic_img_size", True)
    model = create_model(cfg.model.name, num_classes=num_classes, **overrides)
    return kaiming_init_(model) if cfg.train.init == "kaiming" else model


def check_sizes(cfg: RunConfig, num_classes: int) -> dict[int, int]:
    """Forward MACs of one image at the evaluation size and at every training size; UserError when
    the model cannot take a training size."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
        macs = {}
        for size in sorted({cfg.data.img_size, *cfg.data.train_sizes}):
            try:
                macs[size] = count_macs(model, size)
            except (ValueError, RuntimeError) as e:
                raise UserError(f"--train-sizes {size}: {cfg.model.name} cannot train at {size}px "
                                f"({str(e).splitlines()[0]})") from None
        return macs


def plan_run(cfg: RunConfig, steps_per_epoch: int, macs_at: dict[int, int]) -> StepPlan:
    """The run's steps: --epochs whole epochs, or the steps that spend --compute-budget (patchbench.compute)."""
    t, d = cfg.train, cfg.data
    plan = plan_steps(budget=t.compute_budget, epochs=t.epochs, steps_per_epoch=steps_per_epoch,
                      batch_size=t.batch_size, train_sizes=d.train_sizes, img_size=d.img_size, macs_at=macs_at)
    if len(d.train_sizes) > plan.steps:
        raise UserError(f"--compute-budget {t.compute_budget:.3g} buys {plan.steps} step(s) of {cfg.model.name}, "
                        f"fewer than the {len(d.train_sizes)} --train-sizes; raise the budget or give fewer sizes")
    return plan


# ----------------------------------------------------------------------------- run directory


def plan_run_dir(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> str:
    """What to do with `out`: "new", "resume" (from checkpoint/last) or "finished". Never writes."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the run")
    if overwrite or not out.exists():
        return "new"
    if not (out / rundir.CONFIG).exists():
        if any(out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no patchbench run; choose a new or empty "
                            f"folder (or pass --overwrite)")
        return "new"
    saved = rundir.read_config(out)
    name = current_name((saved.get("model") or {}).get("name"))  # a run of the previous release: its new name
    if name != cfg.model.name:
        raise UserError(f"run dir {out} belongs to another model ({name}, not {cfg.model.name}); choose "
                        f"another --out, or pass --overwrite to replace it")
    if not resume:
        raise UserError(f"run dir {out} already holds a run of {name}; pass --resume to continue it, "
                        f"--overwrite to start it again, or choose another --out")
    saved.pop("env", None), saved.pop("derived", None)
    check_compatible(RunConfig.from_dict(saved, str(out / rundir.CONFIG)), cfg, out)
    try:
        finished = rundir.run_status(out) == rundir.FINISHED
    except rundir.RunFileError:  # a broken summary.json: the checkpoint decides
        finished = False
    if finished and (out / rundir.EVAL).exists():
        return "finished"
    return "resume" if (out / rundir.CHECKPOINT / "last.json").exists() else "new"


def check_compatible(saved: RunConfig, cfg: RunConfig, out: Path) -> None:
    """Resuming must not change what the run computes; only settings marked resumable may differ."""
    a, b = saved.to_dict(), cfg.to_dict()
    diffs = [f"{section}.{key}" for section in ("model", "data", "train") for key in a[section]
             if a[section][key] != b[section].get(key)
             and not (section in ("data", "train") and fields_of(section)[key].resumable)]
    if diffs:
        raise UserError(f"cannot resume {out} with a different {', '.join(diffs)} (it would not continue the "
                        f"same run); resume without changing them, or start a new run with another --out")


def clear_run_dir(out: Path) -> None:
    """Remove a previous run's files (only those a run writes) before starting again."""
    import shutil

    for name in rundir.RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------- setup


@dataclass
class Trainer:
    """One process's training run: what `setup` builds, and the state the loops move forward."""

    cfg: RunConfig
    out: Path
    dist: Dist
    classes: list[str]
    eval_split: str  # "val", or "holdout" (carved out of train: --holdout)
    train_loader: object
    val_loader: object
    fit_loader: object | None  # a fixed subset of train, scored as val is (TrainConfig.fit_eval)
    model: nn.Module
    step_model: nn.Module  # the model wrapped for the step (DDP, torch.compile)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    mix: object | None  # mixup/cutmix of train batches (patchbench.data.mix)
    tuner: ThreadTuner | None
    speed: Resolution  # the layout and kernels this process trains with
    kernel_layers: int  # layers patchbench.cpu swapped in (0: none, or none could be built)
    plan: StepPlan  # the steps of every epoch, and their sizes
    macs_at: dict[int, int]  # forward MACs of one image at each training size
    total_steps: int
    summary_base: dict
    info: dict  # what every checkpoint carries besides the training state
    # where the run stands
    epoch: int = 0
    start_batch: int = 0
    step: int = 0
    rows: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    wall_before: float = 0.0
    partial_sums: list[float] | None = None
    started: float = field(default_factory=time.perf_counter)
    writer: object = None

    @property
    def processor(self) -> str:
        return cpu_name() if self.dist.device.type == "cpu" else device_name(self.dist.device)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


def setup(cfg: RunConfig, out: Path, dist: Dist, plan: str, overwrite: bool, progress: bool,
          amp_why: str = "given") -> Trainer:
    """Data, model, optimizer and the run directory; the state from checkpoint/last when resuming."""
    from patchbench.data import Loader, holdout_split, prepare
    from patchbench.data.mix import MixupCutmix

    t = cfg.train
    if dist.device.type == "cpu":
        keep_freed_memory()  # each step's activations reuse mapped pages instead of faulting in fresh ones
    # data: the first process on each node decodes (once), the others then load its cache
    if dist.local_rank == 0:
        data = prepare(cfg.data, progress=progress and dist.main)
    dist.barrier()
    if dist.local_rank != 0:
        data = prepare(cfg.data, progress=False)
    train_split, eval_split, split_name = data.train, data.val, "val"
    if cfg.data.holdout:
        train_split, eval_split = holdout_split(data.train, cfg.data.holdout, cfg.data.holdout_seed)
        split_name = "holdout"
    for name, split in (("training", train_split), (split_name, eval_split)):
        if len(split) == 0:
            raise UserError(f"the {name} split of {cfg.data.source} has no usable images ({len(data.skipped)} "
                            f"unreadable); check the dataset")
    classes, per_rank = data.classes, t.batch_size // dist.world_size
    macs_at = check_sizes(cfg, len(classes))  # a model that cannot take a training size fails before the probe
    recorded = rundir.read_config(out).get("derived", {}).get("speed") if plan == "resume" else None
    speed = resolve_speed(cfg, dist, len(classes), per_rank, recorded, progress)
    loader_args = {"device": dist.device, "seed": t.seed, "rank": dist.rank, "world_size": dist.world_size,
                       "channels_last": speed.choice.channels_last,  # batches arrive in the model's memory format
                       "hold_on_device": {"auto": None, "yes": True, "no": False}[t.data_on_device]}
    train_loader = Loader(train_split, cfg.data, batch_size=per_rank, train=True, **loader_args)
    steps = plan_run(cfg, len(train_loader), macs_at)
    val_loader = Loader(eval_split, cfg.data, batch_size=max(per_rank, 64), train=False, **loader_args)
    fit_loader = None
    if t.fit_eval:  # the same images every epoch and every run of the data: seeded by nothing but the split
        rows = np.sort(np.random.default_rng(0).permutation(len(train_split))[:t.fit_eval])
        fit_loader = Loader(train_split.subset(rows), cfg.data, batch_size=max(per_rank, 64), train=False,
                            **loader_args)

    seed_everything(t.seed, t.deterministic)
    model = build_model(cfg, len(classes))
    swapped = use_fast_kernels(model) if speed.choice.fast_kernels else 0  # same function, faster CPU step
    if t.sync_bn and dist.world_size > 1:
        model = convert_sync_batchnorm(model)
    model.to(dist.device, memory_format=torch.channels_last if speed.choice.channels_last else torch.preserve_format)
    optimizer = create_optimizer(model, t)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=t.amp == "fp16")
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    step_model = model
    if dist.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if t.compile:
        step_model = torch.compile(step_model)
    adaptive = t.threads is None and not t.deterministic and dist.device.type == "cpu"
    trainer = Trainer(
        cfg=cfg, out=out, dist=dist, classes=classes, eval_split=split_name, train_loader=train_loader,
        val_loader=val_loader, fit_loader=fit_loader, model=model, step_model=step_model, optimizer=optimizer, scaler=scaler, ema=ema,
        mix=MixupCutmix(cfg.data, len(classes), t.label_smoothing, t.seed) if cfg.data.mixup or cfg.data.cutmix
        else None,
        tuner=ThreadTuner() if adaptive else None, speed=speed, kernel_layers=swapped, plan=steps, macs_at=macs_at,
        total_steps=steps.steps if t.compute_budget else total_steps(t, len(train_loader)),
        summary_base={"model": cfg.model.name, "label": label(cfg.model.name, cfg.model.overrides),
                      "params": count_params(model), "macs": macs_at[cfg.data.img_size], "img_size": cfg.data.img_size,
                      "patch_size": getattr(model, "patch_size", None), "epochs": steps.epochs,
                      "steps": steps.steps, "budget_macs": t.compute_budget,
                      "eval_split": split_name, "device": str(dist.device), "world_size": dist.world_size},
        info={"model": {"name": cfg.model.name, "overrides": cfg.model.overrides, "img_size": cfg.data.img_size},
              "classes": classes, "config": cfg.to_dict(),
              "eval_transform": {k: getattr(cfg.data, k) for k in ("prepare_size", "img_size", "eval_crop", "mean",
                                                                   "std")}})
    digest = data_digest(train_split, eval_split)
    if plan == "resume":
        before = rundir.read_config(out).get("derived", {}).get("data_digest")
        if before is not None and before != digest:
            raise UserError(f"--data {cfg.data.source}: its images or labels differ from those the run in {out} trained "
                            f"on; resume with the run's own data, or start a new run with another --out")
        if dist.main:
            remove_leftovers(out / rundir.CHECKPOINT)
            rundir.upgrade_run(out)  # a run of an earlier schema goes on in this one
        state = restore(out / rundir.CHECKPOINT, classes, model, optimizer, scaler, ema,
                        lambda msg: log(trainer, progress, msg))
        trainer.epoch, trainer.start_batch, trainer.step = state["epoch"], state["batch"], state["step"]
        trainer.wall_before, trainer.best_loss = state["wall_time_s"], state["best_val_loss"]
        trainer.partial_sums = state.get("train_sums")
        torn = []
        trainer.rows = [r for r in rundir.read_metrics(out / rundir.METRICS, on_torn=torn.append) if r["epoch"] <= trainer.epoch]
        log(trainer, progress, *torn, f"resuming {out} at epoch {trainer.epoch + 1}, batch {trainer.start_batch} (step {trainer.step}); "
            f"{speed.choice} ({speed.how})")
    elif dist.main:
        if overwrite:
            clear_run_dir(out)
        rundir.make_dir(out)
        doc = {"schema": rundir.SCHEMA, **cfg.to_dict(), "env": environment(dist.device, dist.world_size),
               "derived": {"per_rank_batch_size": per_rank, "steps_per_epoch": len(train_loader),
                           "schedule_steps": trainer.total_steps, "classes": classes, "num_train": len(train_split),
                           "num_eval": len(eval_split), "eval_split": split_name, "steps": steps.steps,
                           "epochs": steps.epochs, "size_phases": [list(p) for p in steps.phases],
                           "planned_train_macs": steps.train_macs, "amp": amp_why, "speed": speed.record(),
                           "data_digest": digest, "crop": train_loader.crop_path(),
                           "kernels": kernels_used(swapped, t.fast_kernels is not False and dist.device.type == "cpu")}}
        rundir.atomic_write_json(out / rundir.CONFIG, doc)
    dist.barrier()
    if dist.main:  # drop lines of epochs after the checkpoint (written just before a crash)
        rundir.write_metrics(out / rundir.METRICS, trainer.rows)
        from torch.utils.tensorboard import SummaryWriter

        trainer.writer = SummaryWriter(str(out / rundir.TB), purge_step=trainer.step)
    return trainer


def data_digest(*splits) -> str:
    """A digest of the splits' content: every label, and the pixels of up to 256 images spread over each
    split (cheap: ~20 MB read), so that a resumed run can tell other data from its own."""
    import hashlib

    h = hashlib.sha256()
    for split in splits:
        labels = np.asarray(split.labels)
        h.update(labels.tobytes())
        rows = [split.row_of(np.array([i]))[0] for i in range(0, len(labels), max(1, len(labels) // 256))]
        for r in rows:
            h.update(np.asarray(split.images[r]).tobytes())
    return h.hexdigest()[:16]


def kernels_used(swapped: int, wanted: bool) -> str:
    """What config.json says of patchbench.cpu's layers: how many run its operators, or why none do."""
    from patchbench.cpu import build

    if swapped:
        return f"{swapped} layers (depthwise conv, GELU -> BatchNorm)"
    if not wanted:
        return "off"
    return f"none: {build.FAILURE}" if build.FAILURE else "none: no layer of this model fits them"


def resolve_speed(cfg: RunConfig, dist: Dist, num_classes: int, per_rank: int, recorded: dict | None,
                  progress: bool) -> Resolution:
    """The layout and kernels to train with here (`auto`: probed or cached, see patchbench.autotune);
    decided by rank 0 and shared, so that every rank's parameters have the same memory format."""
    t = cfg.train
    if dist.main:
        say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
        speed = resolve(lambda: build_model(cfg, num_classes), channels_last=t.channels_last,
                        fast_kernels=t.fast_kernels, device=dist.device, batch_size=per_rank,
                        img_size=max(cfg.data.train_sizes or (cfg.data.img_size,)), amp=t.amp,
                        num_classes=num_classes, setting={"model": cfg.model.name, "overrides": cfg.model.overrides,
                                                          "init": t.init},
                        cache_dir=cache_root(cfg.data.cache_dir), recorded=recorded,
                        deterministic=t.deterministic, log=say)
    if dist.world_size > 1:
        shared = [speed.record() if dist.main else None]
        torch_dist.broadcast_object_list(shared, src=0)
        speed = Resolution.from_record(shared[0])
    return speed


def resolve_run_amp(cfg: RunConfig, out: Path, device: torch.device, fresh: bool) -> tuple[str, str]:
    """(precision, why): `amp=auto` made concrete. The run's own precision when it exists already and
    is not being replaced (kept on resume, on any machine), else bf16 where `device` computes it
    natively and fp32 elsewhere."""
    if cfg.train.amp != "auto":
        return cfg.train.amp, "given"
    try:
        saved = None if fresh or not (out / rundir.CONFIG).exists() else rundir.read_config(out)["train"]["amp"]
    except (KeyError, TypeError, rundir.RunFileError):
        saved = None
    if saved not in (None, "auto"):
        return saved, "auto: kept from the run's config.json"
    return resolve_amp("auto", device)


def resolve_config(cfg: RunConfig, progress: bool = False) -> tuple[RunConfig, list[str]]:
    """`cfg` with every `auto` replaced by what a new run on this machine resolves it to, and a line on
    how each was decided (`train --resolve --dump-config`)."""
    from patchbench.data import prepare

    device = resolve_device(cfg.train.device)
    amp, amp_why = resolve_amp(cfg.train.amp, device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=amp))
    classes = prepare(cfg.data, progress=progress).classes
    check_sizes(cfg, len(classes))
    speed = resolve_speed(cfg, Dist(0, 1, 0, device), len(classes), cfg.train.batch_size, None, progress)
    cfg.train = dataclasses.replace(cfg.train, channels_last=speed.choice.channels_last,
                                    fast_kernels=speed.choice.fast_kernels)
    return cfg, [f"amp = {amp!r}: {amp_why}", f"channels_last, fast_kernels: {speed.choice} ({speed.how})"]


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm for DDP on GPUs. Refuses models whose BatchNorms carry more than normalisation
    (the fused GELUBatchNorm2d would lose its GELU in torch's conversion)."""
    from patchbench.cpu.layers import GELUBatchNorm2d

    if any(isinstance(m, GELUBatchNorm2d) for m in model.modules()):
        raise UserError("--sync-bn cannot convert the fused GELU -> BatchNorm layers of patchbench.cpu; "
                        "use --no-fast-kernels with --sync-bn")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def restore(folder: Path, classes: list[str], model: nn.Module, optimizer, scaler, ema: EMA | None,
            say=lambda msg: None) -> dict:
    """Load the run's newest consistent checkpoint (`last`, else `best`, saying so) into the model,
    optimizer, GradScaler, EMA and RNGs; return its JSON state."""
    try:
        state, weights, tensors = load_checkpoint(folder / "last.json")
    except UserError as e:
        if not (folder / "best.json").exists():
            raise
        state, weights, tensors = load_checkpoint(folder / "best.json")
        say(f"{e}; resuming from {folder / 'best.json'} (the end of epoch {state['epoch']}) instead")
    if state["classes"] != classes:
        raise UserError(f"the data's classes {classes[:3]}... differ from the run's {state['classes'][:3]}...; "
                        f"resume with the dataset the run was trained on")
    # NAME.safetensors holds the evaluated weights: the EMA's when it is on, the raw ones then in the state file
    raw = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")} if ema else weights
    load_weights(model, raw, folder)
    if ema is not None:
        load_weights(ema.module, weights, folder)
    optimizer_from_parts(optimizer, state["optimizer"], tensors)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng_from_parts(state["rng"], tensors)
    return state


def log(trainer: Trainer, progress: bool, *messages: str) -> None:
    if progress and trainer.dist.main:
        for msg in messages:
            tqdm.write(msg, file=sys.stderr)


def save(trainer: Trainer, name: str, batch: int, sums: list[float] | None) -> None:
    """Checkpoint `name`; every rank takes part (metric sums are reduced), rank 0 writes."""
    opt_doc, opt_tensors = optimizer_to_parts(trainer.optimizer)
    rng_doc, rng_tensors = rng_to_parts()
    tensors = {**opt_tensors, **rng_tensors}
    if trainer.ema is not None:
        tensors.update({f"model.{k}": v for k, v in trainer.model.state_dict().items()})
    if trainer.dist.main:
        state = {**trainer.info, "epoch": trainer.epoch, "batch": batch, "step": trainer.step, "world_size": trainer.dist.world_size,
                 "optimizer": opt_doc, "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
                 "rng": rng_doc, "train_sums": sums, "wall_time_s": trainer.wall(), "best_val_loss": trainer.best_loss,
                 "eval_weights": "ema" if trainer.ema is not None else "model"}
        save_checkpoint(trainer.out / rundir.CHECKPOINT, name, trainer.eval_model.state_dict(), state, tensors)


def write_summary(trainer: Trainer, status: str, error: str | None = None) -> dict:
    summary = {"schema": rundir.SCHEMA, "status": status, **trainer.summary_base, **summarise(trainer.rows, trainer.wall(), trainer.cfg.train.batch_size)}
    if error:
        summary["error"] = error
    if trainer.dist.main:
        rundir.atomic_write_json(trainer.out / rundir.SUMMARY, summary)
    return summary


def summarise(rows: list[dict], wall: float, batch_size: int) -> dict:
    """summary.json's figures from the metrics rows (accuracies as fractions).

    The best epoch is the one with the lowest validation loss, the same rule that picks
    checkpoint/best; lowest_loss_top1 is that epoch's top-1 (an optimistic figure: chosen on the split it
    is measured on)."""
    out = {"epochs_done": len(rows), "wall_time_s": round(wall, 2)}
    if rows:
        best = min(rows, key=lambda r: r["val_loss"])
        out.update(final_top1=rows[-1]["val_top1"], final_top5=rows[-1]["val_top5"],
                   final_val_loss=rows[-1]["val_loss"], lowest_loss_top1=best["val_top1"],
                   lowest_loss_epoch=best["epoch"],
                   train_images_per_s=rows[-1]["train_images_per_s"],
                   infer_images_per_s=rows[-1]["infer_images_per_s"],
                   epochs_time_s=round(sum(r["epoch_time_s"] for r in rows), 2),
                   train_macs=rows[-1].get("train_macs"), images_seen=rows[-1]["step"] * batch_size)
    return out


# ----------------------------------------------------------------------------- the loops


def epoch_batches(trainer: Trainer):
    """(batch index, x, y) of the current epoch from batch `trainer.start_batch`, each part of it at the size the
    plan gives it (progressive resizing may change the size inside an epoch of a budgeted run)."""
    for first, end, size in trainer.plan.segments(trainer.epoch):
        if end <= trainer.start_batch:
            continue
        begin = max(first, trainer.start_batch)
        trainer.train_loader.set_epoch(trainer.epoch, img_size=size, start_batch=begin)
        for b, (x, y) in enumerate(trainer.train_loader, start=begin):
            yield b, x, y
            if b == end - 1:
                break


def train_one_epoch(trainer: Trainer, meter: Meter, stop: StopFlag, bar) -> int | None:
    """Train the current epoch from batch `trainer.start_batch`. Returns None when done, or the next batch
    when a stop signal cut it short. Raises TrainingDiverged on a NaN/inf loss."""
    t, dist = trainer.cfg.train, trainer.dist
    trainer.model.train()
    last = trainer.plan.steps_in(trainer.epoch) - 1  # a compute budget may end the last epoch early
    since, images, tick = 0, 0, time.perf_counter()
    for b, x, y in epoch_batches(trainer):
        if trainer.tuner is not None:
            trainer.tuner.step_begins()
        lr, beta1 = lr_at(trainer.step, trainer.total_steps, t)
        set_lr(trainer.optimizer, lr, beta1)
        target = trainer.mix(x, y, trainer.epoch, b) if trainer.mix is not None else y  # x is mixed in place
        with autocast(dist.device, t.amp):
            logits = trainer.step_model(x).float()  # (B, num_classes)
        # soft targets (mixup/cutmix) carry their own smoothing; top-1 is counted against the hard label y
        loss = F.cross_entropy(logits, target, label_smoothing=0.0 if trainer.mix is not None else t.label_smoothing)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        if t.grad_clip:
            trainer.scaler.unscale_(trainer.optimizer)
            nn.utils.clip_grad_norm_(trainer.model.parameters(), t.grad_clip)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
        meter.update(logits.detach(), y, loss.detach() * len(y))
        trainer.step, since, images = trainer.step + 1, since + 1, images + len(y) * dist.world_size
        if trainer.tuner is not None:
            trainer.tuner.step_ends()
        stop_now = stop.signum is not None and dist.world_size == 1  # under DDP, ranks agree at log points
        if trainer.step % t.log_every and b != last and not stop_now:
            continue
        # every log_every steps: one sync for the progress bar, the NaN check and the stop signal
        flags = torch.tensor([float(stop.signum is not None), float(not torch.isfinite(meter.sums[0]))])
        if dist.world_size > 1:
            flags = flags.to(dist.device)
            torch_dist.all_reduce(flags)
        if flags[1] > 0:
            raise TrainingDiverged(f"loss became {meter.sums[0].item()} at epoch {trainer.epoch + 1}, step {trainer.step}; "
                                   f"lower --lr, set --grad-clip, or use --amp bf16 instead of fp16")
        rate = images / (time.perf_counter() - tick)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        bar.update(since)
        if trainer.writer is not None:
            trainer.writer.add_scalar("train/loss", loss.item(), trainer.step)
            trainer.writer.add_scalar("train/lr", lr, trainer.step)
        since, images, tick = 0, 0, time.perf_counter()
        if flags[0] > 0 and b != last:
            return b + 1
        if b == last:
            break
    return None


def validate(trainer: Trainer) -> dict:
    val = evaluate_model(trainer.eval_model, trainer.val_loader, len(trainer.classes), amp=trainer.cfg.train.amp,
                         channels_last=trainer.speed.choice.channels_last)
    if not math.isfinite(val["loss"]):
        raise TrainingDiverged(f"validation loss is {val['loss']} after epoch {trainer.epoch}; lower --lr or set --grad-clip")
    if trainer.fit_loader is not None:
        fit = evaluate_model(trainer.eval_model, trainer.fit_loader, len(trainer.classes), amp=trainer.cfg.train.amp,
                             channels_last=trainer.speed.choice.channels_last, confusion=False)
        val["fit"] = {"loss": fit["loss"], "top1": fit["top1"]}
    return val


def run_epochs(trainer: Trainer, stop: StopFlag, progress: bool) -> dict | None:
    """Epochs from where the trainer stands to the end; returns the final weights' validation, or
    None when a stop signal ended it early (the run is then checkpointed)."""
    t, dist = trainer.cfg.train, trainer.dist
    val = None
    while trainer.epoch < trainer.plan.epochs:
        size, steps = trainer.plan.size_at_end(trainer.epoch), trainer.plan.steps_in(trainer.epoch)
        meter = Meter(len(trainer.classes), dist.device)
        if trainer.partial_sums is not None and dist.main:  # the part of this epoch trained before a stop
            meter.sums += torch.tensor(trainer.partial_sums, dtype=torch.float64, device=dist.device)
        trainer.partial_sums = None
        trained = (steps - trainer.start_batch) * t.batch_size  # images trained by this process
        threads_before = dict(trainer.tuner.steps_at) if trainer.tuner is not None else None
        tick = time.perf_counter()
        with tqdm(total=steps, initial=trainer.start_batch, desc=f"epoch {trainer.epoch + 1}/{trainer.plan.epochs}",
                  disable=not (progress and dist.main), leave=False, file=sys.stderr, unit="step") as bar:
            cut = train_one_epoch(trainer, meter, stop, bar)
        train_time = time.perf_counter() - tick
        sums = meter.all_reduce().sums.tolist()
        if cut is not None:
            save(trainer, "last", cut, sums)
            return None
        train = meter.result()
        trainer.epoch, trainer.start_batch = trainer.epoch + 1, 0
        val = validate(trainer)
        trainer.rows.append({"epoch": trainer.epoch, "step": trainer.step, "lr": trainer.optimizer.param_groups[0]["lr"],
                       "train_loss": train["loss"], "train_top1": train["top1"], "val_loss": val["loss"],
                       "val_top1": val["top1"], "val_top5": val["top5"], "img_size": size,
                       **({"fit_loss": val["fit"]["loss"], "fit_top1": val["fit"]["top1"]} if "fit" in val else {}),
                       "train_macs": sum(trainer.plan.epoch_macs(e, t.batch_size, trainer.macs_at) for e in range(trainer.epoch)),
                       "epoch_time_s": round(train_time + val["time_s"], 3),
                       "train_images_per_s": round(trained / train_time, 1),
                       "infer_images_per_s": round(val["images"] / val["time_s"], 1),
                       "threads": round(trainer.tuner.mean_threads(threads_before), 2) if trainer.tuner is not None
                       else torch.get_num_threads(), "channels_last": trainer.speed.choice.channels_last,
                       "fast_kernels": trainer.kernel_layers > 0, "processor": trainer.processor})
        if dist.main:  # the metrics line first: a crash before the checkpoint redoes the epoch
            rundir.append_metrics(trainer.out / rundir.METRICS, trainer.rows[-1])
            for k in ("train_loss", "val_loss", "val_top1", "val_top5", "train_images_per_s"):
                trainer.writer.add_scalar(f"epoch/{k}", trainer.rows[-1][k], trainer.step)
            trainer.writer.flush()
        if val["loss"] < trainer.best_loss:
            trainer.best_loss = val["loss"]
            save(trainer, "best", 0, None)
        save(trainer, "last", 0, None)
        r = trainer.rows[-1]
        log(trainer, progress, f"epoch {trainer.epoch}/{trainer.plan.epochs}  train_loss {r['train_loss']:.4f}  val_loss {r['val_loss']:.4f}  "
            f"top1 {r['val_top1']:.4f}  top5 {r['val_top5']:.4f}  {r['epoch_time_s']:.1f}s  "
            f"{r['train_images_per_s']:.0f} img/s" + (f"  {size}px" if size != trainer.cfg.data.img_size else ""))
        write_summary(trainer, rundir.RUNNING)
        if stop.signum is not None:
            break
    if trainer.epoch < trainer.plan.epochs:
        return None
    return val if val is not None else validate(trainer)  # validate: a resumed run whose epochs were all done


def train_run(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Train `cfg` into `out_dir` and return summary.json's dict.

    resume=True continues the run in `out_dir` from its last checkpoint (a finished run returns its
    summary without work; an empty or missing folder starts a new run). overwrite=True replaces a
    previous run there. Raises UserError for bad input, TrainingDiverged on a NaN/inf loss and
    KeyboardInterrupt after checkpointing on SIGINT/SIGTERM.
    """
    cfg.validate()
    check_overrides(cfg.model.name, cfg.model.overrides, "model argument")  # an unknown name or argument: now
    out = Path(out_dir)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dist = setup_distributed(cfg.train.device)
    try:
        t = cfg.train
        if t.batch_size % dist.world_size:
            raise UserError(f"--batch-size {t.batch_size} (global) does not split over {dist.world_size} processes; "
                            f"use a multiple of {dist.world_size}")
        if t.sync_bn and dist.device.type != "cuda":
            raise UserError("--sync-bn needs GPUs (SyncBatchNorm runs on CUDA only); drop it for CPU runs")
        amp, amp_why = resolve_run_amp(cfg, out, dist.device, fresh=overwrite)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=amp))
        plan = plan_run_dir(out, cfg, resume, overwrite)
        dist.barrier()  # every rank checks before anyone writes (rank 0's probe file below would look like a foreign one)
        if plan == "finished":
            return rundir.read_summary(out / rundir.SUMMARY)
        if dist.main:  # before the data is prepared: a folder that cannot be written fails now
            rundir.check_writable_dir(out, "--resume" if resume else "--out")
        dist.barrier()
        trainer = setup(cfg, out, dist, plan, overwrite, progress, amp_why)
        try:
            return _run(trainer, progress)
        except rundir.OutputError as e:  # a full disk mid-run: the checkpoint on disk is intact
            raise rundir.OutputError(f"{e}; the run goes on from its last checkpoint with "
                                     f"`patchbench train --resume {out}`") from None
    finally:
        torch.set_num_threads(threads)
        if dist.owns_group:
            torch_dist.destroy_process_group()


def _run(trainer: Trainer, progress: bool) -> dict:
    """run_epochs with the run directory kept truthful: a summary saying how it ended, eval.json at the end."""
    with StopFlag() as stop:
        try:
            write_summary(trainer, rundir.RUNNING)
            val = run_epochs(trainer, stop, progress)
        except TrainingDiverged as e:
            write_summary(trainer, rundir.FAILED, str(e))
            raise
        except BaseException as e:  # a crash, a full disk, Ctrl-C twice: the run can be resumed
            if trainer.dist.main:
                try:
                    write_summary(trainer, rundir.INTERRUPTED, f"stopped by {type(e).__name__}: {str(e)[:200]}")
                except (OSError, UserError):
                    pass  # the disk that failed may refuse this too; the checkpoint is what resume needs
            raise
        finally:
            if trainer.writer is not None:
                trainer.writer.close()
    if trainer.epoch < trainer.plan.epochs:
        write_summary(trainer, rundir.INTERRUPTED, f"stopped by signal {stop.signum}")
        trainer.dist.barrier()
        raise KeyboardInterrupt(f"stopped by signal {stop.signum}; checkpoint saved, continue with "
                                f"`patchbench train --resume {trainer.out}`")
    if trainer.dist.main:
        result = {"classes": trainer.classes, "split": trainer.eval_split,
                  **{k: val[k] for k in ("loss", "top1", "top5", "per_class_top1", "confusion", "images")}}
        rundir.atomic_write_json(trainer.out / rundir.EVAL, result, indent=1)
    summary = write_summary(trainer, rundir.FINISHED)
    trainer.dist.barrier()
    return summary
