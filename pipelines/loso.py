"""The tune stage (`mer tune`): training + Optuna search on Ray Tune over the folds of `train.split`, tracked; the
chosen settings' pooled results under `tune.results` (pipelines/engine/driver.py `run_tune`).

`tune` is its one entry point: `mer tune` (the DVC stage), the Kubeflow tune step (in its pod, or as this module's
command in a Ray job) and `python -m mer.pipelines.loso`, the same command by module name for `ray job submit` (it
needs the installed `mer` package, not the `mer` script on the job's PATH):

    python -m mer.pipelines.loso --params params.yaml [-S key=value ...]             # laptop: local Ray
    ray job submit --working-dir . -- python -m mer.pipelines.loso --params params.yaml  # cluster: the job's Ray
    mer tune                                                                     # the DVC stage
"""

from __future__ import annotations

import argparse
import sys

from mer.components.common import add_params_arguments, run_command
from mer.components.settings import Params
from mer.model.logging_utils import setup_logging
from mer.model.training.results import ExperimentSummary
from mer.pipelines.engine.preflight import check_experiment


def tune(params: Params) -> ExperimentSummary:
    """Run the tune stage; returns the summary written to `tune.results`. A configuration error is found in a second,
    before torch, Ray Tune and MLflow are imported."""
    check_experiment(params)
    from mer.pipelines.engine.driver import run_tune  # Ray Tune: imported when the stage runs, not for --help

    return run_tune(params)


def main(argv: list[str] | None = None) -> int:
    """`python -m mer.pipelines.loso`: `mer tune` under the name a Ray job runs."""
    parser = argparse.ArgumentParser(prog="python -m mer.pipelines.loso", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command("mer.pipelines.loso", tune, args)


if __name__ == "__main__":
    sys.exit(main())
