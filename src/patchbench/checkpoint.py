"""Checkpoints as safetensors + JSON, written atomically, loaded without unpickling anything.

A checkpoint `NAME` in a folder is three files:
    NAME.safetensors        the model's weights (a plain state dict: loadable by any safetensors reader)
    NAME.state.safetensors  the training state's tensors: optimizer moments, EMA weights, RNG states
    NAME.json               everything else (epoch, step, optimizer hyper-parameters, GradScaler,
                            Python/NumPy RNG, model name and overrides, class names, eval transform,
                            the run's config) and the SHA-256 of both tensor files

Every file is written under a temporary name in the same folder, flushed to disk, and only when
all three are complete are they renamed into place, the JSON last. A crash while writing leaves the
previous checkpoint untouched; a crash in the microseconds between the renames is detected on load
(the digests in the JSON no longer match) instead of silently mixing two checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from patchbench import rundir
from patchbench.errors import UserError

FORMAT = "patchbench-checkpoint-1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, final: Path) -> None:
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise rundir.output_error(final, e) from None
    except SafetensorError as e:  # safetensors reports a failed write (a full disk) as its own error
        raise rundir.OutputError(f"cannot write {final}: {e}; free some space and run the same command "
                                 f"again") from None


def save_checkpoint(folder: str | os.PathLike, name: str, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], state_tensors: dict[str, torch.Tensor]) -> Path:
    """Write checkpoint `name` (weights, JSON `state`, `state_tensors`) atomically; returns the JSON path."""
    folder = rundir.make_dir(folder)
    final = {"weights": folder / f"{name}.safetensors", "state": folder / f"{name}.state.safetensors",
             "json": folder / f"{name}.json"}
    tmp = {k: rundir.temp_path(p) for k, p in final.items()}
    try:
        _save_tensors(weights, tmp["weights"], final["weights"])
        _save_tensors(state_tensors, tmp["state"], final["state"])
        doc = {"format": FORMAT, **state,
               "sha256": {"weights": _sha256(tmp["weights"]), "state": _sha256(tmp["state"])}}
        rundir.write_bytes_to(tmp["json"], json.dumps(doc, indent=1).encode(), final["json"])
        for key in ("weights", "state", "json"):  # the JSON last: it commits the checkpoint
            rundir.commit(tmp[key], final[key])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return final["json"]


def checkpoint_json(path: str | os.PathLike) -> Path:
    """Accept a run dir, a checkpoint folder, NAME.json or NAME.safetensors; return NAME.json."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoint" / "last.json", path / "last.json"):
            if candidate.exists():
                return candidate
        raise UserError(f"no checkpoint in {path}: expected {path / 'checkpoint' / 'last.json'} "
                        f"(was the run started? pass a run dir or a NAME.json checkpoint)")
    name = path.name
    for suffix in (".state.safetensors", ".safetensors", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    json_path = path.with_name(name + ".json")
    if not json_path.exists():
        raise UserError(f"no checkpoint at {path}: {json_path} is missing (pass a run dir or a "
                        f"checkpoint's .json/.safetensors file)")
    return json_path


def load_checkpoint(path: str | os.PathLike, *, with_state: bool = True
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(JSON state, weights, state tensors) of a checkpoint; never unpickles (safetensors + JSON only).

    `with_state=False` skips the training-state tensors (all that predict/eval need).
    """
    json_path = checkpoint_json(path)
    state = rundir.read_json(json_path)
    if state.get("format") != FORMAT:
        raise UserError(f"{json_path} is not a patchbench checkpoint (format {state.get('format')!r})")
    stem = json_path.name[: -len(".json")]
    files = {"weights": json_path.with_name(stem + ".safetensors"),
             "state": json_path.with_name(stem + ".state.safetensors")}
    wanted = ["weights", "state"] if with_state else ["weights"]
    for key in wanted:
        if not files[key].exists():
            raise UserError(f"checkpoint {json_path} is incomplete: {files[key]} is missing")
        if _sha256(files[key]) != state["sha256"][key]:
            raise UserError(f"checkpoint {json_path} does not match {files[key]} (interrupted while "
                            f"being replaced?); use checkpoint/best or start the run again")
    try:
        weights = load_file(str(files["weights"]))
        tensors = load_file(str(files["state"])) if with_state else {}
    except SafetensorError as e:
        raise UserError(f"cannot read checkpoint {json_path}: {e}") from None
    return state, weights, tensors


# ----------------------------------------------------------------------------- pieces of the state


def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimizer state dict into JSON (hyper-parameters, scalars) and tensors."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def optimizer_from_parts(optimizer: torch.optim.Optimizer, doc: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in doc.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in doc["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_parts() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, NumPy, torch CPU and CUDA generator states (JSON + tensors)."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    doc = {"python": [version, list(py_state), gauss],
           "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return doc, tensors


def rng_from_parts(doc: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, py_state, gauss = doc["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, pos, has_gauss, cached = doc["numpy"]
    keys = tensors["rng.numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
