"""`mer benchmark`: LOSO of several models x protocols on a real collection, through the platform's own stages.

    mer benchmark megc2019 --root PATH [--models KEY ...] [--protocol fixed inner oracle] [--epochs N]
                           [--au-sheets casme2=PATH samm=PATH] [--out DIR] [--catalogue FILE] [-S KEY=VALUE ...]

Why it is built this way: a benchmark number must come from the code users run, so the collection goes through
`ingest` -> `preprocess` -> the experiment driver (`mer.pipelines.engine.driver.run_tune`, folds as Ray tasks,
tracked parent/trial/fold runs) once per (model, protocol): this module is a loop over models x protocols that chooses
the settings and collects one row per run from the driver's typed results; the tables and the chart are rendered by
`mer.model.reporting.benchmark`. Models come from the benchmark's own catalogue, benchmarks/catalogue.yaml
(`benchmark.models`: recipes set a priori or chosen by `mer tune` on inner validation subjects, never tuned on a test
fold; not run-time parameters, so not in params.yaml: each run's params are params.yaml with its entry's recipe).
What the data cannot feed is switched off and said so: FPF without apex face crops, AUs without a coding sheet; what
the collection has is read from its ingested annotation table (`data_capabilities`), so the crops of an entry's
`faces` variant are preprocessed on the first run.
Rows are flagged `leaky` when the protocol is `oracle` (test-fold epoch selection) or the model reads annotated AUs
(the verdict stored with each run's result). Every row carries subject-bootstrap intervals, and every honest row its
paired difference to the baseline row of its protocol (`benchmark.baseline`; interval + permutation p-value,
"not distinguishable" where the interval crosses zero).

Outputs under `--out` (default `<benchmark.out>/<collection>`): results.csv (one row per model x protocol, merged with
rows of earlier invocations), results.md (honest protocols first, the reproduction check, notes) and results.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.components.ingest import ingest
from mer.components.preprocess import preprocess
from mer.components.ray_session import connect_ray
from mer.components.settings import (
    CATALOGUE,
    BenchmarkConfig,
    BenchmarkModel,
    Params,
    load_catalogue,
    load_params,
    with_overrides,
)
from mer.components.tracking import git_commit
from mer.model.batch_keys import BATCH_KEYS, Geometry
from mer.model.config import IntervalConfig, parse_override
from mer.model.errors import ConfigError, DataError
from mer.model.reporting.benchmark import DATASETS, SCORES, write_outputs
from mer.model.data import read_table
from mer.model.training.metrics import OPTIONAL_METRICS, defined, mean_defined, pooled_metrics
from mer.model.training.protocols import PROTOCOLS, get_protocol, retrain_epochs
from mer.model.training.repeats import SPREAD_METRICS, spread_columns
from mer.model.training.results import ExperimentSummary, FoldSummary, Results, read_results
from mer.model.training.stats import PAIRED_METRICS, metric_intervals, paired_columns, paired_difference
from mer.model.preprocess.modalities import MODALITIES, model_modalities

log = logging.getLogger(__name__)

COLLECTIONS = {"megc2019": "megc2019_3"}  # benchmarkable collections -> their class set
KEY_COLUMNS = ("model", "protocol")
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# Settings


def base_params(params: Params, cfg: BenchmarkConfig, collection: str, root: Path,
                au_sheets: Mapping[str, str]) -> Params:
    """params with the data/preprocess/tracking sections pointed at this collection under `cfg.work`."""
    if collection not in COLLECTIONS:
        raise ConfigError(f"benchmark: unknown collection {collection!r} (known: {', '.join(COLLECTIONS)})")
    if not root.is_dir():
        raise DataError("--root: directory not found", file=str(root))
    work = Path(cfg.work) / collection
    return with_overrides(params, {
        "data.source": collection, "data.root": str(root.resolve()), "data.class_set": COLLECTIONS[collection],
        "data.annotation": None, "data.au_sheets": {k: str(Path(v).expanduser().resolve()) for k, v in au_sheets.items()},
        "data.ingested": str(work / "ingested" / "annotations.csv"), "preprocess.out": str(work / "preprocessed"),
        "tune.storage_path": str(work / "tune"), "tune.num_samples": 0, "tune.final_model": False,
        "tracking.experiment": f"benchmark-{collection}",
    }, "benchmark settings")


def with_models_inputs(base: Params, models: Mapping[str, BenchmarkModel], keys: Sequence[str],
                       kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> Params:
    """`base` with `preprocess.modalities` = what the benchmarked models (`keys` of `models`) read together (plus any
    set explicitly) and `preprocess.face_size` = the largest `face_size` of the entries that read face crops (where
    any sets one): the collection is preprocessed once for all of them, so a model reading more than the default
    model (HTNet's `points5`, MOL's 128 px sequences) finds its inputs. `kwargs`: each entry's model kwargs as
    adapted to the data (`adapt_entry`: with its `faces` variant where the collection has apex crops), default the
    entry's own."""
    needed = set(base.preprocess.modalities)
    face_sizes: list[int] = []
    for key in keys:
        entry = models[key]
        reads = model_modalities(entry.name, entry.config, **(kwargs or {}).get(key, entry.kwargs))
        needed.update(reads)
        if entry.face_size and any(BATCH_KEYS[m].geometry is Geometry.IMAGE for m in reads):
            face_sizes.append(entry.face_size)
    sizes = {"preprocess.face_size": max(face_sizes)} if face_sizes else {}
    return with_overrides(base, {"preprocess.modalities": [m for m in MODALITIES if m in needed], **sizes},
                          "benchmark models' inputs")


def results_dir(cfg: BenchmarkConfig, key: str, protocol: str, collection: str) -> Path:
    """Where the run of entry `key` under `protocol` leaves its results (tune.results)."""
    return Path(cfg.work) / collection / "results" / f"{key}-{protocol}"


def run_params(base: Params, cfg: BenchmarkConfig, key: str, entry: BenchmarkModel, kwargs: Mapping[str, Any],
               protocol: str, epochs: int | None, collection: str) -> Params:
    """Params of one run: the entry's model and recipe, the protocol, its own experiment and results dir."""
    return with_overrides(base, {
        "model": {"name": entry.name, "config": entry.config, "kwargs": dict(kwargs)},
        **{f"train.{name}": value for name, value in entry.train.items()},
        **({"train.epochs": epochs} if epochs is not None else {}),
        "train.protocol": protocol,
        "tune.experiment": f"benchmark-{collection}-{key}-{protocol}",
        "tune.results": str(results_dir(cfg, key, protocol, collection)),
    }, f"benchmark.models.{key}")


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


def data_capabilities(table: pd.DataFrame) -> dict[str, Any]:
    """Which optional inputs the COLLECTION has, from its ingested annotation table (what the loader found on disk,
    known before anything is preprocessed, so an entry's `faces` variant is chosen, and its crops preprocessed, on
    the first run): `faces` = every sample has an apex face crop (`apex_path`, e.g. the composite's
    datasets/combined_datasets_whole), `apex_crops` = how many do; `au_coded` = samples with an AU coding per
    source dataset (`au_coded`: a joined coding sheet); `per_dataset` = samples per source dataset."""
    crops = table["apex_path"].astype(str).str.len() > 0
    coded = table.loc[table["au_coded"].astype(bool), "dataset"].value_counts()
    counts = table["dataset"].value_counts()
    return {"faces": bool(len(table)) and bool(crops.all()), "apex_crops": int(crops.sum()),
            "au_coded": {str(k): int(v) for k, v in sorted(coded.items())},
            "per_dataset": {str(k): int(v) for k, v in counts.items()}}


@dataclass(frozen=True)
class Capability:
    """What a key of `data_capabilities` means in an entry's notes: whether the data has it, what of it a model uses
    (with a detail, e.g. the datasets left uncoded) and why it is missing."""

    present: Callable[[Mapping[str, Any]], bool]
    used: Callable[[Mapping[str, Any]], str]
    missing: Callable[[Mapping[str, Any]], str]
    detail: Callable[[Mapping[str, Any]], str] = lambda caps: ""


def _missing_crops(caps: Mapping[str, Any]) -> str:
    partly = caps.get("apex_crops", 0)
    return (f"apex face crops for only {partly} of {sum(caps['per_dataset'].values())} samples" if partly
            else "no apex face crops in this data")


def _uncoded(caps: Mapping[str, Any]) -> str:
    uncoded = sorted(set(caps["per_dataset"]) - set(caps["au_coded"]))
    return f"; {', '.join(uncoded)} uncoded (zero vector)" if uncoded else ""


# The data capabilities a model's optional input may need (`OptionalInput.needs` of its registry entry).
CAPABILITIES: dict[str, Capability] = {
    "faces": Capability(lambda caps: bool(caps["faces"]), lambda caps: "the apex face crops", _missing_crops),
    "au_coded": Capability(lambda caps: bool(caps["au_coded"]),
                           lambda caps: f"coding of {', '.join(sorted(caps['au_coded']))}",
                           lambda caps: "no AU coding joined (pass --au-sheets)", _uncoded),
}


def adapt_entry(key: str, entry: BenchmarkModel, caps: Mapping[str, Any]
                ) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(model kwargs for this data, the values of the results columns the model's options fill (`au`), notes).

    Driven by the model's registry entry (`options`: which argument switches which optional input, and the data
    capability it needs), never by its name: the entry's `faces` variant is used where the data has what the
    inputs it switches on need, and every optional input still on whose capability the data lacks is switched
    off, each with a note."""
    from mer.model.models import resolve_kwargs
    from mer.model.models.registry import get_entry

    options = get_entry(entry.name).options

    def switched_on(kwargs: Mapping[str, Any]) -> dict[str, Any]:
        resolved = resolve_kwargs(entry.name, entry.config, **kwargs)
        return {o.kwarg: resolved[o.kwarg] for o in options if resolved.get(o.kwarg, o.off) != o.off}

    kwargs = dict(entry.kwargs)
    notes: list[str] = []
    noted: set[str] = set()
    if entry.faces:
        variant = {**kwargs, **entry.faces}
        added = [o for o in options if o.kwarg in set(switched_on(variant)) - set(switched_on(kwargs))]
        lacking = [o for o in added if not CAPABILITIES[o.needs].present(caps)]
        for o in lacking:
            notes.append(f"{o.label} disabled: {CAPABILITIES[o.needs].missing(caps)} ({o.kwarg}={o.off})")
            log.warning("%s: the data lacks %s; running with %s disabled", key, o.needs, o.label)
        if not lacking:
            kwargs = variant
            settings = ", ".join(f"{k}={v}" for k, v in entry.faces.items())
            notes += [f"{o.label} on {CAPABILITIES[o.needs].used(caps)} ({settings})" for o in added]
            noted.update(o.kwarg for o in added)
    for o in options:
        value = switched_on(kwargs).get(o.kwarg)
        if value is None or o.kwarg in noted:
            continue
        capability = CAPABILITIES[o.needs]
        if not capability.present(caps):
            notes.append(f"{o.label} disabled ({value} requested): {capability.missing(caps)}")
            log.warning("%s: the data lacks %s; running with %s disabled", key, o.needs, o.label)
            kwargs[o.kwarg] = o.off
        else:
            notes.append(f"{o.label} {value}: {capability.used(caps)} as {o.uses.get(str(value), 'input')}"
                         + capability.detail(caps))
    resolved = resolve_kwargs(entry.name, entry.config, **kwargs)
    return kwargs, {o.column: str(resolved.get(o.kwarg, o.off)) for o in options if o.column}, notes


# --------------------------------------------------------------------------------------------------------------------
# One LOSO run through the driver


def run_one(params: Params) -> tuple[ExperimentSummary, pd.DataFrame, list[FoldSummary], float]:
    """(summary, pooled predictions, fold summaries, wall seconds) of one run of the driver, read back from its
    typed results in `tune.results`."""
    from mer.pipelines.engine.driver import run_tune  # Ray Tune: imported when a benchmark runs, not for --help

    start = time.perf_counter()
    run_tune(params, source="mer benchmark")
    wall = time.perf_counter() - start
    results = read_results(params.tune.results)
    return results.summary, results.predictions, results.folds, wall


def result_row(key: str, entry: BenchmarkModel, params: Params, parameters: int, shown: Mapping[str, str],
               notes: Sequence[str], predictions: pd.DataFrame, folds: Sequence[FoldSummary], wall: float,
               summary: ExperimentSummary, command: str = "") -> dict[str, Any]:
    """One row of results.csv: the run's settings, pooled scores overall and per dataset with their subject-bootstrap
    intervals (`uf1_ci_low`, `casme2_uf1_ci_high`, ...), and where it came from. The leak verdict is the one stored
    with the run's result."""
    pooled = pooled_metrics(predictions, summary.class_names)
    bounds = metric_intervals(predictions, summary.class_names, params.evaluate.intervals)
    protocol = params.train.protocol
    row: dict[str, Any] = {
        "model": key, "label": entry.label or key, "network": f"{entry.name}/{entry.config}",
        "parameters": parameters, "protocol": protocol, "split": params.train.split, "leaky": summary.leaky,
        "leak": "; ".join(summary.leak_reasons),
        "au": "none", **shown, "epochs": params.train.epochs,
        "selected_epoch_median": statistics.median(f.selected_epoch for f in folds) if folds else None,
        "inner_val_uf1": (float(np.mean([f.val_score for f in folds if f.val_score is not None]))
                          if get_protocol(protocol).needs_validation and folds else None),
        "n_samples": int(len(predictions)), "n_subjects": int(predictions["subject"].nunique()),
        "datasets": "+".join(sorted(predictions["dataset"].unique())),
        # folds the row covers of those it ran: a failed fold is named in the notes, the others are kept
        "folds": f"{len(folds)}/{len(folds) + len(summary.failed_folds)}",
        # optional per-fold figures, mean over the folds that define them (absent where none does, never 0)
        **{k: mean_defined([f.test_metrics.get(k) for f in folds]) for k in OPTIONAL_METRICS},
        "au_f1_folds": sum(defined(f.test_metrics.get("au_f1")) for f in folds),
    }
    notes = [*notes, *(f"failed, not pooled: {f['error']}" for f in summary.failed_folds)]
    row.update({k: pooled["overall"][k] for k in SCORES})
    # tune.repeats: the spread over independent runs of other seeds (the scores above are repeat 0's, the single run).
    row.update({"repeats": 1, **{f"{k}_repeat_{stat}": None for k in SPREAD_METRICS for stat in ("mean", "sd")},
                **spread_columns(summary.repeats)})
    row.update({f"{k}_ci_{end}": bounds.get(f"{k}_ci_{end}") for k in SCORES for end in ("low", "high")})
    single = predictions["dataset"].nunique() == 1  # then the dataset's interval is the overall one
    for dataset in DATASETS:
        values = pooled["per_dataset"].get(dataset)
        row.update({f"{dataset}_{k}": (values[k] if values else None) for k in SCORES})
        row.update({f"{dataset}_{k}_ci_{end}": bounds.get(f"{k}_ci_{end}" if single else f"{dataset}/{k}_ci_{end}")
                    if values else None for k in SCORES for end in ("low", "high")})
        row[f"{dataset}_n"] = values["n"] if values else 0
    devices = sorted({f.device for f in folds})
    row.update({
        # wall_s: this invocation; fold_s: the folds' own training time (summed over parallel workers), which a
        # resumed invocation that found its folds stored does not shorten.
        "wall_s": round(wall, 1), "fold_s": round(sum(f.wall_time for f in folds), 1),
        "device": ",".join(devices) or "?",
        "lr": params.train.lr, "batch_size": params.train.batch_size, "optimizer": params.train.optimizer,
        "weight_decay": params.train.weight_decay, "schedule": params.train.schedule, "tta": params.train.tta,
        "ema_decay": params.train.ema_decay, "ensemble": params.train.ensemble,
        "class_weights": params.train.class_weights, "model_kwargs": json.dumps(params.model.kwargs, sort_keys=True),
        "mlflow_run": summary.parent_run_id or "", "notes": "; ".join(notes), "command": command,
    })
    return row


def preprocessing_notes(manifest: Mapping[str, Any], reads: Sequence[str]) -> list[str]:
    """What preprocessing estimated for the modalities a model reads, counted (the composite's five points: dlib on
    the apex crop, or the template points where it finds no face, or the landmarks file's own fallback rows), for the
    row's notes."""
    if "points5" not in reads:
        return []
    sources = {k.split("=", 1)[1]: v for k, v in manifest["counts"].get("estimated", {}).items()
               if k.startswith("points5=")}
    if not sources:
        return []
    said = {"dlib": "dlib on the apex crop", "template": "template points (no face found; aligned crop)",
            "whole_image_box": "landmarks5_28px.csv's whole-image fallback (no face found)"}
    return ["points5: " + ", ".join(f"{said.get(k, k)} {v}" for k, v in sorted(sources.items()))]


def parameter_count(name: str, config: str, kwargs: Mapping[str, Any], num_classes: int) -> int:
    """Parameters of the network as configured (built once, then dropped)."""
    from mer.model.models import count_parameters, create_model  # torch + timm

    return count_parameters(create_model(name, config, num_classes=num_classes, **kwargs))


# --------------------------------------------------------------------------------------------------------------------
# The whole benchmark


def select_models(cfg: BenchmarkConfig, requested: Sequence[str] | None) -> list[str]:
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


def benchmark(params: Params, cfg: BenchmarkConfig, collection: str, root: Path, models: Sequence[str] | None = None,
              protocols: Sequence[str] | None = None, epochs: int | None = None,
              au_sheets: Mapping[str, str] | None = None, out: Path | None = None,
              command: str = "") -> pd.DataFrame:
    """Ingest + preprocess `root`, run the driver for every model x protocol of the catalogue `cfg` (run-time
    settings from `params`), write the tables; returns all rows."""
    from mer.model.training.data import SampleStore  # torch

    base = base_params(params, cfg, collection, root, au_sheets or {})
    keys = select_models(cfg, models)
    chosen = order_protocols(protocols or cfg.protocols, cfg.fixed_epochs_from_inner)
    out = out or Path(cfg.out) / collection
    connect_ray(base.tune.ray_address, cfg.cpus)
    ingest(base)
    caps = data_capabilities(read_table(base.data.ingested))  # what the collection has, before preprocessing
    adapted = {key: adapt_entry(key, cfg.models[key], caps) for key in keys}
    base = with_models_inputs(base, cfg.models, keys, {key: a[0] for key, a in adapted.items()})
    manifest = preprocess(base)
    store = SampleStore.open(base.preprocess.out)
    coverage = store.coverage()  # samples of the collection the models train and are scored on (the engine's store)
    log.info("benchmark %s: %d samples, %d subjects %s; apex crops: %s (%d samples); AU coding: %s", collection,
             len(store.index), len(store.subjects()), caps["per_dataset"], caps["faces"], caps["apex_crops"],
             caps["au_coded"] or "none")
    rows: list[dict[str, Any]] = []
    for key in keys:
        entry = cfg.models[key]
        kwargs, shown, notes = adapted[key]
        notes = notes + preprocessing_notes(manifest, model_modalities(entry.name, entry.config, **kwargs))
        parameters = parameter_count(entry.name, entry.config, kwargs, store.num_classes)
        inner_epoch: int | None = None
        for protocol in chosen:
            run_epochs = epochs
            run_notes = list(notes)
            if protocol == "fixed" and inner_epoch is not None:
                run_epochs = inner_epoch
                run_notes.append(f"fixed epochs = best epoch of the fold-averaged inner validation UF1 ({inner_epoch})")
            run = run_params(base, cfg, key, entry, kwargs, protocol, run_epochs, collection)
            log.info("benchmark: %s under %s (%d epochs)", key, protocol, run.train.epochs)
            summary, predictions, folds, wall = run_one(run)
            row = result_row(key, entry, run, parameters, shown, run_notes, predictions, folds, wall, summary,
                             command)
            row["coverage"] = f"{coverage['usable']}/{coverage['total']}"
            rows.append(row)
            if protocol == "inner" and cfg.fixed_epochs_from_inner and folds:
                inner_epoch = retrain_epochs(folds)
            log.info("benchmark: %s %s: UF1 %.4f UAR %.4f acc %.4f (%.0f s)", key, protocol, row["uf1"], row["uar"],
                     row["accuracy"], wall)
    table = merge_rows(out / "results.csv", pd.DataFrame(rows), list(cfg.models))
    table = baseline_differences(table, lambda key, protocol: results_dir(cfg, key, protocol, collection),
                                 cfg.baseline, base.evaluate.intervals)
    settings = {
        "collection": collection, "root": portable_path(str(root), f"<{collection} root>"), "samples": len(store.index),
        "subjects": len(store.subjects()), "per_dataset": caps["per_dataset"], "apex_crops": caps["faces"],
        "apex_crop_samples": caps["apex_crops"],
        "au_coded": caps["au_coded"], **environment(),
        "au_sheets": {k: portable_path(v, f"<{k} sheet>") for k, v in base.data.au_sheets.items()},
    }
    write_outputs(table, out, settings)
    return table


def environment() -> dict[str, Any]:
    import torch

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "git_commit": git_commit(REPO)}


def baseline_differences(table: pd.DataFrame, where: Callable[[str, str], Path], baseline: Sequence[str],
                         intervals: IntervalConfig) -> pd.DataFrame:
    """`table` with each honest row's paired difference to the baseline row of its protocol (the first entry of
    `baseline` the table has under that protocol): `baseline` and `diff_uf1`, `diff_uf1_ci_low|high`, `diff_uf1_p`,
    `diff_uf1_verdict` (and UAR), from the two runs' pooled predictions (`where(model, protocol)` = their results
    directory). Rows whose results are not on this machine keep the values of the invocation that ran them; a row
    over other samples than its baseline gets no difference and a note saying what differs."""
    table = table.copy()
    columns = list(paired_columns({m: dict.fromkeys(("diff", "ci_low", "ci_high", "p")) for m in PAIRED_METRICS}))
    for column in ["baseline", *columns]:
        if column not in table:
            table[column] = None
        table[column] = table[column].astype(object)
    keys = list(table["model"])

    def load(model: str, protocol: str) -> Results | None:
        directory = where(model, protocol)
        return read_results(directory) if (directory / "summary.json").is_file() else None

    for protocol in dict.fromkeys(table["protocol"]):
        reference = next((b for b in baseline if b in keys and ((table["model"] == b) & (table["protocol"] == protocol)
                                                                 & ~table["leaky"].astype(bool)).any()), None)
        ref = load(reference, protocol) if reference else None
        for i in table.index[(table["protocol"] == protocol) & ~table["leaky"].astype(bool)]:
            model = table.at[i, "model"]
            run = load(model, protocol) if ref is not None and model != reference else None
            if run is None:
                continue
            try:
                result = paired_difference(run.predictions, ref.predictions, run.summary.class_names, intervals,
                                           names=(f"{model} {protocol}", f"{reference} {protocol}"))
            except DataError as err:
                log.warning("benchmark: no difference to the baseline: %s", err)
                table.at[i, "notes"] = "; ".join(n for n in (str(table.at[i, "notes"] or ""), f"no difference to "
                                                             f"the baseline: {err}") if n and n != "nan")
                continue
            table.at[i, "baseline"] = reference
            for column, value in paired_columns(result).items():
                table.at[i, column] = value
    return table


def merge_rows(path: Path, rows: pd.DataFrame, model_order: Sequence[str] = ()) -> pd.DataFrame:
    """Rows of earlier invocations (other models or protocols) kept; the same model x protocol replaced. Sorted by
    `model_order` (params order), then protocol in the registry's display order (`PROTOCOLS.rank`)."""
    if path.is_file():
        old = pd.read_csv(path, keep_default_na=False, na_values=[""])
        keep = ~old.set_index(list(KEY_COLUMNS)).index.isin(rows.set_index(list(KEY_COLUMNS)).index)
        rows = pd.concat([old[keep], rows], ignore_index=True)
    models = {m: i for i, m in enumerate(model_order)}

    def order(column: pd.Series) -> pd.Series:
        rank = PROTOCOLS.rank if column.name == "protocol" else (lambda v: models.get(v, len(models)))
        return column.map(lambda v: (rank(v), v))

    return rows.sort_values(["model", "protocol"], key=order, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def catalogue_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The catalogue (`--catalogue`) with the `-S benchmark.*` overrides applied; every other key went to the
    run-time params (`settings_elsewhere` below keeps them apart)."""
    overrides = dict(parse_override(text) for text in args.overrides)
    return load_catalogue(args.catalogue, {k: v for k, v in overrides.items() if k.split(".", 1)[0] == "benchmark"})


def benchmark_command(params: Params, args: argparse.Namespace) -> int:
    """`mer benchmark COLLECTION --root PATH ...` (add_arguments)."""
    table = benchmark(params, catalogue_from_args(args), args.collection, Path(args.root).expanduser(), args.models,
                      args.protocol, args.epochs, parse_au_sheets(args.au_sheets), Path(args.out) if args.out else None,
                      command_line(args))
    log.info("benchmark results:\n%s", table[["label", "protocol", "leaky", *SCORES, "n_samples", "n_subjects",
                                                "wall_s", "fold_s", "device"]].to_string(index=False))
    return 0


def portable_path(value: str, placeholder: str) -> str:
    """`value` as committed results may name it: relative to the repository when it lies beside it (e.g.
    `../shared/data/megc2019-composite`), else `placeholder` -- never an absolute path of the machine that ran it."""
    scheme, sep, rest = value.rpartition(":///") if ":///" in value else ("", "", value)
    if not Path(rest).is_absolute():
        return value
    relative = Path(os.path.relpath(Path(rest).resolve(), REPO))
    if relative.parts[:2] == ("..", "..") or not relative.parts:
        return f"{scheme}{sep}{placeholder}" if sep else placeholder
    return f"{scheme}{sep}{relative}" if sep else str(relative)


def command_line(args: argparse.Namespace) -> str:
    """The invocation as a `mer benchmark` command line (recorded with each result row; paths made portable). The
    path arguments are read from the working directory first, so that all of them end up relative to the repository
    (a `-S` value is left as typed: it is not known to be a path)."""
    def path(value: str, placeholder: str) -> str:
        return portable_path(os.path.abspath(value), placeholder)

    parts = ["mer", "benchmark", args.collection, "--root", path(args.root, f"<{args.collection} root>")]
    for flag, value in (("--models", args.models), ("--protocol", args.protocol)):
        if value:
            parts += [flag, *value]
    if args.au_sheets:
        parts += ["--au-sheets", *(f"{k}={path(v, f'<{k} sheet>')}"
                                   for k, v in parse_au_sheets(args.au_sheets).items())]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    if args.out:
        parts += ["--out", path(args.out, "<out>")]
    if Path(os.path.abspath(args.catalogue)) != REPO / CATALOGUE:  # another catalogue than the repository's
        parts += ["--catalogue", path(args.catalogue, "<catalogue>")]
    for override in args.overrides:
        key, _, value = override.partition("=")
        parts += ["-S", f"{key}={portable_path(value, '<local path>')}"]
    return " ".join(shlex.quote(p) for p in parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`mer benchmark`'s own options."""
    parser.add_argument("collection", choices=sorted(COLLECTIONS), help="the collection to benchmark")
    parser.add_argument("--root", required=True, help="directory holding the collection (any part of it)")
    parser.add_argument("--models", nargs="+", metavar="KEY", help="entries of benchmark.models (default: all)")
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS.names(),
                        help="protocols to run (default: benchmark.protocols)")
    parser.add_argument("--epochs", type=int, help="epochs of every model (default: each model's recipe)")
    parser.add_argument("--au-sheets", nargs="+", default=[], metavar="DATASET=PATH",
                        help="AU coding sheets to join, e.g. casme2=CASME2-coding.xlsx samm=SAMM.xlsx")
    parser.add_argument("--out", help="directory of the tables (default: <benchmark.out>/<collection>)")
    parser.add_argument("--catalogue", default=CATALOGUE,
                        help=f"the benchmark's model catalogue (default: {CATALOGUE}; -S benchmark.KEY=VALUE "
                        "overrides its keys)")
    parser.set_defaults(settings_elsewhere=("benchmark",))  # -S benchmark.* is the catalogue's, not params.yaml's
