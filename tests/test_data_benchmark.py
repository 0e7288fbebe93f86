"""The data pipeline benchmark runs end to end on a small generated folder (a smoke test, not a timing)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "data_pipeline.py"


def test_benchmark_prints_table_and_ratio(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # the script imports its sibling benchmarks/common.py
    spec = importlib.util.spec_from_file_location("data_pipeline", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = bench.generated_folder(tmp_path / "gen", classes=2, train=8, val=2, size=40)
    bench.main(["--data", str(folder), "--cache-dir", str(tmp_path / "cache"), "--img-size", "32",
                "--batch-size", "4", "--workers", "1", "--device", "cpu", "--max-batches", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio=") and float(lines[-1].split("=")[1]) > 0
    table = "\n".join(lines)
    assert "| ImageFolder + PIL, 1 workers (the study's) | cpu | 8 |" in table
    assert "| patchbench Loader (uint8 cache, batched augment) | cpu | 8 |" in table
    assert "patchbench's CPU path: torch's per-sample uint8 antialiased resize" in table
