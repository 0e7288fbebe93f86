"""A study's report: a pure function of its run directories (markdown + self-contained HTML + PNGs).

    write_report("studies/quick")         # -> report.md, report.html, figures/*.png in that folder

Four modules, imports flowing one way: `render` (text, HTML, files) -> `figures` (one function per
figure) -> `stats` (means, spreads, tests, the conclusion) -> `load` (run and study directories,
read through patchbench.rundir). None of them imports torch or the training code.
"""

from patchbench.report.load import Group, Run, Study, group_runs, load_run, load_study
from patchbench.report.render import (
           FORMATS,
           Report,
           build_report,
           parse_formats,
           save_report,
           to_text,
           write_report,
)

__all__ = ["FORMATS", "Group", "Report", "Run", "Study", "build_report", "group_runs", "load_run", "load_study",
           "parse_formats", "save_report", "to_text", "write_report"]
