"""The result tables and conclusions of README.md and docs/RESULTS.md are the committed studies' own
(results/<study>/), regenerated here.

A table in those pages sits between `<!-- table: results/NAME -->` and `<!-- end table -->`; this test
rebuilds it from the run directories with the report's own code and compares line by line.
"""

from pathlib import Path

import pytest

from patchbench.report.render import README_BLOCK, study_summary

ROOT = Path(__file__).resolve().parents[1]


PAGES = ("README.md", "docs/RESULTS.md")  # the pages that show committed studies


def blocks() -> list[tuple[str, list[str]]]:
    return [(path, text.strip().splitlines()) for page in PAGES
            for path, text in README_BLOCK.findall((ROOT / page).read_text())]


def test_the_readme_shows_every_committed_study():
    shown = {path for path, _ in blocks()}
    committed = {f"results/{p.name}" for p in (ROOT / "results").iterdir() if (p / "runs").is_dir()} \
        if (ROOT / "results").is_dir() else set()
    assert committed and committed <= shown | {p for p in committed if "tuning" in p}


@pytest.mark.parametrize("path, lines", blocks(), ids=[p for p, _ in blocks()])
def test_a_readme_table_is_its_study_regenerated(path, lines):
    assert lines == study_summary(ROOT / path)


def test_committed_results_repeat_no_file_and_hold_no_generated_html():
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "ls-files", "results"], cwd=root, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no git here")
    files = done.stdout.split()
    if done.returncode != 0 or not files:
        pytest.skip("not a git checkout")
    seen: dict[str, str] = {}
    for name in files:
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert digest not in seen, f"{name} repeats {seen[digest]}"
        seen[digest] = name
    assert not [f for f in files if f.endswith(".html")]
