"""The MEGC2019 composite benchmark: every model under the honest protocols (and oracle for the reproduction check),
through `mer benchmark` (ingest -> preprocess -> Ray Tune LOSO driver -> MLflow), then the table is printed.

    python benchmarks/megc2019.py                       # CPU: reduced configs/epochs (about 30-40 min on 2 cores)
    python benchmarks/megc2019.py --full                # GPU: every model with its params.yaml recipe (HTNet paper:
                                                        #   139.6M parameters, 800 epochs per fold), all protocols
    python benchmarks/megc2019.py --root /data/megc2019-full --au-sheets casme2=... samm=...

The CPU reductions are the overrides in CPU_RUNS below (fewer epochs, two-frame models on the 28x28 flow upsampled to
32 px instead of 112 with narrower stages); HTNet's paper configuration is left out on CPU (one epoch of one fold
takes minutes there). Results land in results/megc2019/ (results.md, results.csv, results.png, settings.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("MER_SHARED_DATA", REPO.parent / "shared" / "data"))
TWO_FRAME_CPU = {"img_size": 32, "act_channels": 16, "stage_channels": [16, 16, 32, 64]}
# Reduced settings for a CPU: (models, protocols, per-model overrides). The fixed epoch count is the median epoch
# that `inner` selected on validation subjects (benchmark.fixed_epochs_from_inner), so no test fold picks it.
CPU_EPOCHS = {"htnet-small": 8, "ststnet": 15, "mmnet-flow": 5, "cva-fpf-flow": 5, "cva-fpf-flow-au": 5}
CPU_RUNS = [
    (list(CPU_EPOCHS), ["inner", "fixed"]),
    (["htnet-small", "ststnet"], ["oracle"]),  # reproduction check (HTNet) and the size of the leak (baseline)
]


def cpu_overrides() -> list[str]:
    sets = [f"benchmark.models.{m}.train.epochs={e}" for m, e in CPU_EPOCHS.items()]
    for model in ("mmnet-flow", "cva-fpf-flow", "cva-fpf-flow-au"):
        sets += [f"benchmark.models.{model}.kwargs.{k}={v}" for k, v in TWO_FRAME_CPU.items()]
    return [x for s in sets for x in ("-S", s.replace(" ", ""))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(SHARED / "megc2019-composite"))
    parser.add_argument("--au-sheets", nargs="+",
                        default=[f"casme2={SHARED / 'annotations' / 'CASME2-coding-20140508.xlsx'}"])
    parser.add_argument("--out", default=str(REPO / "results" / "megc2019"))
    parser.add_argument("--full", action="store_true", help="params.yaml recipes, every model and protocol (GPU)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="extra params override")
    args = parser.parse_args()

    from pipelines.cli import main as mer

    common = ["--root", args.root, "--out", args.out, "--params", str(REPO / "params.yaml"), "--au-sheets",
              *args.au_sheets]
    extra = [x for s in args.overrides for x in ("-S", s)]
    runs = [(None, None)] if args.full else CPU_RUNS
    for models, protocols in runs:
        argv = ["benchmark", "megc2019", *common, *extra]
        if models:
            argv += ["--models", *models, "--protocol", *protocols, *cpu_overrides()]
        logging.getLogger("benchmarks").info("mer %s", " ".join(argv))
        code = mer(argv)
        if code:
            return code
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
