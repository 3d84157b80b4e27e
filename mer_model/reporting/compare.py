"""The comparison across experiments: one row per set of comparable runs, their intervals, what differs between
rows, and paired differences of chosen runs over the same samples.

Input is one row per finished experiment (the caller reads them from the tracker): `run_id`, `model`, `dataset`
(what was loaded, e.g. `megc2019`), `protocol`, `split`, `data_version`, `settings` (the model.* and train.* settings
that trained it, as text), the stored `leaky` verdict, `start_time`, and metrics `uf1`, `uar`, ... with their interval
bounds `uf1_ci_low` ... plus `<part>/uf1` ... for the datasets inside a composite.

Runs are merged into one row only when EVERYTHING that makes them comparable is equal (model, a digest of its
settings, split, protocol, dataset, data version; `COMPARABLE`): then they are repeats of one experiment and the latest
wins (`runs` counts them). A LOSO and a subject_5fold run of one model, or two configurations of it, are separate rows,
and the `differs` column names the settings in which a row differs from the other rows of its model. Leaky rows
(stored verdict: oracle protocol or annotated-AU input) are marked with a dagger and tinted: they are upper bounds,
not comparable to honest rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.config import IntervalConfig
from mer.model.errors import ConfigError
from mer.model.io import atomic_write, write_csv
from mer.model.reporting import html
from mer.model.training.protocols import PROTOCOLS
from mer.model.training.stats import PAIRED_METRICS, format_difference, paired_difference, verdict

DAGGER = "†"
# What makes two runs comparable; runs equal in all of these are repeats of one experiment.
COMPARABLE = ("model", "settings_digest", "split", "protocol", "dataset", "data_version")
DESCRIBED = ("model", "protocol", "split", "dataset", "data", "settings", "differs")


def _settings(record: Mapping[str, Any]) -> dict[str, str]:
    value = record.get("settings")
    return dict(value) if isinstance(value, Mapping) else {}


def settings_digest(settings: Mapping[str, str]) -> str:
    """Short digest of a run's settings (8 hex digits); "" for a run that recorded none."""
    if not settings:
        return ""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:8]


def _normalised(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    for column, default in (("split", "loso"), ("data_version", ""), ("run_id", "")):
        if column not in runs:
            runs[column] = default
        runs[column] = runs[column].fillna(default).astype(str)
    runs["settings"] = [_settings(r) for r in runs.to_dict("records")] if "settings" in runs else [{}] * len(runs)
    runs["settings_digest"] = [settings_digest(s) for s in runs["settings"]]
    return runs


def _differs(latest: list[dict[str, Any]]) -> list[str]:
    """Per row: `key=value` for each setting whose value differs among the rows of the same model (and the split,
    protocol or data version where those differ), so unlike rows say why they are apart."""
    out = []
    for record in latest:
        same_model = [r for r in latest if r["model"] == record["model"]]
        keys = sorted({k for r in same_model for k in r["settings"]})
        parts = [f"{k}={record['settings'].get(k, '–')}" for k in keys
                 if len({r["settings"].get(k) for r in same_model}) > 1]
        for column in ("split", "data_version"):
            if len({r[column] for r in same_model}) > 1:
                parts.insert(0, f"{column}={record[column]}")
        out.append("; ".join(parts))
    return out


def comparison_table(runs: pd.DataFrame, metrics: Sequence[str] = PAIRED_METRICS) -> pd.DataFrame:
    """One row per comparable set of runs (`COMPARABLE`; latest wins, `runs` = how many): model, protocol, split,
    dataset, data (version, shortened), settings (digest), differs, leaky, runs, run_id, then `<METRIC>` and
    `<METRIC> 95% CI` (composites also `<part> <METRIC>` ...)."""
    if runs.empty:
        return pd.DataFrame(columns=[*DESCRIBED, "leaky", "runs", "run_id"])
    runs = _normalised(runs)
    grouped = runs.sort_values("start_time").groupby(list(COMPARABLE), sort=False, dropna=False)
    latest = [dict(group.iloc[-1]) | {"runs": len(group)} for _, group in grouped]
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    for record, differs in zip(latest, _differs(latest), strict=True):
        row: dict[str, Any] = {"model": record["model"], "protocol": record["protocol"], "split": record["split"],
                               "dataset": record["dataset"], "data": str(record["data_version"]).split(":")[-1][:8],
                               "settings": record["settings_digest"], "differs": differs,
                               "leaky": bool(record["leaky"]), "runs": int(record["runs"]), "run_id": record["run_id"]}
        parts = sorted({str(c).split("/", 1)[0] for c in record if "/" in str(c) and pd.notna(record[c])
                        and str(c).split("/", 1)[1] in metrics})
        for part in [None, *parts]:
            prefix = "" if part is None else f"{part}/"
            for metric in metrics:
                value = record.get(f"{prefix}{metric}")
                if value is None or pd.isna(value):
                    continue
                name = f"{'' if part is None else part + ' '}{metric.upper()}"
                low, high = record.get(f"{prefix}{metric}_ci_low"), record.get(f"{prefix}{metric}_ci_high")
                row[name] = float(value)
                row[f"{name} 95% CI"] = (f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None
                                         and pd.notna(low) and pd.notna(high) else "")
                columns += [c for c in (name, f"{name} 95% CI") if c not in columns]
        rows.append(row)
    table = pd.DataFrame(rows)
    table["_order"] = table["protocol"].map(PROTOCOLS.rank)
    table = table.sort_values(["leaky", "dataset", "_order", "model", "split"]).drop(columns="_order")
    return table.reset_index(drop=True)[[*DESCRIBED, "leaky", "runs", "run_id", *columns]]


def num_classes(predictions: pd.DataFrame) -> int:
    """Classes of a run's pooled predictions: its `prob_<c>` columns (every class), else the largest index seen."""
    probs = [c for c in predictions.columns if str(c).startswith("prob_")]
    return len(probs) or int(max(predictions["label"].max(), predictions["pred"].max())) + 1


def paired_table(runs: pd.DataFrame, predictions: Mapping[str, pd.DataFrame], cfg: IntervalConfig) -> pd.DataFrame:
    """Paired differences of every run in `runs` (rows as `comparison_table` takes them) to the FIRST: per other run,
    `Δ UF1` / `Δ UAR` (difference, paired subject-bootstrap interval, permutation p-value, "not distinguishable"
    where the interval crosses zero) and what differs from the reference. `predictions`: each run's pooled
    predictions by run_id. DataError naming the runs and what differs when two runs are not over the same samples;
    ConfigError with fewer than two runs."""
    if len(runs) < 2:
        raise ConfigError("--runs: a paired comparison needs at least two runs")
    records = _normalised(runs).to_dict("records")
    reference = records[0]
    rows = []
    for record in records[1:]:
        a, b = predictions[record["run_id"]], predictions[reference["run_id"]]
        classes = max(num_classes(a), num_classes(b))
        result = paired_difference(a, b, [str(c) for c in range(classes)], cfg,
                                   names=(f"run {record['run_id']}", f"run {reference['run_id']}"))
        differs = [f"{c}: {reference[c]} -> {record[c]}" for c in ("model", "protocol", "split", "data_version")
                   if reference[c] != record[c]]
        keys = sorted(set(record["settings"]) | set(reference["settings"]))
        differs += [f"{k}: {reference['settings'].get(k, '–')} -> {record['settings'].get(k, '–')}" for k in keys
                    if reference["settings"].get(k) != record["settings"].get(k)]
        row: dict[str, Any] = {"run": record["run_id"], "model": record["model"], "protocol": record["protocol"],
                               "split": record["split"], "leaky": bool(record["leaky"]),
                               "reference": reference["run_id"]}
        for metric, values in result.items():
            row[f"Δ {metric.upper()}"] = format_difference(values["diff"], values["ci_low"], values["ci_high"],
                                                           values["p"])
            row[f"{metric}_diff"], row[f"{metric}_ci_low"] = values["diff"], values["ci_low"]
            row[f"{metric}_ci_high"], row[f"{metric}_p"] = values["ci_high"], values["p"]
            row[f"{metric}_verdict"] = verdict(values["ci_low"], values["ci_high"])
        row["differs"] = "; ".join(differs) or "nothing recorded (a repeat)"
        rows.append(row)
    return pd.DataFrame(rows)


def write_comparison_report(table: pd.DataFrame, out_dir: str | Path, title: str,
                            paired: pd.DataFrame | None = None) -> Path:
    """`compare.html` (leaky rows marked) and `compare.csv` under `out_dir`, and with `paired` its section and
    `compare_paired.csv`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", table)
    shown = table.drop(columns=["leaky", "runs"]).copy()
    shown["model"] = [f"{m}{DAGGER if leaky else ''}" for m, leaky in zip(table["model"], table["leaky"])]
    sections = [
        html.table(shown, leaky_rows=list(table["leaky"])),
        f'<p class="note">{DAGGER} leaky: the oracle protocol picks each fold\'s epoch by its TEST accuracy, and '
        "annotated-AU models read the human coding the labels derive from; such rows are upper bounds and must not "
        "be ranked against the others. UF1 = macro F1, UAR = mean per-class recall, on predictions pooled over all "
        "evaluation folds, with 95% intervals from a bootstrap over subjects; `part` columns are the parts of a "
        "composite. One row per set of comparable runs (model, settings digest, split, protocol, dataset, data "
        "version): `differs` names the settings a row does not share with the other rows of its model.</p>",
    ]
    if table.empty:
        sections = ['<p class="note">No finished experiment found.</p>']
    if paired is not None and not paired.empty:
        write_csv(out / "compare_paired.csv", paired)
        reference = paired["reference"].iloc[0]
        sections += [f"<h2>Paired differences to run {html.escape(reference)}</h2>",
                     html.table(paired[["run", "model", "protocol", "split", "Δ UF1", "Δ UAR", "differs"]],
                                leaky_rows=list(paired["leaky"])),
                     '<p class="note">Difference of each run minus the reference over the same samples, with a 95% '
                     "interval from a paired bootstrap over subjects and the p-value of a permutation test that "
                     "swaps the two runs' predictions within subjects; \"not distinguishable\" where the interval "
                     "includes zero.</p>"]
    return atomic_write(out / "compare.html", html.page(title, sections))

