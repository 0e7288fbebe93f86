"""Run and study directories: their file names, the status values, and every read and write of them.

A run directory (written by `train`, read by `evaluate`, `compare` and `report`):

    config.json     the resolved RunConfig + "env" + "derived"
    metrics.jsonl   one JSON object per finished epoch
    summary.json    status and headline figures
    eval.json       the final weights scored on the full evaluation split
    checkpoint/     last.* and best.* (see checkpoint.py), tb/ TensorBoard events

A study directory (written by `compare`, `sweep` and `ablate`): study.json, runs/<run>/, locks/,
samples.npz, and the report (report.md, report.html, figures/).

Writes are atomic (a temporary file in the same folder, flushed to disk, then renamed), so a crash
or a full disk never leaves a half-written file under its real name; a failed write removes its
temporary file and raises `OutputError` naming the path and what to do. Reads name the file and
what is wrong with it (`RunFileError`), so that callers can report a broken run rather than crash.
This module imports neither torch nor the training code: `report` stands on it alone.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchbench.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINT = "checkpoint"
TB = "tb"
RUN_FILES = (CONFIG, METRICS, SUMMARY, EVAL, CHECKPOINT, TB)

STUDY = "study.json"
RUNS = "runs"
LOCKS = "locks"
SAMPLES = "samples.npz"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES = "figures"

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)
NEW = "new"  # no summary.json yet: not started (only returned by run_status, never written)

# The run-directory schema, written as "schema" in config.json and summary.json (files without it are 1).
# 2: summary.json's figures of the lowest-validation-loss epoch are named for that (lowest_loss_top1,
# lowest_loss_epoch; 1 called them best_top1, best_epoch) and config.json's env has no hostname.
# Reading upgrades a file of an earlier schema; upgrade_run rewrites a run directory in this one.
SCHEMA = 2
SUMMARY_RENAMED = {"best_top1": "lowest_loss_top1", "best_epoch": "lowest_loss_epoch"}

# The kinds of the figures in summary.json and metrics.jsonl (None is allowed for each).
SUMMARY_KINDS: dict[str, tuple[type, ...]] = {
    "status": (str,), "model": (str,), "label": (str,), "params": (int,), "macs": (int,), "img_size": (int,),
    "epochs": (int,), "epochs_done": (int,), "final_top1": (int, float), "final_top5": (int, float),
    "final_val_loss": (int, float), "lowest_loss_top1": (int, float), "lowest_loss_epoch": (int,),
    "wall_time_s": (int, float), "train_images_per_s": (int, float), "infer_images_per_s": (int, float),
    "epochs_time_s": (int, float), "device": (str,), "world_size": (int,), "error": (str,), "patch_size": (int,),
    "eval_split": (str,),
}
METRIC_KINDS: dict[str, tuple[type, ...]] = {
    "epoch": (int,), "step": (int,), "lr": (int, float), "train_loss": (int, float), "train_top1": (int, float),
    "val_loss": (int, float), "val_top1": (int, float), "val_top5": (int, float), "epoch_time_s": (int, float),
    "train_images_per_s": (int, float), "infer_images_per_s": (int, float), "img_size": (int,),
    "threads": (int, float),
}


class RunFileError(UserError):
    """A run or study file that cannot be read as what it should be; the message names the file."""


class OutputError(UserError):
    """A file or folder that could not be written; the message names the path and the fix."""


def output_error(path: str | os.PathLike, e: OSError, what: str = "write") -> OutputError:
    """The one-line message for an OSError met while writing `path`."""
    reason = {
        errno.ENOSPC: "no space left on the device; free some space and try again",
        errno.EDQUOT: "disk quota exceeded; free some space and try again",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "operation not permitted; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose a writable folder",
        errno.EISDIR: "it is a folder; give a file name",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
        errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    }.get(e.errno, f"{e.strerror or e}")
    return OutputError(f"cannot {what} {path}: {reason}")


# --------------------------------------------------------------------------------------------------
# Writing


def make_dir(path: str | os.PathLike, mode: int = 0o777) -> Path:
    """mkdir -p, with an OutputError naming the folder when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:
        raise OutputError(f"cannot create folder {path}: a file of that name is in the way; "
                          f"choose another path") from None
    except OSError as e:
        raise output_error(path, e, "create folder") from None
    return path


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create folder `path` if needed and prove it writable (a probe file), before any long work;
    OutputError naming `flag` and the fix otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file, not a folder; choose a folder")
    try:
        make_dir(path)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".patchbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except OutputError as e:
        raise OutputError(f"{flag}: {e}") from None
    except OSError as e:
        raise OutputError(f"{flag}: {output_error(path, e, 'write in')}") from None
    return path


def owner_folder(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(the run or study folder that `path` lies in, "run" or "study"), looking at `path`'s parents."""
    for folder in list(Path(path).absolute().parents)[:6]:
        if (folder / STUDY).is_file():
            return folder, "study"
        if holds_a_run(folder):
            return folder, "run"
    return None


def holds_a_run(folder: Path) -> bool:
    """A run directory for sure: a config.json beside the metrics, the summary or the checkpoints."""
    return (folder / CONFIG).is_file() and any((folder / f).exists() for f in (METRICS, SUMMARY, CHECKPOINT))


SPECIAL_FILES = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                 (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file that will be written later: not a folder, not a special file (outputs are written by rename,
    which would replace a symlink, FIFO or device instead of writing through it: they are refused), not
    inside a run or study folder (whose files patchbench writes itself), in a folder that can be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give a file name")
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = None
    for test, kind in SPECIAL_FILES:
        if mode is not None and test(mode):
            raise OutputError(f"{flag} {path}: is {kind}; patchbench writes its outputs by renaming a new file into "
                              f"place, which would replace it: give the path of a regular file")
    owner = owner_folder(path)
    if owner is not None:
        raise OutputError(f"{flag} {path}: lies inside the {owner[1]} folder {owner[0]}, whose files patchbench "
                          f"writes itself; choose a path outside it")
    check_writable_dir(path.parent, flag)
    return path


def check_study_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A study folder to create or extend: not a run directory, not inside a run or study folder."""
    path = Path(path)
    if holds_a_run(path):
        raise OutputError(f"{flag} {path}: holds a run (config.json, metrics); a study needs a folder of its own")
    owner = owner_folder(path)
    if owner is not None:
        raise OutputError(f"{flag} {path}: lies inside the {owner[1]} folder {owner[0]}; choose a folder outside it")
    return check_writable_dir(path, flag)


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside `path` (same folder, so the final rename is atomic), unique per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file into place."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(path, e) from None


def write_bytes_to(tmp: Path, data: bytes, path: Path | None = None) -> None:
    """Write and fsync `tmp`; on failure remove it and raise OutputError naming `path` (the real name)."""
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(path or tmp, e) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (a reader sees the old file or the new one, never a part)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    tmp = temp_path(path)
    write_bytes_to(tmp, data, path)
    commit(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, doc: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=indent) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk (metrics.jsonl): a crash can tear only this line."""
    try:
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise output_error(path, e) from None


# --------------------------------------------------------------------------------------------------
# Reading


def read_json(path: str | os.PathLike, *, kind: type = dict) -> Any:
    """The JSON document in `path`, which must be a `kind` (RunFileError naming the file otherwise)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except IsADirectoryError:
        raise RunFileError(f"{path} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path} cannot be read ({e})") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        why = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise RunFileError(f"{path} {why}; it may have been cut short: delete it or start that run again") from None
    if not isinstance(doc, kind):
        raise RunFileError(f"{path} holds a JSON {type(doc).__name__}, not a {_kind_name(kind)}")
    return doc


def _kind_name(kind: type) -> str:
    return {dict: "JSON object", list: "JSON list"}.get(kind, kind.__name__)


def check_fields(doc: dict, kinds: dict[str, tuple[type, ...]], where: str) -> dict:
    """RunFileError naming `where` and the key when a known key holds the wrong kind of value."""
    for key, value in doc.items():
        allowed = kinds.get(key)
        if allowed is None or value is None:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if ok and isinstance(value, float) and not math.isfinite(value) and key not in ("train_loss", "val_loss",
                                                                                        "final_val_loss"):
            ok = False
        if not ok:
            need = " or ".join("a number" if k in (int, float) else "text" if k is str else k.__name__
                               for k in dict.fromkeys(float if k is int else k for k in allowed))
            raise RunFileError(f"{where}: {key} is {json.dumps(value)}, not {need}")
    return doc


def read_metrics(path: str | os.PathLike, *, on_torn: Callable[[str], None] | None = None) -> list[dict]:
    """metrics.jsonl as a list of epoch rows ([] when the file does not exist yet).

    A last line without its newline that does not parse is what a crash or power cut leaves: it is
    dropped, and `on_torn` (when given) is told so. Any other bad line raises RunFileError naming
    the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path} cannot be read ({e})") from None
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):  # the last line, with no newline after it: cut short while being written
                if on_torn is not None:
                    on_torn(f"{path}: dropped its last line, cut short while being written ({len(line)} characters)")
                break
            raise RunFileError(f"{path} line {i} is not valid JSON; the file is damaged: delete the "
                               f"line (and the epochs after it) or start the run again") from None
        if not isinstance(row, dict):
            raise RunFileError(f"{path} line {i} holds a JSON {type(row).__name__}, not an object")
        rows.append(check_fields(row, METRIC_KINDS, f"{path} line {i}"))
    return rows


def write_metrics(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(path: str | os.PathLike, row: dict) -> None:
    append_line(path, json.dumps(row))


def read_summary(path: str | os.PathLike) -> dict:
    path = Path(path)
    doc = check_fields(upgrade_summary(read_json(path), path), SUMMARY_KINDS, str(path))
    if doc.get("status") not in STATUSES:
        raise RunFileError(f"{path}: status is {json.dumps(doc.get('status'))}, not one of {', '.join(STATUSES)}")
    return doc


def _schema(doc: dict, path: Path) -> int:
    version = doc.get("schema", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunFileError(f"{path}: schema is {json.dumps(version)}, not a version number")
    if version > SCHEMA:
        raise RunFileError(f"{path} was written in run-directory schema {version}, newer than this patchbench's "
                           f"({SCHEMA}); upgrade patchbench to read it")
    return version


def upgrade_summary(doc: dict, path: Path) -> dict:
    """summary.json's document in the current schema (the same object when it already is)."""
    if _schema(doc, path) == SCHEMA:
        return doc
    return {"schema": SCHEMA, **{SUMMARY_RENAMED.get(k, k): v for k, v in doc.items() if k != "schema"}}


def upgrade_config(doc: dict, path: Path) -> dict:
    """config.json's document in the current schema (the same object when it already is)."""
    if _schema(doc, path) == SCHEMA:
        return doc
    env = doc.get("env")
    if isinstance(env, dict):
        env = {k: v for k, v in env.items() if k != "hostname"}
    return {"schema": SCHEMA, **{k: env if k == "env" else v for k, v in doc.items() if k != "schema"}}


def upgrade_run(run_dir: str | os.PathLike) -> list[Path]:
    """Rewrite a run directory's config.json and summary.json in the current schema (atomically, each
    only when it is of an earlier one); the files rewritten."""
    run_dir, done = Path(run_dir), []
    for name, read, upgrade in ((CONFIG, read_json, upgrade_config), (SUMMARY, read_json, upgrade_summary)):
        path = run_dir / name
        if not path.exists():
            continue
        doc = read(path)
        new = upgrade(doc, path)
        if new is not doc:
            atomic_write_json(path, new)
            done.append(path)
    return done


def run_status(run_dir: str | os.PathLike) -> str:
    """summary.json's status, or NEW when there is no summary.json; RunFileError when it is broken."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return NEW
    return read_summary(path)["status"]


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / CONFIG
    return upgrade_config(read_json(path), path)


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / f).exists() for f in (CONFIG, SUMMARY, METRICS))
