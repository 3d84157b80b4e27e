"""Helpers shared by the component CLIs: the params file and `-S key=value` overrides."""

from __future__ import annotations

import argparse

from mer_model.config import Params, load_params, parse_override


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, e.g. -S train.epochs=3 (repeatable)",
    )


def params_from_args(args: argparse.Namespace) -> Params:
    overrides = dict(parse_override(text) for text in args.overrides)
    return load_params(args.params, overrides)
