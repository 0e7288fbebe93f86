"""The `patchbench` command line: one subcommand per module in `patchbench.commands`.

Each command module exposes `add_parser(subparsers)` (which sets `func` on its parser) and the
function it points at; the modules import nothing heavy until a command runs, so `--help` and
`--version` are instant. Bad input raises `UserError`: we print it on one line and exit 2 (as
argparse does for its own errors). Anything else is a bug of ours and shows its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys

from patchbench import __version__
from patchbench.commands import COMMANDS
from patchbench.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchbench",
        description="Is it the patches or the attention? Train and compare ConvMixer, ViT and ResNets.",
    )
    parser.add_argument("--version", action="version", version=f"patchbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that went away is handled below
        return status
    except UserError as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"patchbench {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and cut short: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"patchbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
