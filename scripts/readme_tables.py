"""Rewrite the README's result tables (and their conclusions) from the committed studies (results/<study>/).

    .venv/bin/python scripts/readme_tables.py        # after `patchbench report results/<study>`

Each table sits between `<!-- table: results/NAME -->` and `<!-- end table -->`; tests/test_readme.py
fails when one no longer matches its study.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from patchbench.report.render import study_summary  # noqa: E402

BLOCK = re.compile(r"(<!-- table: (results/[\w.-]+) -->\n)(.*?)\n?<!-- end table -->", re.S)  # may be empty


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + "\n".join(study_summary(ROOT / m.group(2))) + "\n<!-- end table -->", text)
    readme.write_text(new)
    print(f"{len(BLOCK.findall(new))} table(s) written")


if __name__ == "__main__":
    main()
