"""Command line ``switchcit``: every command lives beside its code and registers itself through
``add_command(subparsers)``; heavy dependencies are imported only when a command runs."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

COMMAND_MODULES = ("switchcit.demo", "switchcit.cit.commands", "switchcit.serving.app", "switchcit.serving.gateway")


def command_error(command: str, error: Exception) -> NoReturn:
    """A bad command line or input: one line on stderr and exit code 2 (argparse's), no traceback."""
    print(f"switchcit {command}: " + " ".join(str(error).splitlines()), file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="switchcit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(commands)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
