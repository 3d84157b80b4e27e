"""The single `mer` entry point: one subcommand per step (components) and per orchestration (pipelines).

Each module in COMMANDS exposes `register(subparsers)`, which adds its subcommand and sets `func` to a callable taking
the parsed arguments and returning an exit code. Nothing imports this module: it sits on top of every layer. Modules
defer heavy imports (torch, Ray Tune, MLflow) to the command that needs them, so that `mer --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from importlib import metadata

from components import evaluate, ingest, predict, preprocess, register, report, synth
from mer_model.errors import user_error
from mer_model.logging_utils import setup_logging
from pipelines import benchmark, loso

COMMANDS = [synth, ingest, preprocess, loso, evaluate, register, report, predict, benchmark]

log = logging.getLogger("mer")


def _version() -> str:
    try:
        return metadata.version("mer-platform")
    except metadata.PackageNotFoundError:  # a checkout run without `make install`
        return "unknown (not installed)"


def _description(module: object, summary: str | None) -> str:
    """What `mer COMMAND --help` says above the options: the one-line help of `mer --help`, then the first paragraph
    of the command module's docstring (the same text a reader of the code gets)."""
    doc = (getattr(module, "__doc__", None) or "").strip().split("\n\n")[0]
    parts = [(summary or "").strip(), " ".join(doc.split())]
    return "\n\n".join(textwrap.fill(part, 100) for part in parts if part)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mer", description="Micro-expression recognition experiment platform")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="informative output: every component's INFO and DEBUG lines (default: the platform's own "
                             "progress and results, warnings of other libraries only)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        before = set(sub.choices)
        module.register(sub)
        helps = {action.dest: action.help for action in sub._choices_actions}
        for name in set(sub.choices) - before:
            command = sub.choices[name]
            if not command.description:
                command.description = _description(module, helps.get(name))
                command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"mer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a user error raised inside Ray, Tune or MLflow is still one line
        found = user_error(err)
        if found is None:
            raise
        print(f"mer {args.command}: error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
