"""The single `mer` entry point: one subcommand per stage of pipelines/stages.py (STAGES), each run by the one
generic runner (mer.components.common.run_command: params, overrides, a user error as one line and exit code 2).

Nothing imports this module: it sits on top of every layer. Stage functions defer heavy imports (torch, Ray Tune,
MLflow) until they run, so that `mer --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from importlib import metadata

from mer.components.common import add_params_arguments, run_command
from mer.model.logging_utils import setup_logging
from mer.pipelines.stages import STAGES, StageEntry


def _version() -> str:
    try:
        return metadata.version("mer-platform")
    except metadata.PackageNotFoundError:  # a checkout run without `make install`
        return "unknown (not installed)"


def _description(entry: StageEntry) -> str:
    """What `mer COMMAND --help` says above the options: the entry's description, or its one-line help followed by
    the first paragraph of its function's module docstring (the same text a reader of the code gets)."""
    if entry.description:
        return textwrap.fill(entry.description, 100)
    doc = (sys.modules[entry.function.__module__].__doc__ or "").strip().split("\n\n")[0]
    return "\n\n".join(textwrap.fill(part, 100) for part in (entry.help, " ".join(doc.split())) if part)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mer", description="Micro-expression recognition experiment platform")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="informative output: every component's INFO and DEBUG lines (default: the platform's own "
                             "progress and results, warnings of other libraries only)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in STAGES.entries():
        command = sub.add_parser(entry.name, help=entry.help, description=_description(entry),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        if entry.arguments is not None:
            entry.arguments(command)
        add_params_arguments(command)
        command.set_defaults(stage=entry)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    entry: StageEntry = args.stage
    return run_command(f"mer {entry.name}", entry.function, args, with_args=entry.arguments is not None)


if __name__ == "__main__":
    sys.exit(main())
