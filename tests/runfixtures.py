"""Build run and study directories by hand, exactly as docs/ARCHITECTURE.md's contract says.

Report and compare tests use these instead of training: every number in a fixture is chosen here,
so a test can check that the report shows exactly these numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ["tench", "springer", "cassette", "chain saw"]


def run_config(model: str, seed: int, *, overrides: dict | None = None, img_size: int = 32,
               epochs: int = 3, preset: str = "fixture") -> dict:
    """A config.json as train writes it: RunConfig.to_dict() plus "env"."""
    return {
        "model": {"name": model, "overrides": dict(overrides or {})},
        "data": {"source": "fixture", "prepare_size": img_size, "img_size": img_size},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "seed": seed},
        "preset": preset,
        "quirks": [],
        "env": {"torch": "2.x", "device": "cpu", "world_size": 1},
    }


def write_run(run_dir: Path, *, model: str, seed: int, val_top1: list[float], overrides: dict | None = None,
              params: int = 1000, macs: int = 50_000, img_size: int = 32, status: str = "finished",
              epochs: int | None = None, patch_size: int | None = None, train_ips: float = 100.0,
              infer_ips: float = 400.0, wall_time_s: float = 60.0, confusion: list[list[int]] | None = None,
              truncate_metrics: bool = False, write_summary: bool = True, write_eval: bool = True) -> Path:
    """One run directory whose per-epoch val accuracy is `val_top1` (fractions in [0, 1]).

    Losses are derived from accuracies (train_loss = 2 - 2 * acc, val_loss = 2.2 - 2 * acc) so tests can
    predict them. `status` other than "finished" writes a partial summary (epochs_done = len(val_top1)
    of `epochs`); `truncate_metrics` cuts the last line of metrics.jsonl in half, as a crash mid-write does.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = len(val_top1) if epochs is None else epochs
    (run_dir / "config.json").write_text(json.dumps(
        run_config(model, seed, overrides=overrides, img_size=img_size, epochs=epochs), indent=2))
    lines = []
    for i, acc in enumerate(val_top1):
        lines.append(json.dumps({
            "epoch": i + 1, "step": (i + 1) * 10, "lr": 1e-3, "train_loss": 2 - 2 * acc,
            "train_top1": min(1.0, acc + 0.05), "val_loss": 2.2 - 2 * acc, "val_top1": acc,
            "val_top5": min(1.0, acc + 0.3), "epoch_time_s": wall_time_s / epochs, "train_images_per_s": train_ips,
        }))
    text = "\n".join(lines) + "\n"
    if truncate_metrics:
        text = text[: len(text) - len(lines[-1]) // 2 - 1]
    (run_dir / "metrics.jsonl").write_text(text)
    if write_summary:
        best = int(np.argmax(val_top1)) if val_top1 else None  # val_loss falls as top-1 rises
        summary = {
            "schema": 2, "status": status, "model": model, "params": params, "macs": macs, "img_size": img_size,
            "epochs": epochs, "epochs_done": len(val_top1),
            "final_top1": val_top1[-1] if val_top1 else None,
            "final_top5": min(1.0, val_top1[-1] + 0.3) if val_top1 else None,
            "final_val_loss": 2.2 - 2 * val_top1[-1] if val_top1 else None,
            "lowest_loss_top1": val_top1[best] if val_top1 else None,
            "lowest_loss_epoch": best + 1 if val_top1 else None,
            "wall_time_s": wall_time_s, "train_images_per_s": train_ips, "infer_images_per_s": infer_ips,
            "device": "cpu", "patch_size": patch_size,
        }
        if status == "failed":
            summary["error"] = "loss became NaN at step 12"
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if write_eval and status == "finished" and val_top1:
        n = len(CLASSES)
        if confusion is None:  # diagonal-heavy: accuracy about val_top1[-1]
            hit = round(val_top1[-1] * 10)
            confusion = [[hit if i == j else (10 - hit) // (n - 1) for j in range(n)] for i in range(n)]
        conf = np.array(confusion)
        per_class = (np.diag(conf) / conf.sum(1)).tolist()
        (run_dir / "eval.json").write_text(json.dumps({
            "classes": CLASSES, "loss": 2.2 - 2 * val_top1[-1], "top1": float(np.trace(conf) / conf.sum()),
            "top5": 1.0, "per_class_top1": per_class, "confusion": conf.tolist(),
        }))
    return run_dir


def write_samples(study: Path, *, n: int = 3, size: int = 32) -> Path:
    """samples.npz: n random uint8 images (n, size, size, 3), their labels and the class names."""
    rng = np.random.default_rng(0)
    path = Path(study) / "samples.npz"
    np.savez(path, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             labels=np.arange(n) % len(CLASSES), classes=np.array(CLASSES))
    return path


# Final accuracies chosen so the statistics are easy to check by hand:
#   convmixer: 0.80, 0.82, 0.84 -> mean 0.82, sample std 0.02
#   vit:       0.60, 0.64, 0.62 -> mean 0.62, sample std 0.02
COMPARE_CURVES = {
    "convmixer_256_8": [[0.50, 0.70, 0.80], [0.52, 0.71, 0.82], [0.55, 0.75, 0.84]],
    "vit_tiny_6l8h": [[0.40, 0.55, 0.60], [0.42, 0.66, 0.64], [0.41, 0.58, 0.62]],
}
COMPARE_INFO = {
    "convmixer_256_8": {"params": 594_186, "macs": 147_000_000, "patch_size": 2, "train_ips": 120.0, "infer_ips": 480.0},
    "vit_tiny_6l8h": {"params": 907_914, "macs": 14_000_000, "patch_size": 16, "train_ips": 300.0, "infer_ips": 1500.0},
}


def write_compare_study(study: Path, *, img_size: int = 32) -> Path:
    """A finished two-model, three-seed study (see COMPARE_CURVES), with study.json and samples.npz."""
    study = Path(study)
    for model, curves in COMPARE_CURVES.items():
        for seed, curve in enumerate(curves):
            write_run(study / "runs" / f"{model}-s{seed}", model=model, seed=seed, val_top1=curve,
                      img_size=img_size, wall_time_s=60.0 + seed, **COMPARE_INFO[model])
    (study / "study.json").write_text(json.dumps({
        "preset": "fixture", "models": list(COMPARE_CURVES), "seeds": [0, 1, 2], "data": "fixture",
        "param_budget": None, "chosen": {m: {} for m in COMPARE_CURVES},
    }))
    write_samples(study, size=img_size)
    return study


def write_sweep_study(study: Path) -> Path:
    """A 2x2 sweep of convmixer over patch_size x kernel_size, one seed; final top-1 = 0.5 + p/100 + k/50."""
    study = Path(study)
    for p in (2, 4):
        for k in (3, 5):
            acc = 0.5 + p / 100 + k / 50
            write_run(study / "runs" / f"convmixer_256_8-patch_size={p}-kernel_size={k}-s0",
                      model="convmixer_256_8", seed=0, val_top1=[acc - 0.1, acc],
                      overrides={"patch_size": p, "kernel_size": k}, patch_size=p)
    (study / "study.json").write_text(json.dumps({
        "preset": "fixture", "models": ["convmixer_256_8"], "seeds": [0], "data": "fixture",
        "param_budget": None, "chosen": {}, "grid": {"patch_size": [2, 4], "kernel_size": [3, 5]},
    }))
    write_samples(study)
    return study
