"""`patchbench sweep` (placeholder while it is being built; replaced by its owner)."""

from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("sweep", help="(being built)")
    p.set_defaults(func=run)


def run(args):
    raise UserError("'patchbench sweep' is not built yet")
