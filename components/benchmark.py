"""`mer benchmark`: LOSO of several models x protocols on a real collection, through the platform's own stages.

    mer benchmark megc2019 --root PATH [--models KEY ...] [--protocol fixed inner oracle] [--epochs N]
                           [--au-sheets casme2=PATH samm=PATH] [--out DIR]

Why it is built this way: a benchmark number must come from the code users run, so the collection goes through
`ingest` -> `preprocess` -> the Ray Tune LOSO driver (`pipelines.loso.run_experiment`, folds as Ray tasks, MLflow
parent/trial/fold runs) once per (model, protocol); this module only chooses the settings and tabulates the pooled
predictions the driver writes. Models come from `params.benchmark.models` (recipes set a priori, never tuned on a test
fold). What the data cannot feed is switched off and said so: FPF without apex face crops, AUs without a coding sheet.
Rows are flagged `leaky` when the protocol is `oracle` (test-fold epoch selection) or the model reads annotated AUs.

Outputs under `--out` (default `<benchmark.out>/<collection>`): results.csv (one row per model x protocol, merged with
rows of earlier invocations), results.md (honest protocols first, the reproduction check, notes) and results.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common import add_params_arguments, params_from_args
from mer_model.config import BenchmarkModel, Params, parse_params, set_dotted
from mer_model.errors import ConfigError, DataError
from components.ray_session import connect_ray

log = logging.getLogger(__name__)

COLLECTIONS = {"megc2019": "megc2019_3"}  # benchmarkable collections -> their class set
DATASETS = ("casme2", "smic", "samm")
SCORES = ("uf1", "uar", "accuracy")
# HTNet's published LOSO results on the MEGC2019 composite (UF1, UAR), obtained with oracle epoch selection.
PUBLISHED_HTNET = {"overall": (0.8603, 0.8475), "smic": (0.8049, 0.7905), "casme2": (0.9532, 0.9516),
                   "samm": (0.8131, 0.8124)}
# Honest (fixed-epoch) reference UF1 on the composite from the literature (MEB re-evaluation).
FIELD_BASELINES = {"SSSNet": {"overall": 0.739, "casme2": 0.852, "smic": 0.699, "samm": 0.602},
                   "STSTNet": {"overall": 0.713}, "Off-ApexNet": {"overall": 0.703}}
KEY_COLUMNS = ("model", "protocol")


# --------------------------------------------------------------------------------------------------------------------
# Settings


def base_params(params: Params, collection: str, root: Path, au_sheets: Mapping[str, str]) -> Params:
    """params with the data/preprocess/tracking sections pointed at this collection under benchmark.work."""
    if collection not in COLLECTIONS:
        raise ConfigError(f"benchmark: unknown collection {collection!r} (known: {', '.join(COLLECTIONS)})")
    if not root.is_dir():
        raise DataError("--root: directory not found", file=str(root))
    work = Path(params.benchmark.work) / collection
    tree = params.model_dump(mode="json", by_alias=True)
    for key, value in {
        "data.source": collection, "data.root": str(root.resolve()), "data.class_set": COLLECTIONS[collection],
        "data.annotation": None, "data.au_sheets": {k: str(Path(v).expanduser().resolve()) for k, v in au_sheets.items()},
        "data.ingested": str(work / "ingested" / "annotations.csv"), "preprocess.out": str(work / "preprocessed"),
        "tune.storage_path": str(work / "tune"), "tune.num_samples": 0, "tune.final_model": False,
        "tracking.experiment": f"benchmark-{collection}",
    }.items():
        set_dotted(tree, key, value)
    return parse_params(tree, "benchmark settings")


def run_params(base: Params, key: str, entry: BenchmarkModel, kwargs: Mapping[str, Any], protocol: str,
               epochs: int | None, collection: str) -> Params:
    """Params of one LOSO run: the entry's model and recipe, the protocol, its own experiment and results dir."""
    tree = base.model_dump(mode="json", by_alias=True)
    tree["model"] = {"name": entry.name, "config": entry.config, "kwargs": dict(kwargs)}
    for name, value in entry.train.items():
        set_dotted(tree, f"train.{name}", value)
    if epochs is not None:
        set_dotted(tree, "train.epochs", epochs)
    work = Path(base.benchmark.work) / collection
    set_dotted(tree, "train.protocol", protocol)
    set_dotted(tree, "tune.experiment", f"benchmark-{collection}-{key}-{protocol}")
    set_dotted(tree, "tune.results", str(work / "results" / f"{key}-{protocol}"))
    return parse_params(tree, f"benchmark.models.{key}")


def parse_au_sheets(items: Sequence[str]) -> dict[str, str]:
    """["casme2=PATH", ...] -> {"casme2": PATH}; a file that does not exist is an error naming it."""
    sheets: dict[str, str] = {}
    for item in items:
        dataset, sep, path = item.partition("=")
        if not sep or not dataset or not path:
            raise ConfigError(f"--au-sheets {item!r}: expected DATASET=PATH")
        if not Path(path).expanduser().is_file():
            raise DataError("AU coding sheet not found", file=path)
        sheets[dataset.strip()] = path
    return sheets


# --------------------------------------------------------------------------------------------------------------------
# What the preprocessed data can feed


def data_capabilities(store: Any) -> dict[str, Any]:
    """Which optional inputs the cache holds: apex face crops for every sample, AU coding per source dataset."""
    ids = store.index["sample_id"].tolist()
    has_faces = all("apex224" in store.keys(sid) for sid in ids)
    coded: dict[str, int] = {}
    for sid, dataset in zip(ids, store.index["dataset"], strict=True):
        if "aus" in store.keys(sid) and store.arrays(sid, ["aus"])["aus"].any():
            coded[dataset] = coded.get(dataset, 0) + 1
    counts = store.index["dataset"].value_counts().to_dict()
    return {"faces": has_faces, "au_coded": coded, "per_dataset": {str(k): int(v) for k, v in counts.items()}}


def adapt_entry(key: str, entry: BenchmarkModel, caps: Mapping[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """(model kwargs for this data, AU mode actually used, notes): FPF and AUs switched off where the data lacks them."""
    from mer_model.models import resolve_kwargs

    kwargs = dict(entry.kwargs)
    notes: list[str] = []
    if entry.faces:
        if caps["faces"]:
            kwargs.update(entry.faces)
        else:
            notes.append("FPF disabled: no apex face crops in this data (position branch off)")
            log.warning("%s: the data has no apex face crops; running with FPF disabled", key)
    au_mode = str(resolve_kwargs(entry.name, entry.config, **kwargs).get("au_mode", "none"))
    coded = caps["au_coded"]
    if au_mode != "none" and not coded:
        notes.append(f"AUs disabled ({au_mode} requested): no AU coding joined (pass --au-sheets)")
        log.warning("%s: no AU coding in the data; running with AUs disabled", key)
        kwargs["au_mode"] = au_mode = "none"
    elif au_mode != "none":
        uncoded = sorted(set(caps["per_dataset"]) - set(coded))
        what = "input (leaks labels)" if au_mode == "annotated" else "targets of a jointly trained AU head"
        notes.append(f"AUs {au_mode}: coding of {', '.join(sorted(coded))} as {what}"
                     + (f"; {', '.join(uncoded)} uncoded (zero vector)" if uncoded else ""))
    return kwargs, au_mode, notes


# --------------------------------------------------------------------------------------------------------------------
# One LOSO run through the driver


def fold_summaries(params: Params) -> list[dict[str, Any]]:
    """The stored per-fold results (device, selected epoch, validation score) of a finished LOSO run."""
    from components import tracking
    from components.tune import FoldStorage, fold_key
    from mer_model.training.data import SampleStore
    from mer_model.training.folds import loso_folds
    from pipelines.loso import storage_root

    cache_dir = str(Path(params.preprocess.out).resolve())
    version = tracking.data_version(cache_dir)
    storage = FoldStorage(f"{storage_root(params)}/folds")
    out = []
    for fold in loso_folds(SampleStore.open(cache_dir).index):
        stored = storage.load(fold_key(params.model, params.train, fold, version))
        if stored is not None:
            stored.pop("predictions")
            out.append(stored)
    return out


def run_one(params: Params) -> tuple[dict[str, Any], pd.DataFrame, list[dict[str, Any]], float]:
    """(driver summary, pooled predictions, fold summaries, wall seconds) of one LOSO run."""
    # The driver is orchestration (pipelines/); like `mer tune`, this CLI is one of its entry points.
    from pipelines.loso import run_experiment

    start = time.perf_counter()
    summary = run_experiment(params)
    wall = time.perf_counter() - start
    predictions = pd.read_csv(Path(params.tune.results) / "predictions.csv", keep_default_na=False)
    return summary, predictions, fold_summaries(params), wall


def result_row(key: str, entry: BenchmarkModel, params: Params, model_info: Mapping[str, Any], au_mode: str,
               notes: Sequence[str], predictions: pd.DataFrame, class_names: Sequence[str],
               folds: Sequence[Mapping[str, Any]], wall: float, summary: Mapping[str, Any],
               command: str = "") -> dict[str, Any]:
    from mer_model.training.metrics import pooled_metrics

    pooled = pooled_metrics(predictions, class_names)
    protocol = params.train.protocol
    leaks = bool(model_info["leaks_labels"])
    row: dict[str, Any] = {
        "model": key, "label": entry.label or key, "network": f"{entry.name}/{entry.config}",
        "parameters": int(model_info["parameters"]), "protocol": protocol,
        "leaky": protocol == "oracle" or leaks,
        "leak": "; ".join(x for x in ("oracle epoch selection" if protocol == "oracle" else "",
                                      "annotated AUs as input" if leaks else "") if x),
        "au": au_mode, "epochs": params.train.epochs,
        "selected_epoch_median": statistics.median(f["selected_epoch"] for f in folds) if folds else None,
        "inner_val_uf1": (float(np.mean([f["val_score"] for f in folds if f["val_score"] is not None]))
                          if protocol == "inner" and folds else None),
        "n_samples": int(len(predictions)), "n_subjects": int(predictions["subject"].nunique()),
        "datasets": "+".join(sorted(predictions["dataset"].unique())),
    }
    row.update({k: pooled["overall"][k] for k in SCORES})
    for dataset in DATASETS:
        values = pooled["per_dataset"].get(dataset)
        row.update({f"{dataset}_{k}": (values[k] if values else None) for k in SCORES})
        row[f"{dataset}_n"] = values["n"] if values else 0
    devices = sorted({str(f["device"]) for f in folds})
    row.update({
        "wall_s": round(wall, 1), "device": ",".join(devices) or "?",
        "lr": params.train.lr, "batch_size": params.train.batch_size, "optimizer": params.train.optimizer,
        "class_weights": params.train.class_weights, "model_kwargs": json.dumps(params.model.kwargs, sort_keys=True),
        "mlflow_run": summary.get("parent_run_id", ""), "notes": "; ".join(notes), "command": command,
    })
    return row


def model_info(name: str, config: str, kwargs: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """Parameter count and label-leak flag of the network as configured (built once, then dropped)."""
    from mer_model.models import count_parameters, create_model

    model = create_model(name, config, num_classes=num_classes, **kwargs)
    return {"parameters": count_parameters(model), "leaks_labels": bool(model.leaks_labels)}


# --------------------------------------------------------------------------------------------------------------------
# The whole benchmark


def select_models(params: Params, requested: Sequence[str] | None) -> list[str]:
    cfg = params.benchmark
    keys = list(requested or cfg.default_models or cfg.models)
    unknown = [k for k in keys if k not in cfg.models]
    if unknown:
        raise ConfigError(f"benchmark.models: no entry {unknown[0]!r} (known: {', '.join(cfg.models)})")
    return keys


def order_protocols(protocols: Sequence[str], fixed_from_inner: bool) -> list[str]:
    """`inner` before `fixed` when fixed takes its epoch count from inner; otherwise as given (duplicates dropped)."""
    ordered = list(dict.fromkeys(protocols))
    if fixed_from_inner and "inner" in ordered and "fixed" in ordered:
        ordered.remove("inner")
        ordered.insert(ordered.index("fixed"), "inner")
    return ordered


def benchmark(params: Params, collection: str, root: Path, models: Sequence[str] | None = None,
              protocols: Sequence[str] | None = None, epochs: int | None = None,
              au_sheets: Mapping[str, str] | None = None, out: Path | None = None,
              command: str = "") -> pd.DataFrame:
    """Ingest + preprocess `root`, run LOSO for every model x protocol, write the tables; returns all rows."""
    from components.ingest import ingest
    from components.preprocess import preprocess
    from mer_model.training.data import SampleStore

    base = base_params(params, collection, root, au_sheets or {})
    keys = select_models(base, models)
    chosen = order_protocols(protocols or base.benchmark.protocols, base.benchmark.fixed_epochs_from_inner)
    out = out or Path(base.benchmark.out) / collection
    connect_ray(base.tune.ray_address, base.benchmark.cpus)
    ingest(base)
    preprocess(base)
    store = SampleStore.open(base.preprocess.out)
    caps = data_capabilities(store)
    log.info("benchmark %s: %d samples, %d subjects %s; apex crops: %s; AU coding: %s", collection, len(store.index),
             len(store.subjects()), caps["per_dataset"], caps["faces"], caps["au_coded"] or "none")
    rows: list[dict[str, Any]] = []
    for key in keys:
        entry = base.benchmark.models[key]
        kwargs, au_mode, notes = adapt_entry(key, entry, caps)
        info = model_info(entry.name, entry.config, kwargs, store.num_classes)
        inner_epoch: int | None = None
        for protocol in chosen:
            run_epochs = epochs
            run_notes = list(notes)
            if protocol == "fixed" and inner_epoch is not None:
                run_epochs = inner_epoch
                run_notes.append(f"fixed epochs = median epoch selected by inner validation ({inner_epoch})")
            run = run_params(base, key, entry, kwargs, protocol, run_epochs, collection)
            log.info("benchmark: %s under %s (%d epochs)", key, protocol, run.train.epochs)
            summary, predictions, folds, wall = run_one(run)
            row = result_row(key, entry, run, info, au_mode, run_notes, predictions, summary["class_names"], folds,
                             wall, summary, command)
            rows.append(row)
            if protocol == "inner" and base.benchmark.fixed_epochs_from_inner and row["selected_epoch_median"]:
                inner_epoch = max(1, int(round(row["selected_epoch_median"])))
            log.info("benchmark: %s %s: UF1 %.4f UAR %.4f acc %.4f (%.0f s)", key, protocol, row["uf1"], row["uar"],
                     row["accuracy"], wall)
    table = merge_rows(out / "results.csv", pd.DataFrame(rows), list(base.benchmark.models))
    settings = {
        "collection": collection, "root": str(root), "samples": len(store.index),
        "subjects": len(store.subjects()), "per_dataset": caps["per_dataset"], "apex_crops": caps["faces"],
        "au_coded": caps["au_coded"], "au_sheets": dict(base.data.au_sheets), **environment(),
    }
    write_outputs(table, out, settings)
    return table


def environment() -> dict[str, Any]:
    import torch

    from components import tracking

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "git_commit": tracking.git_commit(Path(__file__).resolve().parents[1])}


def merge_rows(path: Path, rows: pd.DataFrame, model_order: Sequence[str] = ()) -> pd.DataFrame:
    """Rows of earlier invocations (other models or protocols) kept; the same model x protocol replaced. Sorted by
    `model_order` (params order), then protocol fixed, inner, oracle."""
    if path.is_file():
        old = pd.read_csv(path, keep_default_na=False, na_values=[""])
        keep = ~old.set_index(list(KEY_COLUMNS)).index.isin(rows.set_index(list(KEY_COLUMNS)).index)
        rows = pd.concat([old[keep], rows], ignore_index=True)
    rank = {"fixed": 0, "inner": 1, "oracle": 2} | {m: i for i, m in enumerate(model_order)}
    return rows.sort_values(["model", "protocol"], key=lambda col: col.map(lambda v: (rank.get(v, len(rank)), v)),
                            kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# Tables and chart


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(value, spec) if isinstance(value, (float, np.floating)) else str(value)


def markdown_table(table: pd.DataFrame) -> str:
    datasets = [d for d in DATASETS if f"{d}_uf1" in table and table[f"{d}_uf1"].notna().any()]
    head = ["model", "protocol", "UF1", "UAR", "acc"] + [f"{d} UF1 / UAR / acc" for d in datasets]
    head += ["n / subj.", "epochs", "AUs", "wall s", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        protocol = r["protocol"] + (" ⚠ leaky" if r["leaky"] else "")
        epochs = str(r["epochs"]) + (f" (sel. {_fmt(r['selected_epoch_median'], 'g')})" if r["protocol"] != "fixed" else "")
        cells = [r["label"], protocol] + [_fmt(r[k]) for k in SCORES]
        cells += [" / ".join(_fmt(r[f"{d}_{k}"]) for k in SCORES) for d in datasets]
        cells += [f"{r['n_samples']} / {r['n_subjects']}", epochs, r["au"], _fmt(r["wall_s"], ".0f"), r["device"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def reproduction_table(table: pd.DataFrame) -> str:
    """HTNet under oracle beside its published numbers (composite and per dataset, UF1 / UAR)."""
    rows = table[(table["network"].str.startswith("htnet/")) & (table["protocol"] == "oracle")]
    scopes = ["overall", *[d for d in ("smic", "casme2", "samm") if f"{d}_uf1" in table]]
    lines = ["| | " + " | ".join(f"{s} UF1 / UAR" for s in scopes) + " |", "|---|" + "---|" * len(scopes)]
    lines.append("| HTNet, published (paper config, 800 epochs, oracle) | "
                 + " | ".join(f"{PUBLISHED_HTNET[s][0]:.4f} / {PUBLISHED_HTNET[s][1]:.4f}" for s in scopes) + " |")
    for r in rows.to_dict("records"):
        cells = []
        for s in scopes:
            uf1, uar = (r["uf1"], r["uar"]) if s == "overall" else (r[f"{s}_uf1"], r[f"{s}_uar"])
            cells.append(f"{_fmt(uf1)} / {_fmt(uar)}")
        lines.append(f"| {r['label']}, ours ({r['epochs']} epochs, oracle) | " + " | ".join(cells) + " |")
    if rows.empty:
        lines.append("\n_No HTNet run under `oracle` in this table._")
    return "\n".join(lines)


def write_outputs(table: pd.DataFrame, out: Path, settings: Mapping[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png",
             "settings": out / "settings.json"}
    table.to_csv(paths["csv"], index=False)
    paths["settings"].write_text(json.dumps(settings, indent=2, default=str) + "\n")
    honest = table[~table["leaky"].astype(bool)]
    leaky = table[table["leaky"].astype(bool)]
    notes = sorted({n for cell in table["notes"] for n in str(cell).split("; ") if n})
    baselines = "; ".join(f"{name} UF1 " + ", ".join(f"{k} {v:.3f}" for k, v in vals.items())
                          for name, vals in FIELD_BASELINES.items())
    text = [
        f"# LOSO benchmark: {settings['collection']} ({settings['samples']} samples, {settings['subjects']} subjects: "
        + ", ".join(f"{k} {v}" for k, v in sorted(settings["per_dataset"].items())) + ")",
        "",
        "Pooled LOSO predictions (one fold per subject); UF1 = macro F1, UAR = mean per-class recall. "
        f"Last run: git {settings['git_commit']}, torch {settings['torch']}, "
        f"CUDA {'available' if settings['cuda'] else 'not available: CPU only'}. Every row's settings (epochs, lr, "
        "batch, model kwargs, MLflow run, command) are in results.csv. Produced by:",
        "",
        *[f"    {c}" for c in dict.fromkeys(table["command"]) if c],
        "",
        "## Honest protocols (fixed, inner)",
        "",
        markdown_table(honest) if not honest.empty else "_none run_",
        "",
        f"Honest reference numbers from the literature (fixed epochs): {baselines}.",
        "",
        "## Leaky rows (oracle epoch selection or annotated AUs as input)",
        "",
        "`oracle` keeps, per test subject, the epoch with the best accuracy ON THAT TEST SUBJECT (as the published "
        "HTNet/CVA+FPF scripts do); annotated AUs feed the FACS coding the emotion labels were partly derived from. "
        "Neither is a valid estimate of accuracy on unseen subjects.",
        "",
        markdown_table(leaky) if not leaky.empty else "_none run_",
        "",
        "## Reproduction check: HTNet under oracle vs. published",
        "",
        reproduction_table(table),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
        f"- Apex face crops in the data: {'yes' if settings['apex_crops'] else 'no'}; AU coding joined for: "
        f"{', '.join(f'{k} ({v} samples)' for k, v in settings['au_coded'].items()) or 'none'}.",
        "",
    ]
    paths["md"].write_text("\n".join(text))
    plot_results(table, paths["png"], settings)
    log.info("benchmark tables -> %s", out)
    return paths


def plot_results(table: pd.DataFrame, path: Path, settings: Mapping[str, Any]) -> None:
    """Grouped UF1 bars per model (one panel per scope: composite and each source dataset); leaky bars hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    scopes = [("overall", "composite")] + [(d, d.upper() if d != "casme2" else "CASME II") for d in DATASETS
                                           if f"{d}_uf1" in table and table[f"{d}_uf1"].notna().any()]
    labels = list(dict.fromkeys(table["label"]))
    protocols = [p for p in ("fixed", "inner", "oracle") if p in set(table["protocol"])]
    colours = {"fixed": "#1f77b4", "inner": "#2ca02c", "oracle": "#d62728"}
    width = 0.8 / max(1, len(protocols))
    fig, axes = plt.subplots(1, len(scopes), figsize=(1.0 + 0.9 * len(labels) * len(scopes) + 2, 5.2), sharey=True,
                             squeeze=False)
    for ax, (scope, title) in zip(axes[0], scopes, strict=True):
        column = "uf1" if scope == "overall" else f"{scope}_uf1"
        for j, protocol in enumerate(protocols):
            for i, label in enumerate(labels):
                hit = table[(table["label"] == label) & (table["protocol"] == protocol)]
                if hit.empty or pd.isna(hit.iloc[0][column]):
                    continue
                value = float(hit.iloc[0][column])
                leaky = bool(hit.iloc[0]["leaky"])
                x = i + (j - (len(protocols) - 1) / 2) * width
                ax.bar(x, value, width * 0.95, color=colours[protocol], alpha=0.45 if leaky else 0.95,
                       hatch="//" if leaky else None, edgecolor="black", linewidth=0.5)
                ax.text(x, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
        reference = FIELD_BASELINES["SSSNet"].get(scope)
        if reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"{title} (SSSNet honest: {reference:.3f})")
        else:
            ax.set_title(title)
        ax.set_xticks(range(len(labels)), [lab.replace(" (", "\n(") for lab in labels], rotation=45, ha="right",
                      fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("UF1 (pooled LOSO)")
    handles = [Patch(facecolor=colours[p], edgecolor="black", label=p) for p in protocols]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="leaky (oracle / annotated AUs)"))
    handles.append(Line2D([], [], color="black", linestyle="--", label="SSSNet, honest field baseline"))
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    fig.suptitle(f"{settings['collection']}: {settings['samples']} samples, {settings['subjects']} subjects "
                 f"({'GPU' if settings['cuda'] else 'CPU, reduced settings'})", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    table = benchmark(params, args.collection, Path(args.root).expanduser(), args.models, args.protocol, args.epochs,
                      parse_au_sheets(args.au_sheets), Path(args.out) if args.out else None, command_line(args))
    log.info("benchmark results:\n%s", table[["label", "protocol", "leaky", *SCORES, "n_samples", "n_subjects",
                                                "wall_s", "device"]].to_string(index=False))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The invocation as a `mer benchmark` command line (recorded with each result row)."""
    import shlex

    parts = ["mer", "benchmark", args.collection, "--root", args.root]
    for flag, value in (("--models", args.models), ("--protocol", args.protocol), ("--au-sheets", args.au_sheets)):
        if value:
            parts += [flag, *value]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    if args.out:
        parts += ["--out", args.out]
    parts += [x for o in args.overrides for x in ("-S", o)]
    return " ".join(shlex.quote(p) for p in parts)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="LOSO of several models x protocols on a real collection -> results table + chart")
    parser.add_argument("collection", choices=sorted(COLLECTIONS), help="the collection to benchmark")
    parser.add_argument("--root", required=True, help="directory holding the collection (any part of it)")
    parser.add_argument("--models", nargs="+", metavar="KEY", help="entries of benchmark.models (default: all)")
    parser.add_argument("--protocol", nargs="+", choices=["fixed", "inner", "oracle"],
                        help="protocols to run (default: benchmark.protocols)")
    parser.add_argument("--epochs", type=int, help="epochs of every model (default: each model's recipe)")
    parser.add_argument("--au-sheets", nargs="+", default=[], metavar="DATASET=PATH",
                        help="AU coding sheets to join, e.g. casme2=CASME2-coding.xlsx samm=SAMM.xlsx")
    parser.add_argument("--out", help="directory of the tables (default: <benchmark.out>/<collection>)")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
