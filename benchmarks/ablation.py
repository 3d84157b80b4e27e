"""Ablation of the main system (CVA + FPF + AU) on the MEGC2019 composite, the way the seed paper argues for each part.

    python benchmarks/ablation.py                      # shared part (CASME II + SMIC), CPU, 3 seeds per variant
    python benchmarks/ablation.py --repeats 1          # one run per variant (time: below)
    python benchmarks/ablation.py --root /data/megc2019-full --au-sheets casme2=... samm=...

One part is changed at a time from the `cva-fpf-flow-cpu` recipe of the benchmark's catalogue (everything else as
chosen by its inner-validation search): attention CVA / CA (MMNet's) / none; AU predicted (joint head) / annotated (AU
vector as input: leaks labels, flagged) / none; position FPF / PC / none. Every variant runs through `mer benchmark`
on the five subject-grouped folds of `subject_5fold` under the `inner` protocol (honest; eight times cheaper than
LOSO, so the numbers compare variants with each other, not with published LOSO results). FPF and PC need face crops
(`datasets/combined_datasets_whole`, which the shared part now has): where a collection has none, their rows are
listed with that reason instead of being run. Each variant runs `--repeats` times (default 3; `tune.repeats`: seeds
derived from train.seed, the repeats' folds in parallel), so the run-to-run spread of every row is a measured column
(mean +- sd) next to its single run: the ablation's differences have flipped sign between single runs before
(docs/results.md). Each variant trains single models (`--ensemble 1`; the base entry's recipe has two members) so that
the repeats measure the seed spread. Time on 2 idle cores: 14.9 min for the committed run (seven variants, FPF and PC
included, three seeds each; git cb178ff). Writes results/ablation/ (results.md/csv/png, settings.json). """

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("MER_SHARED_DATA", REPO.parent / "shared" / "data"))
BASE_ENTRY = "cva-fpf-flow-cpu"
FACE_CROPS = "datasets/combined_datasets_whole"  # the composite's apex crops, when distributed
# key -> (label, kwargs changed from the base entry, needs face crops)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "abl-cva-au-predicted": ("CVA, AU predicted, no position (base)", {}, False),
    "abl-ca-au-predicted": ("CA (MMNet) instead of CVA", {"attention": "ca"}, False),
    "abl-none-au-predicted": ("no attention", {"attention": "none"}, False),
    "abl-cva-au-none": ("no AU head", {"au_mode": "none"}, False),
    "abl-cva-au-annotated": ("AU annotated as input (leaky)", {"au_mode": "annotated"}, False),
    "abl-cva-fpf": ("+ FPF on the apex crop", {"position": "fpf", "position_frames": ["apex224"]}, True),
    "abl-cva-pc": ("+ PC on the apex crop", {"position": "pc", "position_frames": ["apex224"]}, True),
}


def ablation_catalogue(catalogue_path: Path, work: Path, ensemble: int) -> Path:
    """The benchmark's catalogue with benchmark.models replaced by the variants of BASE_ENTRY (`ensemble` members per
    fold), written under `work`."""
    from mer.model.io import atomic_write

    catalogue = yaml.safe_load(catalogue_path.read_text())
    base = catalogue["benchmark"]["models"][BASE_ENTRY]
    models = {}
    faces = base.get("faces", {})
    for key, (label, change, needs_faces) in VARIANTS.items():
        entry = copy.deepcopy(base)
        entry.pop("faces", None)  # the variants set the position branch explicitly
        if change.get("position") == "fpf":  # FPF as the base entry's search chose it: Swin size, start scale
            change = {**{k: v for k, v in faces.items() if k == "position_scale" or k.startswith("swin_")}, **change}
        if not needs_faces:
            entry.pop("face_size", None)
        entry["kwargs"] = {**entry.get("kwargs", {}), **change}
        entry["train"] = {**entry.get("train", {}), "split": "subject_5fold", "ensemble": ensemble}
        entry["label"] = label
        models[key] = entry
    catalogue["benchmark"].update(models=models, default_models=[], work=str(work / "work"),
                                  baseline=[next(iter(VARIANTS))])  # each variant's paired difference to the base
    work.mkdir(parents=True, exist_ok=True)
    path = work / "catalogue.yaml"
    atomic_write(path, yaml.safe_dump(catalogue, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(SHARED / "megc2019-composite"))
    parser.add_argument("--au-sheets", nargs="+",
                        default=[f"casme2={SHARED / 'annotations' / 'CASME2-coding-20140508.xlsx'}"])
    parser.add_argument("--out", default=str(REPO / "results" / "ablation"))
    parser.add_argument("--work", default=str(REPO / "runs" / "ablation"))
    parser.add_argument("--repeats", type=int, default=3,
                        help="independent runs per variant with seeds derived from train.seed (tune.repeats), run in "
                             "parallel; the tables then give mean +- sd over them")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="seed-ensemble members per fold (the base entry has 2; 1 = single models, whose spread "
                             "over the repeats is what the ablation measures)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="extra params override")
    args = parser.parse_args()

    from mer.model.io import atomic_write
    from mer.pipelines.benchmark import portable_path
    from mer.pipelines.cli import main as mer

    has_faces = (Path(args.root) / FACE_CROPS).is_dir()
    runnable = [k for k, (_, _, faces) in VARIANTS.items() if has_faces or not faces]
    catalogue = ablation_catalogue(REPO / "benchmarks" / "catalogue.yaml", Path(args.work), args.ensemble)
    argv = ["benchmark", "megc2019", "--root", args.root, "--out", args.out, "--params", str(REPO / "params.yaml"),
            "--catalogue", str(catalogue),
            "--au-sheets", *args.au_sheets, "--models", *runnable, "--protocol", "inner",
            "-S", f"tune.repeats={args.repeats}", *[x for s in args.overrides for x in ("-S", s)]]
    logging.getLogger("benchmarks").info("mer %s", " ".join(argv))
    code = mer(argv)
    if code:
        return code
    results = Path(args.out) / "results.md"
    skipped = [k for k in VARIANTS if k not in runnable]
    if skipped:
        lines = ["", "## Not runnable on this data", ""]
        lines += [f"* {VARIANTS[k][0]} (`{k}`): needs face crops; {portable_path(args.root, '<megc2019 root>')} has no {FACE_CROPS}, so the position "
                  "branch has nothing to read."
                  for k in skipped]
        atomic_write(results, results.read_text() + "\n".join(lines) + "\n")
    print(results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
