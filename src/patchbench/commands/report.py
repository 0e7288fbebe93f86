"""`patchbench report STUDY [--format md,html]`: the study's report from its run directories only."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("report", help="write a study's report (markdown + self-contained HTML)",
                       description="Read STUDY's run directories (never the training code) and write "
                       "STUDY/report.md with figures/*.png and/or a self-contained STUDY/report.html.")
    p.add_argument("study", metavar="STUDY", help="study folder (study.json + runs/), or a folder of run folders")
    p.add_argument("--format", default="md,html", metavar="md,html", help="formats (default: md,html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from patchbench.report import (
        build_report,
        load_study,
        parse_formats,
        save_report,
        to_text,
    )

    formats = parse_formats(args.format)
    study = load_study(args.study)
    report = build_report(study)
    paths = save_report(report, study.path, formats)
    print(to_text(report))
    for path in paths:
        print(f"wrote {path}")
    return 0
