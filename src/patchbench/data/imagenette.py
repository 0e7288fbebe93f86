"""Where the images come from: the dataset registry, download, safe extraction, `resolve_source`.

One argument (`--data`) names a dataset everywhere. It is one of
- a registered name (`imagenette-160`, ...): downloaded once into the cache directory, MD5-checked;
- a local archive (`.tgz`, `.tar.gz`, `.tar`, `.zip`), optionally MD5-checked, extracted into the cache;
- a folder holding `train/<class>/` and `val/<class>/` image folders, used in place.

Downloads resume an interrupted transfer with an HTTP Range request and only ever appear under
their final name once the full-file MD5 matched. Extraction refuses any member that could write
outside the target folder (absolute paths, `..`, links, devices), because an archive is input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from patchbench.config import cache_root, default_cache_dir  # noqa: F401 (re-exported)
from patchbench.errors import UserError
from patchbench.rundir import output_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")
EXTRACTED_MARKER = ".patchbench-extracted.json"

# ImageNet synset names (the first name torchvision lists for each Imagenette wnid).
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
IMAGEWOOF_CLASSES = {
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}
CLASS_NAMES = {**IMAGENETTE_CLASSES, **IMAGEWOOF_CLASSES}


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    url: str
    md5: str
    note: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_S3 = "https://s3.amazonaws.com/fast-ai-imageclas"
# Imagenette URLs and MD5s as torchvision.datasets.Imagenette lists them. torchvision has no
# Imagewoof class: the URLs are fastai's (URLs.IMAGEWOOF*), the MD5s are the ones in fastai's
# fastai/data/checks.txt and could not be checked against the files served today (fastai has
# re-uploaded these archives before: its checks.txt and torchvision disagree on imagenette2-160).
# A mismatch stops the download with both MD5s; pass --md5 to accept a newer upload knowingly.
DATASETS = {
    d.name: d
    for d in [
        RegisteredDataset("imagenette-160", f"{_S3}/imagenette2-160.tgz", "e793b78cc4c9e9a4ccc0c1155377a412"),
        RegisteredDataset("imagenette-320", f"{_S3}/imagenette2-320.tgz", "3df6f0d01a2c9592104656642f5e78a3"),
        RegisteredDataset("imagenette", f"{_S3}/imagenette2.tgz", "fe2fc210e6bb7c5664d602c3cd71e612"),
        RegisteredDataset("imagewoof-160", f"{_S3}/imagewoof2-160.tgz", "3559b194123981a540b87132dbda412f",
                          "MD5 from fastai's checks.txt, unverified"),
        RegisteredDataset("imagewoof-320", f"{_S3}/imagewoof2-320.tgz", "7a1fd92672a559a85de76e4810a20c21",
                          "MD5 from fastai's checks.txt, unverified"),
        RegisteredDataset("imagewoof", f"{_S3}/imagewoof2.tgz", "2cc1c1e36e20cb6fd24ffb978edcb487",
                          "MD5 from fastai's checks.txt, unverified"),
    ]
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def md5sum(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def class_name(wnid: str) -> str:
    """The human name of an ImageNet wnid we know, else the folder name itself."""
    return CLASS_NAMES.get(wnid, wnid)


# ----------------------------------------------------------------------------- download


def download_file(url: str, dest: str | os.PathLike, md5: str | None, *, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` if an earlier attempt left one.

    The file appears under `dest` only after the whole file's MD5 matched (atomic rename). On a
    mismatch the partial file is removed, so the next attempt starts clean.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: nothing left to send, the part file is already complete
            raise UserError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        response = None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"download of {url} failed: {e}; check the network, or train from a local copy "
                        f"of the archive (--data PATH)") from e
    if response is not None:
        with response:
            resumed = response.status == 206
            if have and not resumed:
                have = 0  # the server ignored the Range header: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, disable=not progress,
            ) as bar:
                while block := response.read(1 << 16):
                    f.write(block)
                    bar.update(len(block))
    if md5 is not None:
        got = md5sum(part)
        if got != md5.lower():
            part.unlink()
            raise UserError(f"MD5 mismatch for {url}: expected {md5}, got {got}; the partial "
                            f"download {part} was removed (pass --md5 {got} if this file is trusted)")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- extraction


def _inside(target: Path, name: str) -> bool:
    path = (target / name).resolve()
    return path == target or target in path.parents


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a .tgz/.tar/.zip into `target` (created), refusing anything that could escape it.

    Extraction goes to a sibling temporary folder that is renamed into place at the end, so an
    interrupted or refused extraction never leaves a half-filled `target`.
    """
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, tmp)
        else:
            _extract_tar(archive, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _member_target(archive: Path, root: Path, name: str) -> Path:
    """Where an archive member goes; refuses names that would land outside `root`."""
    if os.path.isabs(name) or not _inside(root, name):
        raise UserError(f"refusing to extract {archive}: member {name!r} would be written outside "
                        f"the target folder")
    return root / name


def _write_member(src, out: Path, mtime: float) -> None:
    """Copy an open member to `out`, keeping the archive's time (a stable cache key). A failed write
    (a full disk) is an OutputError naming the file, not taken for a corrupt archive."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = open(out, "wb")  # noqa: SIM115 -- closed by the `with` below; opened here so an OSError names `out`
    except OSError as e:
        raise output_error(out, e) from None
    with src, f:
        while chunk := src.read(1 << 20):  # reading: the archive's errors (caught by the caller)
            try:
                f.write(chunk)
            except OSError as e:
                raise output_error(out, e) from None
    os.utime(out, (mtime, mtime))


def _extract_tar(archive: Path, dest: Path) -> None:
    root = dest.resolve()
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if not (member.isfile() or member.isdir()):
                    kind = "link" if (member.issym() or member.islnk()) else "special file"
                    raise UserError(f"refusing to extract {archive}: member {member.name!r} is a "
                                    f"{kind}; only regular files and folders are allowed")
                out = _member_target(archive, root, member.name)
                if member.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                _write_member(tar.extractfile(member), out, member.mtime)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read archive {archive}: {_short(e)} (truncated or corrupt? "
                        f"download it again)") from e


def _extract_zip(archive: Path, dest: Path) -> None:
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # Unix
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise UserError(f"refusing to extract {archive}: member {info.filename!r} is "
                                    f"a link or special file; only regular files and folders are allowed")
                out = _member_target(archive, root, info.filename)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                _write_member(zf.open(info), out, time.mktime(info.date_time + (0, 0, -1)))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"cannot read archive {archive}: {_short(e)} (truncated or corrupt? "
                        f"download it again)") from e


def _short(e: Exception) -> str:
    """The first clause of an archive library's message (tarfile lists every method it tried)."""
    return str(e).split(" - method")[0].strip().rstrip(":")[:160] or type(e).__name__


# ----------------------------------------------------------------------------- sources


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_root(folder: Path) -> Path:
    """The folder holding train/ and val/: `folder` itself or its single top-level subfolder."""
    if (folder / "train").is_dir():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    raise UserError(f"no train/ folder in {folder}; expected train/<class>/ and val/<class>/ "
                    f"image folders")


def list_images(root: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Class folders (sorted wnids, from train/) and the image files of each split.

    Returns (wnids, {"train": [...], "val": [...]}) with files sorted within each class; labels are
    positions in `wnids`. Missing val/, an empty class folder, or a val class unknown to train/
    are errors: each would silently change what a run measures.
    """
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"missing {split}/ folder in {root}; expected train/<class>/ and "
                            f"val/<class>/ image folders")
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not wnids:
        raise UserError(f"no class folders in {root / 'train'}; expected train/<class>/*.JPEG")
    files: dict[str, list[Path]] = {}
    for split in ("train", "val"):
        split_classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        unknown = sorted(set(split_classes) - set(wnids))
        if unknown:
            raise UserError(f"class folder(s) {unknown} in {root / split} have no match in "
                            f"{root / 'train'}; every val class needs training images")
        files[split] = []
        for wnid in split_classes:
            images = sorted(p for p in (root / split / wnid).iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise UserError(f"empty class folder {root / split / wnid}: no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} files; remove it or add images")
            files[split].extend(images)
    return wnids, files


def resolve_source(source: str, *, cache_dir=None, md5: str | None = None, download: bool = True,
                   progress: bool = True) -> Path:
    """Turn `--data` into an extracted folder with train/ and val/ (downloading/extracting once).

    `md5` checks a local archive, or replaces a registered dataset's MD5. With download=False a
    registered dataset that is not in the cache yet is an error instead of a download.
    """
    cache = cache_root(cache_dir)
    if source in DATASETS:
        entry = DATASETS[source]
        expected = md5 or entry.md5
        archive = cache / "downloads" / entry.filename
        fetched = False
        if not archive.exists() and not _extracted(cache, archive, expected):
            if not download:
                raise UserError(f"dataset {source!r} is not downloaded yet; run "
                                f"`patchbench data download {source}` (cache: {cache})")
            download_file(entry.url, archive, expected, progress=progress)
            fetched = True
        return _extract_once(archive, cache, expected, verified=fetched, progress=progress)
    path = Path(source).expanduser()
    if path.is_dir():
        if md5:
            raise UserError(f"--md5 checks an archive, but --data {source} is a folder; drop --md5 (or give the "
                            f"archive)")
        root = find_root(path)
        list_images(root)  # fail now, with the folder named, rather than inside prepare
        return root
    if path.is_file() and is_archive(path):
        return _extract_once(path, cache, md5, verified=False, progress=progress)
    if path.exists():
        raise UserError(f"--data {source}: not a folder or a .tgz/.tar.gz/.tar/.zip archive")
    raise UserError(f"--data {source}: no such file or folder, and not a registered dataset "
                    f"({', '.join(DATASETS)})")


def _extract_dir(cache: Path, archive: Path, md5: str | None) -> Path:
    tag = md5[:8] if md5 else hashlib.sha1(str(archive.resolve()).encode()).hexdigest()[:8]
    return cache / "extracted" / f"{_archive_stem(archive)}-{tag}"


def _extracted(cache: Path, archive: Path, md5: str | None) -> bool:
    return (_extract_dir(cache, archive, md5) / EXTRACTED_MARKER).exists()


def _extract_once(archive: Path, cache: Path, md5: str | None, *, verified: bool, progress: bool = True) -> Path:
    """Extract `archive` into the cache unless an extraction of this very file is there already.

    The marker records the archive's size and mtime (and MD5 when one was checked), so a changed
    archive is extracted again and a re-run does no work.
    """
    target = _extract_dir(cache, archive, md5)
    marker = target / EXTRACTED_MARKER
    info = None
    if archive.exists():
        st = archive.stat()
        info = {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if marker.exists():
        recorded = json.loads(marker.read_text())
        same_md5 = md5 is None or recorded.get("md5") == md5.lower()
        if same_md5 and (info is None or all(recorded.get(k) == v for k, v in info.items())):
            return find_root(target)
    if info is None:
        raise UserError(f"archive {archive} is missing; download it again")
    if md5 is not None and not verified:
        got = md5sum(archive)
        if got != md5.lower():
            raise UserError(f"MD5 mismatch for {archive}: expected {md5}, got {got}; fix --md5 "
                            f"or replace the file")
    if progress:
        print(f"extracting {archive} to {target}", file=sys.stderr, flush=True)
    safe_extract(archive, target)
    info["md5"] = md5.lower() if md5 else None
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, marker)
    return find_root(target)
