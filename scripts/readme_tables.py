"""Rewrite the README's result tables (and their conclusions) from the committed studies (results/<study>/).

    .venv/bin/python scripts/readme_tables.py        # after `patchbench report results/<study>`

Each table sits between `<!-- table: results/NAME -->` and `<!-- end table -->`; tests/test_readme.py
fails when one no longer matches its study.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from patchbench.report.render import README_BLOCK, study_summary  # noqa: E402


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = README_BLOCK.sub(lambda m: "\n".join([f"<!-- table: {m.group(1)} -->", *study_summary(ROOT / m.group(1)),
                                                "<!-- end table -->"]), text)
    readme.write_text(new)
    print(f"{len(README_BLOCK.findall(new))} table(s) written")


if __name__ == "__main__":
    main()
