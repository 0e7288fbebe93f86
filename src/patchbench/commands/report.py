"""`patchbench report` (placeholder while it is being built; replaced by its owner)."""

from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("report", help="(being built)")
    p.set_defaults(func=run)


def run(args):
    raise UserError("'patchbench report' is not built yet")
