"""Subcommands of the `patchbench` CLI, one module each (see patchbench.cli)."""

from patchbench.commands import (
    ablate,
    bench,
    compare,
    data,
    evaluate,
    models,
    predict,
    report,
    sweep,
    train,
    tune,
)

# Order as shown in `patchbench --help`.
COMMANDS = [models, data, train, evaluate, predict, compare, sweep, ablate, tune, report, bench]
