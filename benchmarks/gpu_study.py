"""Everything that needs a GPU, in one call; `--dry-run` runs the same on the CPU.

Stages, each with its own time budget (a stage that runs out is stopped cleanly: studies are
checkpointed and resumable, and their reports list what did not finish):
  1. the environment (GPU, driver, torch) into the log;
  2. the tests that need a device (`pytest -m device` with PATCHBENCH_TEST_DEVICE=cuda);
  3. `patchbench bench`: ConvMixer-256/12 at 160px against timm, with the fraction of a matmul measured
     in the same run (the bench's "of ceiling": a measured MFU);
  4. the studies `notebook` (3 models x 3 seeds), `study160` (3 x 3) and `fair` (3 x 3), each run by
     several `compare` workers sharing the study folder (the GPU is mostly idle with batch 16), then
     `patchbench report`;
  5. the small files of every study (never checkpoints) packed into OUT/studies.tar.gz, beside
     OUT/gpu_study.log, OUT/bench.json and OUT/summary.json (four files in all).

It runs from a source checkout with the machine's own Python and packages (nothing installed):
    PYTHONPATH=src python3 benchmarks/gpu_study.py --data /tmp/imagenette2-160.tgz --out "$OUT"
Where files travel to the GPU machine in pieces of limited size, `--split-archive` cuts the archive
into parts of `--part-mib` MiB here and `--join` puts them back together there, checked by MD5.

    python benchmarks/gpu_study.py --dry-run --out /tmp/gpu-dry      # the CPU rehearsal (the slow test tier runs it)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_MD5 = "eaa4df7af2b441c336dbc1e46c2e94d7"  # ../shared/datasets/imagenette2-160.tgz
DEFAULT_PART_MIB = 60
SMALL_FILES = ("config.json", "metrics.jsonl", "summary.json", "eval.json", "study.json", "samples.npz",
               "report.md", "report.html")

# (preset, parallel workers, seconds) on a GPU; the dry run uses the smoke preset for each, one worker
STUDIES = [("notebook", 9, 130), ("study160", 9, 150), ("fair", 9, 110)]


def md5(path: Path) -> str:
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "md5")
    return h.hexdigest()


def split_archive(archive: Path, into: Path, part_mib: int = DEFAULT_PART_MIB) -> list[Path]:
    """Cut `archive` into parts of at most `part_mib` MiB (named NAME.part-0, NAME.part-1, ...)."""
    into.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(archive, "rb") as f:
        while block := f.read(part_mib * 2**20):
            part = into / f"{archive.name}.part-{len(parts)}"
            part.write_bytes(block)
            parts.append(part)
    return parts


def join_parts(parts: list[Path], out: Path, expected_md5: str) -> Path:
    """Concatenate the parts into `out` and check its MD5 (a wrong or missing part is an error)."""
    with open(out, "wb") as f:
        f.writelines(part.read_bytes() for part in parts)
    got = md5(out)
    if got != expected_md5:
        out.unlink()
        raise SystemExit(f"joined archive has MD5 {got}, expected {expected_md5}: a part is missing or damaged")
    return out


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 -- the log stays open for the whole run
        self.start = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.start:6.0f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")


def run_for(cmd: list[str], seconds: float, log: Log, env: dict | None = None, cwd: Path = ROOT) -> int | None:
    """Run `cmd` for at most `seconds` (SIGINT at the deadline, then SIGKILL); its output goes to the log."""
    log(f"$ {' '.join(cmd)}  (budget {seconds:.0f}s)")
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log.file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        log(f"budget spent: stopping {cmd[2] if len(cmd) > 2 else cmd[0]} (it checkpoints and can be resumed)")
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def run_study(preset: str, workers: int, seconds: float, study: Path, common: list[str], log: Log) -> None:
    """`workers` compare processes on one study folder (they share it through run locks), then the report."""
    cmd = [sys.executable, "-m", "patchbench", "compare", "--preset", preset, "--out", str(study), "--no-report",
           "--no-progress", *common]
    log(f"study {preset}: {workers} worker(s), budget {seconds:.0f}s")
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=log.file, stderr=subprocess.STDOUT, start_new_session=True)
             for _ in range(workers)]
    deadline = time.time() + seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    if (study / "runs").exists():
        run_for([sys.executable, "-m", "patchbench", "report", str(study)], 60, log)


def pack(studies: Path, out: Path) -> Path:
    """The studies' small files (and figures), no checkpoints, as one .tar.gz."""
    tar_path = out / "studies.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in sorted(studies.rglob("*")):
            keep = path.is_file() and (path.name in SMALL_FILES or path.parent.name == "figures")
            if keep and "checkpoint" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(studies)))
    return tar_path


def time_to(metrics: Path, top1: float) -> float | None:
    """Seconds of training (summed epoch times) until the first epoch at or above `top1`."""
    total = 0.0
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        total += row["epoch_time_s"]
        if row["val_top1"] >= top1:
            return total
    return None


def summarise(studies: Path) -> dict:
    out = {}
    for summary in sorted(studies.glob("*/runs/*/summary.json")):
        s = json.loads(summary.read_text())
        s.setdefault("lowest_loss_top1", s.get("best_top1"))  # its name before run-directory schema 2
        row = {k: s.get(k) for k in ("status", "final_top1", "lowest_loss_top1", "epochs_done", "wall_time_s",
                                     "train_images_per_s")}
        metrics = summary.with_name("metrics.jsonl")
        if metrics.exists():
            row["time_to_90pct_s"] = time_to(metrics, 0.90)
        out[f"{summary.parts[-4]}/{summary.parts[-2]}"] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for what comes back (four files)")
    p.add_argument("--data", help="the Imagenette-160 archive (or an image folder)")
    p.add_argument("--md5", default=ARCHIVE_MD5, help="the archive's expected MD5 (default: ../shared's copy)")
    p.add_argument("--join", nargs="+", metavar="PART", help="join these archive parts into --data first")
    p.add_argument("--split-archive", metavar="ARCHIVE", help="only cut ARCHIVE into parts under --into, and stop")
    p.add_argument("--into", default=".gpu-data", help="where --split-archive writes the parts")
    p.add_argument("--part-mib", type=int, default=DEFAULT_PART_MIB, help="--split-archive's part size in MiB")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU: smoke preset, a generated "
                   "folder, minutes of budget shrunk to seconds")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time budget")
    args = p.parse_args(argv)

    if args.split_archive:
        for part in split_archive(Path(args.split_archive), Path(args.into), args.part_mib):
            print(f"{part} ({part.stat().st_size / 2**20:.1f} MiB)")
        print(f"md5 of the whole: {md5(Path(args.split_archive))}")
        return 0
    if not args.out:
        p.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-study-"))
    log = Log(out / "gpu_study.log")
    env = {"PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)
    device = "cpu" if args.dry_run else "cuda"

    if args.join:
        data = join_parts([Path(x) for x in args.join], Path(args.data or work / "imagenette2-160.tgz"), args.md5)
        log(f"joined {len(args.join)} parts into {data}, MD5 {args.md5} checked")
    elif args.dry_run:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from common import generated_folder

        data = generated_folder(work / "images", classes=3, train=16, val=4, size=32)
    else:
        data = Path(args.data) if args.data else None
        if data is None or not data.exists():
            p.error("--data ARCHIVE is required on a GPU (or --join PARTS)")
    scale = args.budget_scale * (0.25 if args.dry_run else 1.0)

    # 1. the environment
    run_for([sys.executable, "-c", ("import torch, torchvision, platform; print('python', platform.python_version(), "
             "'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), "
             "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")], 60, log)
    if not args.dry_run:
        run_for(["nvidia-smi"], 30, log)

    # 2. the tests that need a device
    run_for([sys.executable, "-m", "pytest", "-m", "device", "-q", "-x", "-p", "no:cacheprovider",
             "-o", "addopts="], 60 * scale if not args.dry_run else 120, log,
            env={"PATCHBENCH_TEST_DEVICE": device})

    # 3. bench with MFU against timm
    bench = (["--model", "convmixer_256_12", "--img-size", "160", "--batch-size", "256", "--dtype", "bf16",
              "--channels-last", "--against", "timm", "--repeats", "10", "--warmup", "3"] if not args.dry_run else
             ["--model", "resnet9", "--img-size", "32", "--batch-size", "8", "--repeats", "1", "--warmup", "1"])
    run_for([sys.executable, "-m", "patchbench", "bench", *bench, "--device", device, "--out", str(out / "bench.json")],
            70 * scale if not args.dry_run else 120, log)

    # 4. the studies
    studies = work / "studies"
    common = ["--data", str(data), "--device", device]
    if args.dry_run:
        common += ["--cache-dir", str(work / "cache"), "--seeds", "0"]
    for preset, workers, seconds in STUDIES:
        if args.dry_run:
            run_study("smoke", 1, 120, studies / preset, common, log)
        else:
            run_study(preset, workers, seconds * scale, studies / preset, common, log)

    # 5. what comes back
    pack(studies, out)
    summary = {"device": device, "dry_run": args.dry_run, "data": str(data), "runs": summarise(studies),
               "seconds": round(time.time() - log.start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done in {summary['seconds']}s: {', '.join(sorted(f.name for f in out.iterdir()))}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
