"""FPF's cost per LOSO fold on the CPU, at the CPU recipe's size, beside the STSTNet baseline; and what the cost of
the crops is made of.

The complete main system (CVA + FPF + AU, `cva-fpf-flow-cpu` with its `faces` variant: the Swin focaliser on the
apex crop) trains one LOSO fold of the shared MEGC2019 composite for `--epochs` epochs with the benchmark's recipe,
then the same network without FPF, then STSTNet (`ststnet-cpu`), each through the trainer the benchmark runs
(`train_fold`, protocol `fixed`, one ensemble member, one torch thread as a fold task has with tune.fold_cpus 1).
The crops are tried twice: cached at 224 px as the composite distributes them (the network resizes every batch to
its `img_size`, and the stacked CPU data path augments 224 px crops), and cached at the network's own size
(`preprocess.face_size` = `img_size`: the resize done once per sample at preprocessing). Printed per configuration:
seconds per epoch (median of the epochs after the first), the projected fold time (x recipe epochs x ensemble
members) and its ratio to STSTNet's; then the time of the per-batch resize alone over one epoch's batches.

    python benchmarks/fold_cost.py [--root ../shared/data/megc2019-composite] [--epochs 3] [--fold casme2/sub17]
        [--au-sheet ../shared/data/annotations/CASME2-coding-20140508.xlsx]

It preprocesses the composite twice into a temporary folder (no Ray). The defaults read the shared data
(`MER_SHARED_DATA`, else ../shared/data), as the other benchmarks do.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MER_SHARED_DATA", REPO.parent / "shared" / "data"))
MAIN, BASELINE = "cva-fpf-flow-cpu", "ststnet-cpu"


def prepare(root: Path, au_sheet: Path | None, work: Path, face_size: int) -> Any:
    """The composite ingested and preprocessed (flow28, apex224 at `face_size`, aus) under `work`, by the stage's own
    per-sample function and cache writer in this process (no Ray, so no lock: only reading a map and a crop per
    sample): a SampleStore."""
    from mer.components.ingest import ingest
    from mer.components.settings import load_params, with_overrides
    from mer.model.data import read_table
    from mer.model.preprocess.cache import Cache, process_row
    from mer.model.training.data import SampleStore

    params = with_overrides(load_params(REPO / "params.yaml"), {
        "data.source": "megc2019", "data.root": str(root), "data.class_set": "megc2019_3",
        "data.au_sheets": {"casme2": str(au_sheet)} if au_sheet else {},
        "data.ingested": str(work / "ingested" / "annotations.csv"), "preprocess.out": str(work / "cache"),
        "preprocess.face_size": face_size}, "fold cost")
    ingest(params)
    table, cfg, modalities = read_table(params.data.ingested), params.preprocess, ("flow28", "apex224", "aus")
    cache = Cache(cfg.out)
    todo = cache.plan(table, cfg, modalities)
    for row in table.to_dict("records"):
        cache.write(process_row(row, cfg, root, todo[row["sample_id"]]))
    cache.finish(table, cfg, modalities, {"class_names": ["negative", "positive", "surprise"]})
    return SampleStore.open(cfg.out)


def per_epoch(store: Any, fold_name: str, key: str, faces: bool, epochs: int) -> tuple[float, int, int]:
    """(median seconds per epoch after the first, the recipe's epochs, its ensemble members) of one fold."""
    import torch

    from mer.components.settings import CATALOGUE, load_catalogue
    from mer.model.config import ModelConfig, TrainConfig
    from mer.model.training.folds import loso_folds
    from mer.model.training.trainer import FoldSpec, train_fold

    entry = load_catalogue(REPO / CATALOGUE).models[key]
    kwargs = {**entry.kwargs, **(entry.faces if faces else {})}
    train = TrainConfig(**{**entry.train, "epochs": epochs, "protocol": "fixed", "ensemble": 1, "device": "cpu"})
    fold = next(f for f in loso_folds(store.index) if f.name == fold_name)
    torch.set_num_threads(1)
    result = train_fold(FoldSpec(ModelConfig(name=entry.name, config=entry.config, kwargs=kwargs), train, fold,
                                 store.class_names), store)
    times = [e["time_s"] for e in result.history][1:] or [result.history[0]["time_s"]]
    return statistics.median(times), int(entry.train.get("epochs", 0)), int(entry.train.get("ensemble", 1))


def resize_cost(store: Any, fold_name: str) -> tuple[float, int]:
    """(seconds, batches) of the main system's per-batch crop resize (224 -> img_size, antialiased) over one epoch of
    the fold's training samples, at its batch size."""
    import torch
    import torch.nn.functional as F

    from mer.components.settings import CATALOGUE, load_catalogue
    from mer.model.training.folds import loso_folds

    entry = load_catalogue(REPO / CATALOGUE).models[MAIN]
    size, batch = int(entry.kwargs["img_size"]), int(entry.train["batch_size"])
    fold = next(f for f in loso_folds(store.index) if f.name == fold_name)
    n = len(store.sample_ids(fold.train_subjects))
    crops = torch.rand(batch, 3, 224, 224)
    torch.set_num_threads(1)
    steps = -(-n // batch)
    start = time.perf_counter()
    for _ in range(steps):
        F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return time.perf_counter() - start, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHARED / "megc2019-composite")
    parser.add_argument("--au-sheet", type=Path, default=SHARED / "annotations" / "CASME2-coding-20140508.xlsx")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per configuration (the first is dropped)")
    parser.add_argument("--fold", default="casme2/sub17", help="the LOSO fold (its test subject)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from mer.components.settings import CATALOGUE, load_catalogue
    from mer.model.training.folds import loso_folds

    size = int(load_catalogue(REPO / CATALOGUE).models[MAIN].kwargs["img_size"])
    with tempfile.TemporaryDirectory(prefix="mer-fold-cost-") as tmp:
        full = prepare(args.root, args.au_sheet if args.au_sheet.is_file() else None, Path(tmp) / "224", 224)
        small = prepare(args.root, args.au_sheet if args.au_sheet.is_file() else None, Path(tmp) / "small", size)
        n_train = len(full.sample_ids(next(f for f in loso_folds(full.index) if f.name == args.fold).train_subjects))
        rows = [(f"STSTNet ({BASELINE})", *per_epoch(full, args.fold, BASELINE, False, args.epochs)),
                (f"CVA+AU, FPF off ({MAIN} without faces)", *per_epoch(full, args.fold, MAIN, False, args.epochs)),
                ("CVA+FPF+AU, crops cached at 224 px", *per_epoch(full, args.fold, MAIN, True, args.epochs)),
                (f"CVA+FPF+AU, crops cached at {size} px", *per_epoch(small, args.fold, MAIN, True, args.epochs))]
        resize_s, steps = resize_cost(full, args.fold)
    base = rows[0][1] * rows[0][2] * rows[0][3]
    print(f"fold {args.fold}: {n_train} training samples; one torch thread; {args.epochs} timed epochs each")
    print(f"{'configuration':<50} {'s/epoch':>8} {'epochs x members':>17} {'fold s':>8} {'x STSTNet':>10}")
    for label, seconds, epochs, members in rows:
        fold_s = seconds * epochs * members
        print(f"{label:<50} {seconds:>8.2f} {f'{epochs} x {members}':>17} {fold_s:>8.0f} {fold_s / base:>10.1f}")
    print(f"per-batch crop resize 224 -> {size} px alone: {resize_s:.2f} s per epoch ({steps} batches of one fold)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
