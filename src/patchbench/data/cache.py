"""Decode every image once into a memory-mappable uint8 cache (`prepare`).

Training then never touches a JPEG: a batch is a gather from a (N, S, S, 3) uint8 array, and the
augmentation runs on the training device. Each image is resized so its shorter side is S and
centre-cropped to S×S (S = `DataConfig.prepare_size`); the model's input size is chosen later by
the loader, so one cache serves every `img_size` up to S.

Layout, under `<cache>/prepared/<source>-s<S>-<fingerprint>/`:
    train_images.npy (N, S, S, 3) uint8    train_labels.npy (N,) int64
    val_images.npy                          val_labels.npy
    index.json  {version, source, root, fingerprint, prepare_size, wnids, classes, counts, skipped}
The folder is written under a temporary name and renamed into place when complete, so a folder
with an index.json is a finished cache. The key holds S and a fingerprint of the source files
(names, sizes, mtimes), so different sizes coexist and a changed source is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from patchbench.config import DataConfig
from patchbench.data.imagenette import (
    cache_root,
    class_name,
    list_images,
    resolve_source,
)
from patchbench.errors import UserError
from patchbench.rundir import OutputError, atomic_write_json, make_dir, output_error

CACHE_VERSION = 1


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    labels: np.ndarray  # (n,) int64: the label of each sample
    rows: np.ndarray | None = None  # (n,) the image row of each sample (None: sample i is row i)

    def __len__(self) -> int:
        return len(self.labels)

    def row_of(self, idx: np.ndarray) -> np.ndarray:
        """Image rows of samples `idx`."""
        return idx if self.rows is None else self.rows[idx]

    def subset(self, idx: np.ndarray) -> Split:
        """The samples `idx` of this split, sharing its image array (nothing is copied)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.images, self.labels[idx], self.row_of(idx))


def holdout_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, holdout): a seeded, class-stratified `fraction` of `split` held out for validation.

    Each class gives round(fraction * its count) samples (at least one from a class of two or more),
    chosen by a generator seeded with `seed` alone, so every training seed sees the same split.
    """
    labels = np.asarray(split.labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x401D]))
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = round(fraction * len(members))
        if fraction > 0 and len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        held.extend(rng.permutation(members)[:k].tolist())
    held_mask = np.zeros(len(labels), dtype=bool)
    held_mask[held] = True
    return split.subset(np.flatnonzero(~held_mask)), split.subset(np.flatnonzero(held_mask))


@dataclass
class PreparedData:
    train: Split
    val: Split
    classes: list[str]  # human names, in wnid order
    wnids: list[str]
    path: Path  # the cache folder
    index: dict = field(default_factory=dict)
    reused: bool = False  # True when an existing cache was loaded and nothing was decoded

    @property
    def skipped(self) -> list[dict]:
        return self.index.get("skipped", [])


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UndecodableImage(ValueError):
    """An image whose pixels have no standard 8-bit RGB reading (it is skipped and reported)."""


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode PIL opens -> 8-bit RGB with the values that mode means.

    PIL's own conversion is right for the 8-bit modes (1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, LAB,
    HSV; alpha is dropped, as torchvision's RGB read does). It is wrong for deeper pixels, which it
    clips at 255: 16-bit grey (a 16-bit PNG) is scaled to 8 bits here (v / 257, rounded), as is 32-bit
    integer grey holding 16-bit values; other 32-bit integer and float pixels have no standard 8-bit
    reading and raise UndecodableImage.
    """
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UndecodableImage(f"{im.mode} pixels outside 0..65535 have no standard 8-bit reading; "
                                   f"convert the file to 8-bit RGB")
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        raise UndecodableImage("floating-point pixels have no standard 8-bit reading; convert the file to 8-bit RGB")
    return im.convert("RGB")


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file -> (size, size, 3) uint8: shorter side to `size`, centre crop, RGB (see `to_rgb`)."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: let the decoder downscale by 2^k, staying >= size
        im = to_rgb(im)
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)  # PIL antialiases when shrinking
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


def _decode_job(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    path, size = job
    try:
        return decode_image(path, size), None
    except Exception as e:  # noqa: BLE001 -- any decoder's error: a corrupt file must not stop the other 13,000
        return None, f"{type(e).__name__}: {e}"


def source_fingerprint(root: Path, files: dict[str, list[Path]]) -> str:
    """A hash of every image's relative path, size and mtime: cheap to compute, changes with the data."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for p in files[split]:
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _slug(source: str) -> str:
    name = Path(source.rstrip("/")).name or "data"
    for suffix in (".tgz", ".tar.gz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "data"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare(cfg: DataConfig, *, progress: bool = True, workers: int | None = None) -> PreparedData:
    """Decode `cfg.source` once at `cfg.prepare_size` (cached: a valid cache is loaded, not rebuilt)."""
    size = int(cfg.prepare_size)
    if size < 1:
        raise UserError(f"prepare_size must be a positive number of pixels, got {cfg.prepare_size}")
    root = resolve_source(cfg.source, cache_dir=cfg.cache_dir, md5=cfg.md5, progress=progress)
    wnids, files = list_images(root)
    fingerprint = source_fingerprint(root, files)
    out = cache_root(cfg.cache_dir) / "prepared" / f"{_slug(cfg.source)}-s{size}-{fingerprint}"
    if not _valid(out, fingerprint, size):
        _build(out, root, cfg.source, wnids, files, fingerprint, size, progress,
               workers or default_workers())
        data = load_prepared(out)
    else:
        data = load_prepared(out)
        data.reused = True
    if data.skipped:
        print(f"prepare: {len(data.skipped)} unreadable image(s) were skipped (listed in "
              f"{out / 'index.json'})", file=sys.stderr)
    return data


def _valid(out: Path, fingerprint: str, size: int) -> bool:
    try:
        index = json.loads((out / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return (index.get("version") == CACHE_VERSION and index.get("fingerprint") == fingerprint
            and index.get("prepare_size") == size
            and all((out / f"{s}_{k}.npy").exists() for s in ("train", "val") for k in ("images", "labels")))


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open a finished cache folder: images memory-mapped, labels in memory."""
    path = Path(path)
    index = json.loads((path / "index.json").read_text())
    splits = {
        s: Split(images=np.load(path / f"{s}_images.npy", mmap_mode="r"),
                 labels=np.load(path / f"{s}_labels.npy"))
        for s in ("train", "val")
    }
    return PreparedData(train=splits["train"], val=splits["val"], classes=index["classes"],
                        wnids=index["wnids"], path=path, index=index)


def _disk_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 .npy memmap whose blocks are allocated on disk now: a disk too small for it raises
    OSError(ENOSPC) here, rather than a SIGBUS when a page of a sparse file is first written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    return array


def _build(out: Path, root: Path, source: str, wnids: list[str], files: dict[str, list[Path]],
           fingerprint: str, size: int, progress: bool, workers: int) -> None:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_dir(tmp)
    label_of = {w: i for i, w in enumerate(wnids)}
    total = sum(len(v) for v in files.values())
    skipped: list[dict] = []
    counts = {}
    start = time.perf_counter()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=total, desc=f"decoding {root.name} at {size}px", unit="img",
                  disable=not progress) as bar:
            for split in ("train", "val"):
                paths = files[split]
                labels = np.array([label_of[p.parent.name] for p in paths], dtype=np.int64)
                images = _disk_array(tmp / f"{split}_images.npy", (len(paths), size, size, 3))
                jobs = [(str(p), size) for p in paths]
                results = pool.imap(_decode_job, jobs, chunksize=32) if pool else map(_decode_job, jobs)
                keep = np.ones(len(paths), dtype=bool)
                n = 0
                for i, (pixels, error) in enumerate(results):
                    if pixels is None:
                        keep[i] = False
                        skipped.append({"path": str(paths[i]), "error": error})
                        bar.write(f"skipped unreadable image {paths[i]}: {error}", file=sys.stderr)
                    else:
                        images[n] = pixels  # written in order, so skipped files leave no hole
                        n += 1
                    bar.update()
                images.flush()
                del images
                if n < len(paths):  # shrink the array to the images that decoded
                    full = np.load(tmp / f"{split}_images.npy", mmap_mode="r")
                    kept = _disk_array(tmp / f"{split}_images.kept.npy", (n, size, size, 3))
                    kept[:] = full[:n]
                    kept.flush()
                    del kept, full
                    os.replace(tmp / f"{split}_images.kept.npy", tmp / f"{split}_images.npy")
                np.save(tmp / f"{split}_labels.npy", labels[keep])
                counts[split] = n
    except OSError as e:  # a full disk, most likely: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(len(v) for v in files.values()) * size * size * 3
        raise OutputError(f"{output_error(out, e)} (the cache needs about {need / 2**20:,.0f} MB; or choose "
                          f"another --cache-dir)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    index = {
        "version": CACHE_VERSION,
        "source": source,
        "root": str(root),
        "fingerprint": fingerprint,
        "prepare_size": size,
        "wnids": wnids,
        "classes": [class_name(w) for w in wnids],
        "counts": counts,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "decode_seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(tmp / "index.json", index)
    if _valid(out, fingerprint, size):  # another process finished the same cache first: keep it
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(out, ignore_errors=True)  # an unfinished or stale folder of the same key
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _valid(out, fingerprint, size):
            raise
