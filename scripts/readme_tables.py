"""Rewrite the result tables (and their conclusions) of README.md and docs/RESULTS.md from results/<study>/.

    .venv/bin/python scripts/readme_tables.py        # after `patchbench report results/<study>`

Each table sits between `<!-- table: results/NAME -->` and `<!-- end table -->`; tests/test_readme.py
fails when one no longer matches its study.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from patchbench.report.render import README_BLOCK, study_summary

PAGES = ("README.md", "docs/RESULTS.md")  # the pages that show committed studies (tests/test_readme.py reads them)


def main() -> None:
    written = 0
    for page in PAGES:
        path = ROOT / page
        new = README_BLOCK.sub(lambda m: "\n".join([f"<!-- table: {m.group(1)} -->", *study_summary(ROOT / m.group(1)),
                                                    "<!-- end table -->"]), path.read_text())
        path.write_text(new)
        written += len(README_BLOCK.findall(new))
    print(f"{written} table(s) written")


if __name__ == "__main__":
    main()
