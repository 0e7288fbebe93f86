"""Checkpoints as safetensors + JSON, committed by one rename, loaded without unpickling anything.

A checkpoint `NAME` in a folder is a manifest and two tensor files named by their content:
    NAME.json                   the manifest: everything but tensors (epoch, step, optimizer
                                hyper-parameters, GradScaler, Python/NumPy RNG, model name and
                                overrides, class names, eval transform, the run's config), the names
                                of the two tensor files, their SHA-256 and the manifest's own
    NAME.<sha>.safetensors      the model's weights (a plain state dict: any safetensors reader loads it)
    NAME.<sha>.state.safetensors the training state's tensors: optimizer moments, EMA weights, RNG states
    NAME.safetensors            a hard link to the current weights, for readers that want a fixed name

Saving writes and fsyncs the tensor files under new names (the previous checkpoint's files are left
alone), then the manifest under a temporary name, and renames it over NAME.json: that one rename
commits the checkpoint; the folder is fsynced, the fixed-name link moved, and only then are the
previous checkpoint's files deleted. A process killed at any instant leaves NAME.json naming a
complete, consistent checkpoint (the previous one or the new one); leftovers go at the next save.
Loading checks the digests of the manifest and of both tensor files. `on_event`, when set, is
called with each file operation's name just before it happens (tests stop a process there).
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

FORMAT = "patchbench-checkpoint-2"
FORMATS = ("patchbench-checkpoint-1", FORMAT)  # version 1: fixed file names, no manifest digest
EVENTS = ("write weights", "rename weights", "write state", "rename state", "write manifest", "commit",
          "sync folder", "link", "clean")
on_event = None  # tests: a callable taking each event's name before it happens


def _event(name: str) -> None:
    if on_event is not None:
        on_event(name)


def manifest_digest(doc: dict) -> str:
    """SHA-256 of the manifest's content, its own digest left out."""
    body = {**doc, "sha256": {k: v for k, v in doc.get("sha256", {}).items() if k != "manifest"}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


SUFFIXES = {"weights": ".safetensors", "state": ".state.safetensors"}


def save_checkpoint(folder: str | os.PathLike, name: str, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], state_tensors: dict[str, torch.Tensor]) -> Path:
    """Write checkpoint `name` (weights, JSON `state`, `state_tensors`), committed by one rename (module
    docstring); returns the manifest's path."""
    folder = rundir.make_dir(folder)
    manifest, alias = folder / f"{name}.json", folder / f"{name}.safetensors"
    for leftover in folder.glob(f".{name}.*.tmp-*"):  # a save killed mid-write left it
        leftover.unlink(missing_ok=True)
    try:
        kept = set(json.loads(manifest.read_text()).get("files", {}).values())  # the current checkpoint's
    except (OSError, ValueError, AttributeError):
        kept = set()
    files, digests, temps = {}, {}, []
    try:
        for key, tensors in (("weights", weights), ("state", state_tensors)):
            tmp = rundir.temp_path(folder / f"{name}{SUFFIXES[key]}")
            temps.append(tmp)
            _event(f"write {key}")
            _save_tensors(tensors, tmp, alias if key == "weights" else folder / f"{name}{SUFFIXES[key]}")
            digests[key] = _sha256(tmp)
            files[key] = f"{name}.{digests[key][:16]}{SUFFIXES[key]}"
            _event(f"rename {key}")
            rundir.commit(tmp, folder / files[key])
        doc = {"format": FORMAT, **state, "files": files, "sha256": digests}
        doc["sha256"] = {**digests, "manifest": manifest_digest(doc)}
        tmp = rundir.temp_path(manifest)
        temps.append(tmp)
        _event("write manifest")
        rundir.write_bytes_to(tmp, json.dumps(doc, indent=1).encode(), manifest)
        _fsync_folder(folder)  # the tensor files' names are on disk before the manifest names them
        _event("commit")
        rundir.commit(tmp, manifest)  # the one rename that commits the checkpoint
    except Exception:  # a failed write (a full disk): leave the folder as it was
        for p in temps + [folder / f for f in files.values() if f not in kept]:
            p.unlink(missing_ok=True)
        raise
    _event("sync folder")
    _fsync_folder(folder)
    _event("link")
    link = rundir.temp_path(alias)
    try:
        link.unlink(missing_ok=True)
        os.link(folder / files["weights"], link)
        os.replace(link, alias)
    except OSError:  # no hard links here: no fixed name rather than a stale one (the manifest is the record)
        link.unlink(missing_ok=True)
        alias.unlink(missing_ok=True)
    _event("clean")
    for old in folder.glob(f"{name}.*safetensors"):
        if old.name not in files.values() and old != alias:
            old.unlink(missing_ok=True)
    return manifest


def remove_leftovers(folder: str | os.PathLike) -> list[str]:
    """Delete what saves killed mid-way left in a checkpoint folder: temporary files, and content-named
    tensor files that no manifest names. Returns their names."""
    folder, gone = Path(folder), []
    if not folder.is_dir():
        return gone
    named = set()
    for manifest in folder.glob("*.json"):
        try:
            named |= set(json.loads(manifest.read_text()).get("files", {}).values())
        except (OSError, ValueError, AttributeError):
            return gone  # a manifest we cannot read: delete nothing
    for p in folder.iterdir():
        stem = p.name.split(".")
        content_named = len(stem) >= 3 and len(stem[1]) == 16 and p.name.endswith(".safetensors")
        if (p.name.startswith(".") and ".tmp-" in p.name) or (content_named and p.name not in named):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the renames are still atomic
    finally:
        os.close(fd)


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
    stem, _, digest = name.rpartition(".")
    if stem and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest):
        name = stem  # NAME.<sha>.safetensors: one of a checkpoint's content-named files
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
    if state.get("format") not in FORMATS:
        raise UserError(f"{json_path} is not a patchbench checkpoint (format {state.get('format')!r})")
    if state["format"] == FORMAT and state.get("sha256", {}).get("manifest") != manifest_digest(state):
        raise UserError(f"checkpoint {json_path} was changed after it was written (its digest does not match); "
                        f"restore the file, or resume from another checkpoint")
    stem = json_path.name[: -len(".json")]
    names = state.get("files") or {key: stem + suffix for key, suffix in SUFFIXES.items()}
    files = {key: json_path.with_name(n) for key, n in names.items()}
    wanted = ["weights", "state"] if with_state else ["weights"]
    for key in wanted:
        if not files[key].exists():
            raise UserError(f"checkpoint {json_path} is incomplete: {files[key]} is missing")
        if _sha256(files[key]) != state["sha256"][key]:
            raise UserError(f"checkpoint {json_path}: {files[key]} is damaged (its digest does not match); "
                            f"resume from another checkpoint or start the run again")
    try:
        weights = load_file(str(files["weights"]))
        tensors = load_file(str(files["state"])) if with_state else {}
    except SafetensorError as e:
        raise UserError(f"cannot read checkpoint {json_path}: {e}") from None
    return state, weights, tensors


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """`model.load_state_dict(weights)`; weights of other names or shapes (a checkpoint of another model or
    configuration) are one UserError naming `where`, not a page of load_state_dict's report."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:200]
        raise UserError(f"the checkpoint in {where} does not fit {type(model).__name__} as configured ({detail}); "
                        f"use it with the model configuration it was written with") from None


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
