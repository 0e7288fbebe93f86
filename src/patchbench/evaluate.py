"""Evaluate a model on a split, and load a checkpoint to evaluate it or to classify image files.

Everything needed to rebuild the model and its input transform (model name and overrides, class
names, prepare size, eval crop, normalisation) is in the checkpoint's JSON, so `predict` needs no
config or dataset. Loading reads safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchbench.checkpoint import checkpoint_json, load_checkpoint, load_weights
from patchbench.config import RunConfig
from patchbench.device import autocast, resolve_device
from patchbench.errors import UserError
from patchbench.metrics import Meter
from patchbench.models import create_model


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, num_classes: int, *, amp: str = "none",
                   channels_last: bool = False, confusion: bool = True) -> dict:
    """Loss, top-1/top-5 (and per-class accuracy + confusion matrix) over every image of `loader`.

    Sums are all-reduced over data-parallel ranks, so each rank returns the whole split's figures.
    """
    was_training = model.training
    model.eval()
    meter = Meter(num_classes, loader.device, confusion=confusion)
    start = time.perf_counter()
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(loader.device, amp):
            logits = model(x).float()
        meter.update(logits, y, F.cross_entropy(logits, y, reduction="sum"))
    out = meter.all_reduce().result()
    out["time_s"] = time.perf_counter() - start
    model.train(was_training)
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in a checkpoint (run dir, checkpoint .json or .safetensors): (model, info)."""
    info, weights, _ = load_checkpoint(path, with_state=False)
    m = info["model"]
    model = create_model(m["name"], num_classes=len(info["classes"]), **{**m["overrides"], "img_size": m["img_size"]})
    load_weights(model, weights, checkpoint_json(path))
    return model.to(device).eval(), info


def evaluate_run(path: str | Path, data: str | None = None, *, device: str = "auto", batch_size: int = 128,
                 cache_dir: str | None = None, progress: bool = True, split: str = "val") -> dict:
    """Evaluate a run's (or a checkpoint's) weights on the full `split` of `data` (default: the run's
    dataset): "val", or "holdout" (the part of train a --holdout run validated on).

    Returns eval.json's dict: classes, split, loss, top1, top5, per_class_top1, confusion (+ images, checkpoint).
    """
    from patchbench.data import (  # the data pipeline: only here, not for predict
        Loader,
        holdout_split,
        prepare,
    )

    if split not in ("val", "holdout"):
        raise UserError(f"--split {split!r}: choose val or holdout")
    dev = resolve_device(device)
    model, info = load_model(path, dev)
    cfg = RunConfig.from_dict(info["config"], f"{checkpoint_json(path)}: config").data
    if data is not None:
        cfg.source, cfg.md5 = data, None
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    prepared = prepare(cfg, progress=progress)
    if prepared.classes != info["classes"]:
        raise UserError(f"--data {cfg.source} has classes {prepared.classes[:4]}..., but the checkpoint "
                        f"was trained on {info['classes'][:4]}...; pass the dataset it was trained on")
    if split == "holdout":
        if not cfg.holdout:
            raise UserError(f"--split holdout: the run in {path} held nothing out (no --holdout); use --split val")
        scored = holdout_split(prepared.train, cfg.holdout, cfg.holdout_seed)[1]
    else:
        scored = prepared.val
    loader = Loader(scored, cfg, batch_size=batch_size, train=False, device=dev)
    result = evaluate_model(model, loader, len(info["classes"]))
    result.pop("time_s")
    return {"classes": info["classes"], "split": split, **result, "checkpoint": str(checkpoint_json(path))}


def _load_image(path: str | Path, transform: dict) -> torch.Tensor:
    """One image file -> uint8 (S, S, 3) as the cache stores it (shorter side to S, centre crop)."""
    from PIL import Image

    from patchbench.data.cache import decode_image

    try:
        return torch.from_numpy(np.array(decode_image(path, transform["prepare_size"])))  # writable copy
    except FileNotFoundError:
        raise UserError(f"image {path}: no such file") from None
    except Image.DecompressionBombError as e:  # the limit `prepare` meets too (PIL's MAX_IMAGE_PIXELS)
        raise UserError(f"image {path}: too large to decode safely ({e}); give a smaller image") from None
    except (OSError, ValueError) as e:  # PIL's "cannot identify image file", or pixels with no RGB reading
        raise UserError(f"image {path}: cannot read it as an RGB image ({e})") from None


@torch.no_grad()
def predict(path: str | Path, images: list[str], *, topk: int = 5, device: str = "cpu") -> list[dict]:
    """Top-k class names and probabilities for each image file, with the checkpoint's eval transform."""
    from patchbench.data.augment import center_crop_boxes, crop_resize_normalize

    if topk < 1:
        raise UserError(f"--topk {topk}: need at least 1")
    dev = resolve_device(device)
    model, info = load_model(path, dev)
    t = info["eval_transform"]
    batch = torch.stack([_load_image(p, t) for p in images]).to(dev)  # (N, S, S, 3) uint8
    boxes = center_crop_boxes(len(images), batch.shape[1], t["eval_crop"])
    x = crop_resize_normalize(batch, boxes, None, t["img_size"], t["mean"], t["std"])
    probs = model(x).float().softmax(dim=1)  # (N, C)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    classes = info["classes"]
    return [{"image": str(p), "top": [{"class": classes[i], "prob": round(v, 6)}
                                      for v, i in zip(vals.tolist(), idx.tolist())]}
            for p, vals, idx in zip(images, top.values, top.indices)]
