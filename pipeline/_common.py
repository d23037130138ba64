"""What every stage script shares: argument parsing, loading the params, the one-line error exit."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from kdcompress.config import load_params
from kdcompress.runtime import seed_everything
from kdcompress.types import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user mistake
        raise UserError(f"{self.prog}: {message}")


def parser(description: str, params: bool = True, **paths: str) -> argparse.ArgumentParser:
    """A parser with ``--params`` (for the stages that read params.yaml) and one ``--<name>`` option
    per path (with its default)."""
    p = _Parser(prog=f"python -m pipeline.{description}", description=description)
    if params:
        p.add_argument("--params", default="params.yaml")
    for name, default in paths.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    return p


def stage(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a stage's main(): a UserError becomes one line on stderr and exit code 2; main's own
    exit code (that of its workers, when it started several processes) otherwise, 0 for None."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as err:
            folder = os.environ.get("KDCOMPRESS_ERROR_DIR")  # a worker: its launcher prints the line, once
            if folder and os.path.isdir(folder):
                with open(os.path.join(folder, os.environ.get("RANK", "0")), "w") as f:
                    f.write(f"error: {err}\n")
            else:
                print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def setup(argv, description: str, **paths: str):
    """Parse arguments, load and check all params, seed."""
    args = parser(description, **paths).parse_args(argv)
    params = load_params(args.params)
    seed_everything(params["base"].seed, params["base"].num_threads)
    return args, params
