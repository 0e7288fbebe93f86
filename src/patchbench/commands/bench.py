"""`patchbench bench` (placeholder while it is being built; replaced by its owner)."""

from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("bench", help="(being built)")
    p.set_defaults(func=run)


def run(args):
    raise UserError("'patchbench bench' is not built yet")
