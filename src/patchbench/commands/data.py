"""`patchbench data` (placeholder while it is being built; replaced by its owner)."""

from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("data", help="(being built)")
    p.set_defaults(func=run)


def run(args):
    raise UserError("'patchbench data' is not built yet")
