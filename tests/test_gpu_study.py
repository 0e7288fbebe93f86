"""benchmarks/gpu_study.py: the GPU script's dry run on the CPU (end to end), and the archive in parts."""

import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_study.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_goes_end_to_end_and_brings_back_four_files(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], check=False, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "gpu_study.log", "studies.tar.gz", "summary.json"]
    log = (out / "gpu_study.log").read_text()
    assert "passed" in log  # the device tests ran (on the CPU here)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and len(summary["runs"]) == 9  # 3 studies x 3 models
    assert all(r["status"] == "finished" for r in summary["runs"].values())
    with tarfile.open(out / "studies.tar.gz") as tar:
        names = tar.getnames()
    for study in ("notebook", "study160", "fair"):
        assert f"{study}/report.md" in names and f"{study}/study.json" in names
    assert not any("checkpoint" in n or n.endswith(".safetensors") for n in names)
    assert json.loads((out / "bench.json").read_text())["results"][0]["images_per_s"] > 0


def test_the_archive_travels_in_parts_and_is_checked_when_joined(tmp_path):
    gpu = load_script()
    archive = tmp_path / "a.tgz"
    archive.write_bytes(bytes(range(256)) * (10 * 2**10))  # 2.5 MiB: three parts of at most 1 MiB
    parts = gpu.split_archive(archive, tmp_path / "parts", part_mib=1)
    assert [p.stat().st_size for p in parts] == [2**20, 2**20, 2**19]
    expected = hashlib.md5(archive.read_bytes()).hexdigest()
    joined = gpu.join_parts(parts, tmp_path / "joined.tgz", expected)
    assert joined.read_bytes() == archive.read_bytes()
    with pytest.raises(SystemExit, match="a part is missing or damaged"):
        gpu.join_parts(parts[:2], tmp_path / "short.tgz", expected)
    assert not (tmp_path / "short.tgz").exists()
