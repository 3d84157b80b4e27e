"""The prepared GPU benchmark of issue 14: training speed on one GPU, written to results/gpu/ (JSON + Markdown).

Three parts, each on the device the run has (named in the output):

1. train-step time of every registered model at its paper configuration and batch (benchmarks/models.py's
   PAPER_BATCH), float32 vs bfloat16 autocast + channels-last (what `train.amp` selects on a bf16 GPU);
2. a 68-fold LOSO of STSTNet and HTNet-small (recipes: benchmarks/catalogue.yaml `benchmark.models`) on synthetic
   composite-shaped data (68 subjects of 3..10 clips of 28x28 flow maps + five points, 442 clips like the MEGC2019
   composite), one fold at a time vs one fold-batched group (`train_fold_group`, device-resident data). The per-fold
   side trains `--per-fold-folds` folds and extrapolates x68 (said in the table); it runs in ONE process, so it is a
   lower bound of one Ray task per fold, which adds a worker start, imports and a data load per fold;
3. HTNet's paper recipe (the catalogue's `benchmark.models.htnet-paper`: batch 256, 800 epochs): `--htnet-epochs`
   epochs of one fold timed and extrapolated to 800 epochs, and to the 68 folds one after another on this GPU.

    python benchmarks/gpu.py                      # on a GPU machine: <= 8 min on one H200; writes results/gpu/
    python benchmarks/gpu.py --cpu-smoke --out /tmp/gpu-smoke   # seconds: tiny CPU form (run by the test suite)

Targets (issue 14): small model's 68-fold LOSO (100 epochs) <= 60 s; HTNet paper recipe (68 x 800 epochs) <= 5 min;
bf16 + channels-last >= 2x the float32 step.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PAPER_BATCH = {"htnet": 256, "ststnet": 256, "mmnet": 34, "cva_fpf": 34, "mol": 32}
COMPOSITE_CLASSES = ["negative", "positive", "surprise"]
log = logging.getLogger("benchmarks.gpu")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_batch(keys: tuple[str, ...], batch: int, classes: int, device: Any) -> dict[str, Any]:
    """A batch of random arrays with the cache shapes and dtypes of the batch-key spec, converted like training data."""
    import torch

    from mer.model.batch_keys import BATCH_KEYS, example_array
    from mer.model.config import PreprocessConfig
    from mer.model.training.data import batch_tensor

    rng = np.random.default_rng(0)
    cfg = PreprocessConfig()
    out = {}
    for key in keys:
        if key == "label":
            out[key] = torch.arange(batch, device=device) % classes
            continue
        zero = example_array(key, cfg)
        if BATCH_KEYS[key].pixels or key == "aus":
            value = rng.integers(0, 255 if BATCH_KEYS[key].pixels else 2, (batch, *zero.shape)).astype(zero.dtype)
        elif key in ("points5", "landmarks68"):
            side = BATCH_KEYS[key].frame_of[1]
            value = (0.2 + 0.6 * rng.random((batch, *zero.shape))) * side
        else:
            value = rng.random((batch, *zero.shape))
        out[key] = batch_tensor(key, torch.from_numpy(value.astype(zero.dtype)).to(device))
    return out


def step_time(name: str, config: str, batch: int, mixed: bool, device: Any, steps: int) -> dict[str, Any]:
    """Seconds per training step (forward, loss, backward, Adam) of one model; `mixed` = the training path's bf16 (or
    fp16) autocast + channels-last, else float32 in the default layout."""
    import torch

    from mer.model.models import count_parameters, create_model, prepare_for_device, to_device_batch
    from mer.model.training.trainer import mixed_precision

    torch.manual_seed(0)
    classes = 3 if name in ("htnet", "ststnet") else 5
    model = create_model(name, config, num_classes=classes)
    model = prepare_for_device(model, device) if mixed else model.to(device)
    data = random_batch(tuple(dict.fromkeys(model.inputs + model.targets)), batch, classes, device)
    data = to_device_batch(data, model, device) if mixed else data
    dtype, scaled = mixed_precision(device, mixed)
    scaler = torch.amp.GradScaler("cuda", enabled=scaled)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = model.loss(model(data), data)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):  # warm-up: allocator, kernels, lazy init
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return {"model": name, "config": config, "batch": batch, "params": count_parameters(model),
            "precision": str(dtype).replace("torch.", "") + " + channels-last" if dtype else "float32",
            "s_per_step": seconds}


def write_composite_like(root: Path, subjects: int, seed: int = 0) -> Path:
    """A preprocessed cache shaped like the MEGC2019 composite (flow28 + points5, 3 classes), written through the
    library's cache writer: `subjects` subjects of 3..10 clips, a class-specific block in u so the folds learn."""
    from mer.model.config import PreprocessConfig
    from mer.model.data.schema import make_table
    from mer.model.preprocess.cache import Cache, EntryResult, SampleResult, encode_npz

    rng = np.random.default_rng(seed)
    records, results = [], []
    points = np.array([[9, 10], [19, 10], [14, 15], [10, 20], [18, 20]], dtype=np.float32)
    for s in range(subjects):
        for k in range(3 + s % 8):
            label = int(rng.integers(3))
            flow = (0.5 + 0.05 * rng.standard_normal((3, 28, 28))).astype(np.float32)
            r, c = [(4, 4), (4, 16), (16, 10)][label]
            flow[0, r:r + 8, c:c + 8] = 0.9
            flow = np.clip(flow, 0, 1)
            sid = f"synthetic/s{s:02d}/clip{k}"
            records.append({"dataset": "synthetic", "collection": "synthetic", "subject": f"synthetic/s{s:02d}",
                            "clip": f"clip{k}", "label": label, "emotion": COMPOSITE_CLASSES[label],
                            "source_file": "sheet.csv", "source_row": len(records) + 2})
            results.append(SampleResult(sid, {"flow28": EntryResult("ok", data=encode_npz({"flow28": flow})),
                                              "points5": EntryResult("ok", data=encode_npz({"points5": points}))},
                                        face="composite"))
    table = make_table(records)
    cfg = PreprocessConfig()
    cache = Cache(root)
    cache.plan(table, cfg, ("flow28", "points5"))
    for result in results:
        cache.write(result)
    cache.finish(table, cfg, ("flow28", "points5"), {"class_names": COMPOSITE_CLASSES})
    return root


def loso_time(store: Any, recipe: dict[str, Any], device: Any, per_fold_folds: int, epochs: int | None
              ) -> dict[str, Any]:
    """Seconds of a whole LOSO (every subject one fold) one fold at a time (measured on `per_fold_folds` folds,
    extrapolated) and as one fold-batched group (measured), with the pooled accuracies of what was trained."""
    import pandas as pd

    from mer.model.config import ModelConfig, TrainConfig
    from mer.model.training.folds import loso_folds
    from mer.model.training.metrics import pooled_metrics
    from mer.model.training.trainer import FoldSpec, train_fold, train_fold_group

    train = {**recipe.get("train", {}), "device": device.type, "protocol": "fixed"}
    if epochs is not None:
        train["epochs"] = epochs
    model = ModelConfig(name=recipe["name"], config=recipe.get("config", "small"), kwargs=recipe.get("kwargs", {}))
    cfg = TrainConfig(**train)
    folds = loso_folds(store.index)
    specs = [FoldSpec(model, cfg, fold, store.class_names) for fold in folds]
    measured = specs[:per_fold_folds]
    warm = FoldSpec(model, TrainConfig(**{**train, "epochs": 1}), folds[-1], store.class_names)
    train_fold_group([warm, warm], store)  # untimed: lazy imports, kernels, allocator (both sides benefit)
    _sync(device)
    start = time.perf_counter()
    single = [train_fold(spec, store) for spec in measured]
    _sync(device)
    per_fold = (time.perf_counter() - start) / len(measured)
    start = time.perf_counter()
    group = train_fold_group(specs, store)
    _sync(device)
    batched = time.perf_counter() - start

    def accuracy(results: list[Any]) -> float:
        return float(pooled_metrics(pd.concat([r.predictions for r in results]), store.class_names)
                     ["overall"]["accuracy"])

    return {"model": recipe["name"], "config": model.config, "epochs": cfg.epochs, "batch": cfg.batch_size,
            "folds": len(folds), "per_fold_folds_measured": len(measured),
            "per_fold_total_s": per_fold * len(folds), "per_fold_extrapolated": len(measured) < len(folds),
            "batched_total_s": batched, "speedup": per_fold * len(folds) / batched,
            "accuracy_per_fold_measured": accuracy(single), "accuracy_batched": accuracy(group),
            "accuracy_batched_same_folds": accuracy(group[:len(measured)])}


def htnet_recipe_time(store: Any, recipe: dict[str, Any], device: Any, epochs: int, config: str | None
                      ) -> dict[str, Any]:
    """One fold of HTNet's paper recipe for `epochs` epochs, extrapolated to the recipe's epochs and 68 folds."""
    from mer.model.config import ModelConfig, TrainConfig
    from mer.model.training.folds import loso_folds
    from mer.model.training.trainer import FoldSpec, train_fold

    full_epochs = recipe["train"]["epochs"]
    cfg = TrainConfig(**{**recipe["train"], "epochs": epochs, "device": device.type, "protocol": "fixed"})
    model = ModelConfig(name=recipe["name"], config=config or recipe["config"], kwargs=recipe.get("kwargs", {}))
    folds = loso_folds(store.index)
    _sync(device)
    start = time.perf_counter()
    train_fold(FoldSpec(model, cfg, folds[0], store.class_names), store)
    _sync(device)
    seconds = time.perf_counter() - start
    per_fold = seconds / epochs * full_epochs
    return {"model": recipe["name"], "config": model.config, "batch": cfg.batch_size, "epochs_measured": epochs,
            "measured_s": seconds, "recipe_epochs": full_epochs, "fold_s_extrapolated": per_fold,
            "folds": len(folds), "recipe_s_extrapolated": per_fold * len(folds)}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark ({report['device']})", "",
             f"torch {report['torch']}, {report['when']}, `{report['command']}`"
             + (" (CPU smoke form: tiny sizes, not GPU figures)" if report["cpu_smoke"] else ""), "",
             "## Train step at the paper configuration", "",
             "| model | config | batch | params | precision | s/step | speed-up |", "|---|---|---|---|---|---|---|"]
    fp32 = {(r["model"], r["config"]): r["s_per_step"] for r in report["steps"] if r["precision"] == "float32"}
    for r in report["steps"]:
        up = fp32.get((r["model"], r["config"]), 0) / r["s_per_step"] if r["precision"] != "float32" else 1.0
        lines.append(f"| {r['model']} | {r['config']} | {r['batch']} | {r['params']:,} | {r['precision']} | "
                     f"{r['s_per_step']:.4f} | {up:.2f}x |")
    lines += ["", "## LOSO: one fold at a time vs one fold-batched group", "",
              "| model | folds | epochs | batch | per fold (s, total) | batched (s) | speed-up | acc per-fold / batched |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["loso"]:
        note = (f" (extrapolated from {r['per_fold_folds_measured']} folds)" if r["per_fold_extrapolated"] else "")
        lines.append(f"| {r['model']} ({r['config']}) | {r['folds']} | {r['epochs']} | {r['batch']} | "
                     f"{r['per_fold_total_s']:.1f}{note} | {r['batched_total_s']:.1f} | {r['speedup']:.1f}x | "
                     f"{r['accuracy_per_fold_measured']:.2f} / {r['accuracy_batched_same_folds']:.2f} |")
    h = report["htnet_recipe"]
    lines += ["", "## HTNet paper recipe", "",
              f"{h['model']} ({h['config']}), batch {h['batch']}: {h['epochs_measured']} epochs of one fold in "
              f"{h['measured_s']:.1f} s -> {h['recipe_epochs']} epochs {h['fold_s_extrapolated']:.0f} s per fold "
              f"(extrapolated) -> {h['folds']} folds one after another: {h['recipe_s_extrapolated']:.0f} s "
              f"({h['recipe_s_extrapolated'] / 60:.1f} min).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu", help="folder for gpu.json and gpu.md")
    parser.add_argument("--catalogue", default="benchmarks/catalogue.yaml", help="recipes: its benchmark.models")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU form (seconds): small configs, 4 subjects")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and precision")
    parser.add_argument("--per-fold-folds", type=int, default=8, help="folds trained one at a time (then x68)")
    parser.add_argument("--htnet-epochs", type=int, default=20, help="epochs of HTNet's paper recipe timed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from mer.components.settings import load_catalogue
    from mer.model.io import atomic_write, write_json
    from mer.model.models import list_models
    from mer.model.training.data import SampleStore

    smoke = args.cpu_smoke
    if smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --cpu-smoke for the tiny CPU form")
    else:
        device = torch.device("cuda")
    recipes = {k: v.model_dump() for k, v in load_catalogue(args.catalogue).models.items()}
    report: dict[str, Any] = {"device": device_name(device), "torch": torch.__version__, "cpu_smoke": smoke,
                              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "command": " ".join(["python benchmarks/gpu.py", *(argv or sys.argv[1:])])}

    steps = []
    for name in list_models():
        config, batch = ("small", 2) if smoke else ("paper", PAPER_BATCH.get(name, 32))
        for mixed in ((False,) if device.type != "cuda" else (False, True)):
            row = step_time(name, config, batch, mixed, device, 1 if smoke else args.steps)
            log.info("step %s", row)
            steps.append(row)
    report["steps"] = steps

    with tempfile.TemporaryDirectory() as tmp:
        store = SampleStore.open(write_composite_like(Path(tmp) / "cache", 4 if smoke else 68))
        report["loso"] = []
        for key in ("ststnet", "htnet-small"):
            recipe = dict(recipes[key])
            if smoke:
                recipe["config"] = "small"
            row = loso_time(store, recipe, device, 2 if smoke else args.per_fold_folds, 1 if smoke else None)
            log.info("loso %s", row)
            report["loso"].append(row)
        report["htnet_recipe"] = htnet_recipe_time(store, recipes["htnet-paper"], device,
                                                   1 if smoke else args.htnet_epochs, "small" if smoke else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu.json", report)
    atomic_write(out / "gpu.md", markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
