"""Build and load the CPU operators (csrc/ops.cpp -> torch.ops.patchbench.*) with torch's extension
machinery (`torch.utils.cpp_extension.load`: ninja, torch's own compiler flags and headers).

The library is built once per source, torch version and compiler ($CXX) into
`<cache>/kernels/<key>/`, a folder private to the user (0700, owned by them): nobody else can put a
library there, and who could change it could already run code as the user, so the file is not
hashed again before loading. A folder that is not private, or cannot be written, gives way to a
fresh temporary one for this process. The build holds an exclusive lock on the folder (released by
the kernel if the process is killed), so that a second process waits for the first instead of
building beside it; under it a lock file that torch's own builder left when killed is removed
(older versions of torch waited on such a file forever). The code inside is compiled for several
instruction sets and chooses by this CPU when called (see ops.cpp), so one build suits any machine
the cache folder is moved to.

    load()        # True once torch.ops.patchbench is usable; else FAILURE says why (no compiler, ...)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from patchbench.errors import UserError

NAME = "patchbench_cpu"
SOURCES = ("ops.cpp", "kernels.h")
# at::parallel_for is OpenMP compiled into the caller: the library is built with it and shares the
# libgomp that torch has loaded (the same soname), so torch.set_num_threads governs it
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
FLAGS = ["-O3", "-Wno-psabi", *OPENMP]
FAILURE: str | None = None  # why the operators could not be built or loaded (recorded in config.json)
_LOADED = False


def _source(name: str) -> bytes:
    return (resources.files("patchbench.cpu") / "csrc" / name).read_bytes()


def build_key() -> str:
    """What the built library depends on: its sources, torch, the compiler and its flags."""
    parts = [_source(n) for n in SOURCES]
    parts += [torch.__version__.encode(), os.environ.get("CXX", "").encode(), " ".join(FLAGS).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _private(path: Path) -> bool:
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o077 and os.access(path, os.W_OK | os.X_OK)


def build_dir() -> Path:
    """`<cache>/kernels/<key>`, private to this user; a fresh temporary folder where that cannot be."""
    from patchbench.config import default_cache_dir

    path = default_cache_dir() / "kernels" / build_key()
    try:
        for folder in (path.parent, path):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if folder.stat().st_uid == os.getuid() and folder.stat().st_mode & 0o077:
                os.chmod(folder, 0o700)
        if _private(path.parent) and _private(path):
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="patchbench-kernels-"))


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH: add the ninja that pip installed beside this Python."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def load() -> bool:
    """Build (the first time) and load the operators; False, with FAILURE saying why, where they cannot
    be (no C++ compiler, a failed build): callers then run PyTorch's own ops."""
    global FAILURE, _LOADED
    if _LOADED or FAILURE is not None:
        return _LOADED
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # no CUDA notes on a CPU build
    from torch.utils import cpp_extension

    _ninja_on_path()
    folder = build_dir()
    source = resources.files("patchbench.cpu") / "csrc" / "ops.cpp"
    try:
        with open(folder / ".build-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
            (folder / "lock").unlink(missing_ok=True)  # cpp_extension's own, left by a killed build
            # not $CFLAGS: an -march there would make the portable code this machine's only
            cpp_extension.load(NAME, [str(source)], extra_cflags=FLAGS,
                               extra_ldflags=OPENMP, build_directory=str(folder), is_python_module=False,
                               verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        FAILURE = f"the CPU operators could not be built: {why[:200]}"
        warnings.warn(f"patchbench.cpu: {FAILURE}; using PyTorch's (slower) path", stacklevel=2)
        return False
    _LOADED = True
    isa = os.environ.get("PATCHBENCH_CPU_ISA")
    if isa:
        try:
            torch.ops.patchbench.cpu_isa(isa)
        except RuntimeError:
            raise UserError(f"PATCHBENCH_CPU_ISA={isa}: not one of generic, avx2, avx512, avx512bf16; "
                            f"unset it to use the best this CPU has") from None
    return True
