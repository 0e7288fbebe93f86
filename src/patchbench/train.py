"""The training loop: `train_run(cfg, out_dir)` trains one model and writes its run directory.

    summary = train_run(get_preset("quick").config_for("resnet9"), "runs/resnet9")

One loop, with the features as switches of the config (mixed precision, channels_last,
torch.compile, EMA of the weights, gradient clipping, data-parallel over torchrun's processes).
The run directory is the record (see docs/ARCHITECTURE.md): config.json, metrics.jsonl, tb/,
checkpoint/{last,best}, summary.json, eval.json.

Exact resume: every random choice of the data is a function of (seed, epoch, batch) and the
schedule is a function of the step, so a checkpoint needs only the weights, the optimizer, the
step and the RNG states (for dropout). A checkpoint is written after every epoch, and also mid-epoch
when SIGINT/SIGTERM arrives (resuming then skips the batches already done).

Data-parallel (torchrun): every process runs this same function. `cfg.train.batch_size` is the
global batch, split evenly over the ranks; each rank trains on its shard of every global batch,
DDP averages the gradients, metrics are summed over ranks, and only rank 0 writes files. All ranks
draw the same global RNG stream (seeded alike), which keeps checkpoints independent of the number
of ranks: a run written by N processes resumes on M.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import patchbench
from patchbench.checkpoint import (atomic_write_text, load_checkpoint, optimizer_from_parts, optimizer_to_parts,
                                   rng_from_parts, rng_to_parts, save_checkpoint)
from patchbench.config import RunConfig
from patchbench.errors import UserError
from patchbench.evaluate import autocast, evaluate_model, resolve_device
from patchbench.flops import count_macs, count_params
from patchbench.kernels import use_fast_kernels
from patchbench.metrics import Meter
from patchbench.models import create_model
from patchbench.models.layers import kaiming_init_
from patchbench.optim import create_optimizer, lr_at, set_lr, total_steps

RUN_FILES = ["config.json", "metrics.jsonl", "summary.json", "eval.json", "checkpoint", "tb"]
# what may differ when resuming: where the data and cache are, and how the run is executed
RESUMABLE_CHANGES = {"data": {"source", "md5", "cache_dir"}, "train": {"device", "log_every", "compile", "threads"}}


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
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group from the environment (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, 0, resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
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
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old[signum])

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


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


def environment(device: torch.device, world_size: int) -> dict:
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "patchbench": patchbench.__version__,
            "python": platform.python_version(), "numpy": np.__version__, "git_commit": commit,
            "device": f"{device} ({name})", "world_size": world_size, "threads": torch.get_num_threads(),
            "hostname": platform.node()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    overrides = dict(cfg.model.overrides)
    if overrides.setdefault("img_size", cfg.data.img_size) != cfg.data.img_size:
        raise UserError(f"model override img_size={overrides['img_size']} differs from the data's img_size="
                        f"{cfg.data.img_size}; set --img-size instead")
    model = create_model(cfg.model.name, num_classes=num_classes, **overrides)
    return kaiming_init_(model) if cfg.train.init == "kaiming" else model


# ----------------------------------------------------------------------------- run directory


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan_run_dir(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> str:
    """What to do with `out`: "new", "resume" (from checkpoint/last) or "finished". Never writes."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the run")
    if overwrite or not out.exists():
        return "new"
    saved = _read_json(out / "config.json")
    if saved is None:
        if any(out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no patchbench run; choose a new or empty "
                            f"folder (or pass --overwrite)")
        return "new"
    name = saved.get("model", {}).get("name")
    if name != cfg.model.name:
        raise UserError(f"run dir {out} belongs to another model ({name}, not {cfg.model.name}); choose "
                        f"another --out, or pass --overwrite to replace it")
    if not resume:
        raise UserError(f"run dir {out} already holds a run of {name}; pass --resume to continue it, "
                        f"--overwrite to start it again, or choose another --out")
    check_compatible(RunConfig.from_dict(saved), cfg, out)
    summary = _read_json(out / "summary.json") or {}
    if summary.get("status") == "finished" and (out / "eval.json").exists():
        return "finished"
    return "resume" if (out / "checkpoint" / "last.json").exists() else "new"


def check_compatible(saved: RunConfig, cfg: RunConfig, out: Path) -> None:
    """Resuming must not change what the run computes; only RESUMABLE_CHANGES may differ."""
    a, b = saved.to_dict(), cfg.to_dict()
    diffs = [f"{section}.{key}" for section in ("model", "data", "train")
             for key in a[section] if a[section][key] != b[section].get(key)
             and key not in RESUMABLE_CHANGES.get(section, set())]
    if diffs:
        keys = ", ".join(diffs)
        raise UserError(f"cannot resume {out} with a different {keys} (it would not continue the same run); "
                        f"resume without changing them, or start a new run with another --out")


def clear_run_dir(out: Path) -> None:
    """Remove a previous run's files (only those a run writes) before starting again."""
    import shutil

    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------- the loop


def train_one_epoch(model, step_model, loader, optimizer, scaler, ema, cfg, *, epoch, step, total,
                    start_batch, meter, stop, ctx, bar, writer) -> tuple[int, int | None]:
    """Train one epoch from batch `start_batch`. Returns (step, None) when done, or (step, next batch)
    when a stop signal cut it short. Raises TrainingDiverged on a NaN/inf loss."""
    t = cfg.train
    model.train()
    last = len(loader) - 1
    since, images, tick = 0, 0, time.perf_counter()
    for b, (x, y) in enumerate(loader):
        if b < start_batch:  # resuming mid-epoch: the same batches, already trained on
            continue
        lr, beta1 = lr_at(step, total, t)
        set_lr(optimizer, lr, beta1)
        with autocast(ctx.device, t.amp):
            logits = step_model(x).float()  # (B, num_classes)
        loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        meter.update(logits.detach(), y, loss.detach() * len(y))
        step, since, images = step + 1, since + 1, images + len(y) * ctx.world_size
        stop_now = stop.signum is not None and ctx.world_size == 1  # under DDP, ranks agree at log points
        if step % t.log_every and b != last and not stop_now:
            continue
        # every log_every steps: one sync for the progress bar, the NaN check and the stop signal
        flags = torch.tensor([float(stop.signum is not None), float(not torch.isfinite(meter.sums[0]))])
        if ctx.world_size > 1:
            flags = flags.to(ctx.device)
            dist.all_reduce(flags)
        if flags[1] > 0:
            raise TrainingDiverged(f"loss became {meter.sums[0].item()} at epoch {epoch + 1}, step {step}; lower --lr, "
                                   f"set --grad-clip, or use --amp bf16 instead of fp16")
        rate = images / (time.perf_counter() - tick)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        bar.update(since)
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", lr, step)
        since, images, tick = 0, 0, time.perf_counter()
        if flags[0] > 0 and b != last:
            return step, b + 1
    return step, None


def train_run(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Train `cfg` into `out_dir` and return summary.json's dict.

    resume=True continues the run in `out_dir` from its last checkpoint (a finished run returns its
    summary without work; an empty or missing folder starts a new run). overwrite=True replaces a
    previous run there. Raises UserError for bad input, TrainingDiverged on a NaN/inf loss and
    KeyboardInterrupt after checkpointing on SIGINT/SIGTERM.
    """
    cfg.validate()
    out = Path(out_dir)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx = setup_distributed(cfg.train.device)
    try:
        return _train(cfg, out, ctx, resume, overwrite, progress)
    finally:
        torch.set_num_threads(threads)
        if ctx.owns_group:
            dist.destroy_process_group()


def restore(path: Path, classes: list[str], model: nn.Module, optimizer, scaler, ema: EMA | None) -> dict:
    """Load a checkpoint into the model, optimizer, GradScaler, EMA and RNGs; return its JSON state."""
    state, weights, tensors = load_checkpoint(path)
    if state["classes"] != classes:
        raise UserError(f"the data's classes {classes[:3]}... differ from the run's {state['classes'][:3]}...; "
                        f"resume with the dataset the run was trained on")
    # NAME.safetensors holds the evaluated weights: the EMA's when it is on, the raw ones then in the state file
    raw = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")} if ema else weights
    model.load_state_dict(raw)
    if ema is not None:
        ema.module.load_state_dict(weights)
    optimizer_from_parts(optimizer, state["optimizer"], tensors)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng_from_parts(state["rng"], tensors)
    return state


def _train(cfg: RunConfig, out: Path, ctx: Dist, resume: bool, overwrite: bool, progress: bool) -> dict:
    from patchbench.data import Loader, prepare

    t = cfg.train
    if t.batch_size % ctx.world_size:
        raise UserError(f"--batch-size {t.batch_size} (global) does not split over {ctx.world_size} processes; "
                        f"use a multiple of {ctx.world_size}")
    if t.sync_bn and ctx.device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (SyncBatchNorm runs on CUDA only); drop it for CPU runs")
    plan = plan_run_dir(out, cfg, resume, overwrite)  # every rank checks before anyone writes
    if plan == "finished":
        return json.loads((out / "summary.json").read_text())
    ctx.barrier()
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress and ctx.main else (lambda msg: None)

    # data: the first process on each node decodes (once), the others then load its cache
    if ctx.local_rank == 0:
        data = prepare(cfg.data, progress=progress and ctx.main)
    ctx.barrier()
    if ctx.local_rank != 0:
        data = prepare(cfg.data, progress=False)
    classes, per_rank = data.classes, t.batch_size // ctx.world_size
    loader_args = dict(device=ctx.device, seed=t.seed, rank=ctx.rank, world_size=ctx.world_size,
                       channels_last=t.channels_last)  # batches arrive in the model's memory format
    train_loader = Loader(data.train, cfg.data, batch_size=per_rank, train=True, **loader_args)
    val_loader = Loader(data.val, cfg.data, batch_size=max(per_rank, 64), train=False, **loader_args)
    steps_per_epoch = len(train_loader)
    total = total_steps(t, steps_per_epoch)

    seed_everything(t.seed, t.deterministic)
    model = build_model(cfg, len(classes))
    if t.fast_kernels and ctx.device.type == "cpu":
        use_fast_kernels(model)  # same function and state_dict, faster CPU step for ConvMixer (docs/PERFORMANCE.md)
    params = count_params(model)
    with torch.device("meta"):
        macs = count_macs(build_model(cfg, len(classes)), cfg.data.img_size)
    if t.sync_bn and ctx.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device, memory_format=torch.channels_last if t.channels_last else torch.preserve_format)
    optimizer = create_optimizer(model, t)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=t.amp == "fp16")
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    step_model = model
    if ctx.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if t.compile:
        step_model = torch.compile(step_model)

    epoch, start_batch, step, wall_before = 0, 0, 0, 0.0
    partial_sums = None
    best_loss, rows = math.inf, []
    if plan == "resume":
        state = restore(out / "checkpoint" / "last.json", classes, model, optimizer, scaler, ema)
        epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        wall_before, best_loss = state["wall_time_s"], state["best_val_loss"]
        partial_sums = state.get("train_sums")
        rows = [r for r in _read_jsonl(out / "metrics.jsonl") if r["epoch"] <= epoch]
        log(f"resuming {out} at epoch {epoch + 1}, batch {start_batch} (step {step})")
    elif ctx.main:
        if overwrite:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {**cfg.to_dict(), "env": environment(ctx.device, ctx.world_size),
               "derived": {"per_rank_batch_size": per_rank, "steps_per_epoch": steps_per_epoch,
                           "schedule_steps": total, "classes": classes, "num_train": len(data.train),
                           "num_val": len(data.val)}}
        atomic_write_text(out / "config.json", json.dumps(doc, indent=2))
    ctx.barrier()
    if ctx.main:  # drop lines of epochs after the checkpoint (written just before a crash)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=step) if ctx.main else None
    eval_model = ema.module if ema is not None else model
    info = {"model": {"name": cfg.model.name, "overrides": cfg.model.overrides, "img_size": cfg.data.img_size},
            "classes": classes, "config": cfg.to_dict(),
            "eval_transform": {k: getattr(cfg.data, k) for k in ("prepare_size", "img_size", "eval_crop", "mean", "std")}}

    def save(name: str, epoch_: int, batch: int, sums: list[float] | None, wall: float) -> None:
        """Checkpoint `name`; every rank takes part (metric sums are reduced), rank 0 writes."""
        opt_doc, opt_tensors = optimizer_to_parts(optimizer)
        rng_doc, rng_tensors = rng_to_parts()
        tensors = {**opt_tensors, **rng_tensors}
        if ema is not None:
            tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
        if ctx.main:
            state = {**info, "epoch": epoch_, "batch": batch, "step": step, "world_size": ctx.world_size,
                     "optimizer": opt_doc, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "rng": rng_doc, "train_sums": sums, "wall_time_s": wall, "best_val_loss": best_loss,
                     "eval_weights": "ema" if ema is not None else "model"}
            save_checkpoint(out / "checkpoint", name, eval_model.state_dict(), state, tensors)

    summary_base = {"model": cfg.model.name, "params": params, "macs": macs, "img_size": cfg.data.img_size,
                    "patch_size": getattr(model, "patch_size", None), "epochs": t.epochs,
                    "device": str(ctx.device), "world_size": ctx.world_size}

    def write_summary(status: str, error: str | None = None) -> dict:
        s = {"status": status, **summary_base, **_summarise(rows, wall_before + time.perf_counter() - started)}
        if error:
            s["error"] = error
        if ctx.main:
            atomic_write_text(out / "summary.json", json.dumps(s, indent=2))
        return s

    started = time.perf_counter()
    val = None
    with StopFlag() as stop:
        try:
            write_summary("running")
            while epoch < t.epochs:
                train_loader.set_epoch(epoch)
                meter = Meter(len(classes), ctx.device)
                if partial_sums is not None and ctx.main:
                    meter.sums += torch.tensor(partial_sums, dtype=torch.float64, device=ctx.device)
                partial_sums = None
                trained = (steps_per_epoch - start_batch) * t.batch_size  # images trained in this session
                tick = time.perf_counter()
                with tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{t.epochs}",
                          disable=not (progress and ctx.main), leave=False, file=sys.stderr, unit="step") as bar:
                    step, cut = train_one_epoch(model, step_model, train_loader, optimizer, scaler, ema, cfg,
                                                epoch=epoch, step=step, total=total, start_batch=start_batch,
                                                meter=meter, stop=stop, ctx=ctx, bar=bar, writer=writer)
                train_time = time.perf_counter() - tick
                sums = meter.all_reduce().sums.tolist()
                if cut is not None:
                    save("last", epoch, cut, sums, wall_before + time.perf_counter() - started)
                    break
                train = meter.result()
                val = evaluate_model(eval_model, val_loader, len(classes), amp=t.amp, channels_last=t.channels_last)
                if not math.isfinite(val["loss"]):
                    raise TrainingDiverged(f"validation loss is {val['loss']} after epoch {epoch + 1}; lower --lr or "
                                           f"set --grad-clip")
                epoch, start_batch = epoch + 1, 0
                rows.append({"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                             "train_loss": train["loss"], "train_top1": train["top1"], "val_loss": val["loss"],
                             "val_top1": val["top1"], "val_top5": val["top5"],
                             "epoch_time_s": round(train_time + val["time_s"], 3),
                             "train_images_per_s": round(trained / train_time, 1),
                             "infer_images_per_s": round(val["images"] / val["time_s"], 1)})
                if ctx.main:  # the metrics line first: a crash before the checkpoint redoes the epoch
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
                    for k in ("train_loss", "val_loss", "val_top1", "val_top5", "train_images_per_s"):
                        writer.add_scalar(f"epoch/{k}", rows[-1][k], step)
                    writer.flush()
                wall = wall_before + time.perf_counter() - started
                if val["loss"] < best_loss:
                    best_loss = val["loss"]
                    save("best", epoch, 0, None, wall)
                save("last", epoch, 0, None, wall)
                r = rows[-1]
                log(f"epoch {epoch}/{t.epochs}  train_loss {r['train_loss']:.4f}  val_loss {r['val_loss']:.4f}  "
                    f"top1 {r['val_top1']:.4f}  top5 {r['val_top5']:.4f}  {r['epoch_time_s']:.1f}s  "
                    f"{r['train_images_per_s']:.0f} img/s")
                write_summary("running")
                if stop.signum is not None:
                    break
        except TrainingDiverged as e:
            write_summary("failed", str(e))
            raise
        finally:
            if writer is not None:
                writer.close()
        if epoch < t.epochs:
            write_summary("interrupted", f"stopped by signal {stop.signum}")
            ctx.barrier()
            raise KeyboardInterrupt(f"stopped by signal {stop.signum}; checkpoint saved, continue with "
                                    f"`patchbench train --resume {out}`")

    if val is None:  # resumed a run whose epochs were all done: score the final weights
        val = evaluate_model(eval_model, val_loader, len(classes), amp=t.amp, channels_last=t.channels_last)
    if ctx.main:
        result = {"classes": classes, **{k: val[k] for k in ("loss", "top1", "top5", "per_class_top1", "confusion",
                                                                "images")}}
        atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    summary = write_summary("finished")
    ctx.barrier()
    return summary


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summarise(rows: list[dict], wall: float) -> dict:
    """summary.json's figures from the metrics rows (accuracies as fractions)."""
    out = {"epochs_done": len(rows), "wall_time_s": round(wall, 2)}
    if rows:
        best = max(rows, key=lambda r: r["val_top1"])
        train_time = sum(r["epoch_time_s"] for r in rows)
        out.update(final_top1=rows[-1]["val_top1"], final_top5=rows[-1]["val_top5"],
                   final_val_loss=rows[-1]["val_loss"], best_top1=best["val_top1"], best_epoch=best["epoch"],
                   train_images_per_s=rows[-1]["train_images_per_s"],
                   infer_images_per_s=rows[-1]["infer_images_per_s"], epochs_time_s=round(train_time, 2))
    return out
