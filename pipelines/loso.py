"""The experiment driver's entry points: `python -m pipelines.loso` (what `ray job submit` runs) and `mer tune` (the
DVC stage). Both call `pipelines.engine.driver.run_tune`.

    python -m pipelines.loso --params params.yaml [-S key=value ...]             # laptop: local Ray
    ray job submit --working-dir . -- python -m pipelines.loso --params params.yaml  # cluster: the job's Ray
    mer tune                                                                     # the DVC stage
"""

from __future__ import annotations

import argparse
import sys

from components.common import add_params_arguments, params_from_args
from mer_model.errors import user_error
from mer_model.logging_utils import setup_logging
from pipelines.engine.preflight import check_experiment


def _run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    check_experiment(params)  # a configuration error in a second, before torch, Ray Tune and MLflow are imported
    from pipelines.engine.driver import run_tune  # Ray Tune: imported when the command runs, not for --help

    run_tune(params)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="training + Optuna search on Ray Tune (loso | subject_5fold | lodo folds), tracked")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.loso", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        params = params_from_args(args)
        check_experiment(params)
        from pipelines.engine.driver import run_tune  # Ray Tune: after the configuration is checked

        run_tune(params, source="python -m pipelines.loso")
    except Exception as err:  # noqa: BLE001 - one line for a user error wherever it was raised (see pipelines.cli)
        found = user_error(err)
        if found is None:
            raise
        print(f"pipelines.loso: error: {found}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
