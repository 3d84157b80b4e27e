"""The benchmark's tables and chart: results.md (honest protocols first, the leaky rows, the reproduction check
against published HTNet numbers, notes), results.csv, settings.json and results.png, from the rows `mer benchmark`
collects (one per model x protocol; columns documented in pipelines/benchmark.py)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.model.io import atomic_write, write_csv, write_json, write_with
from mer.model.reporting import plots
from mer.model.training.metrics import METRICS
from mer.model.training.protocols import PROTOCOLS, get_protocol
from mer.model.training.stats import format_difference, format_interval
from mer.model.training.repeats import SPREAD_METRICS

log = logging.getLogger(__name__)

DATASETS = ("casme2", "smic", "samm")  # the parts of the MEGC2019 composite, in the order tables show them
SCORES = tuple(m for m in METRICS if m != "weighted_f1")  # the columns of the tables
# HTNet's published LOSO results on the MEGC2019 composite (UF1, UAR), obtained with oracle epoch selection.
PUBLISHED_HTNET = {"overall": (0.8603, 0.8475), "smic": (0.8049, 0.7905), "casme2": (0.9532, 0.9516),
                   "samm": (0.8131, 0.8124)}
# Honest (fixed-epoch) reference UF1 on the composite from the literature (MEB re-evaluation).
FIELD_BASELINES = {"SSSNet": {"overall": 0.739, "casme2": 0.852, "smic": 0.699, "samm": 0.602},
                   "STSTNet": {"overall": 0.713}, "Off-ApexNet": {"overall": 0.703}}


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(value, spec) if isinstance(value, (float, np.floating)) else str(value)


def _value(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _scored(row: Mapping[str, Any], key: str) -> str:
    """A score with its 95% interval where the row has one (rows of tables that predate intervals: the score)."""
    value = _value(row, key)
    if value is None:
        return "–"
    if _value(row, f"{key}_ci_low") is None:
        return _fmt(value)
    return format_interval(float(value), float(row[f"{key}_ci_low"]), float(row[f"{key}_ci_high"]))


def _difference(row: Mapping[str, Any], metric: str) -> str:
    if _value(row, f"diff_{metric}") is None:
        return "–"
    return format_difference(*(_value(row, f"diff_{metric}{s}") for s in ("", "_ci_low", "_ci_high", "_p")))


def _spread(row: Mapping[str, Any]) -> str:
    """`mean ± sd` of UF1 / UAR / acc over a row's seed repeats, and their count; "–" for a single run."""
    repeats = row.get("repeats")
    if not isinstance(repeats, (int, float)) or pd.isna(repeats) or repeats < 2:
        return "–"
    cells = [f"{_fmt(row.get(f'{k}_repeat_mean'), '.3f')} ± {_fmt(row.get(f'{k}_repeat_sd'), '.3f')}"
             for k in SPREAD_METRICS]
    return " / ".join(cells) + f" ({int(repeats)})"


def markdown_table(table: pd.DataFrame) -> str:
    datasets = [d for d in DATASETS if f"{d}_uf1" in table and table[f"{d}_uf1"].notna().any()]
    differences = "diff_uf1" in table and table["diff_uf1"].notna().any()
    spread = "repeats" in table and bool((pd.to_numeric(table["repeats"], errors="coerce") > 1).any())
    head = ["model", "protocol", "UF1 [95% CI]", "UAR [95% CI]", "acc [95% CI]"]
    head += ["seeds: UF1 / UAR / acc mean ± sd (n)"] if spread else []
    head += [f"{d} UF1 [95% CI] / UAR / acc" for d in datasets]
    if differences:
        base = next(b for b in table["baseline"] if isinstance(b, str) and b)
        label = table.loc[table["model"] == base, "label"]
        head += [f"Δ UF1 vs {label.iloc[0] if len(label) else base} [95% CI], p", "Δ UAR [95% CI], p"]
    head += ["n / subj.", "coverage", "epochs", "AUs", "wall s", "fold s", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        protocol = r["protocol"] + (" ⚠ leaky" if r["leaky"] else "")
        selects = r["protocol"] in PROTOCOLS and get_protocol(r["protocol"]).watch != "none"
        epochs = str(r["epochs"]) + (f" (sel. {_fmt(r['selected_epoch_median'], 'g')})" if selects else "")
        members = r.get("ensemble")
        if isinstance(members, (int, float)) and members > 1:  # NaN for rows of tables that predate the column
            epochs += f", {int(members)}-seed ensemble"
        cells = [r["label"], protocol] + [_scored(r, k) for k in SCORES] + ([_spread(r)] if spread else [])
        cells += [" / ".join([_scored(r, f"{d}_uf1"), *(_fmt(r[f"{d}_{k}"]) for k in SCORES[1:])]) for d in datasets]
        if differences:
            cells += [_difference(r, "uf1"), _difference(r, "uar")]
        folds = str(r.get("folds") or "")  # "pooled/run"; absent in tables that predate the column
        partial = f" ({folds} folds)" if "/" in folds and len(set(folds.split("/"))) > 1 else ""
        cells += [f"{r['n_samples']} / {r['n_subjects']}{partial}", _fmt(r.get("coverage")), epochs, r["au"],
                  _fmt(r["wall_s"], ".0f"), _fmt(r.get("fold_s"), ".0f"), r["device"]]
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


def _splits(table: pd.DataFrame) -> list[str]:
    """The split schemes of the rows (rows written before the column existed were LOSO)."""
    column = table["split"] if "split" in table else pd.Series(["loso"] * len(table))
    return sorted({str(s) if isinstance(s, str) and s else "loso" for s in column})


def table_notes(table: pd.DataFrame) -> list[str]:
    """Each row's notes once, followed by the rows they concern unless they concern every row (a note such as the
    `fixed` epoch count differs per model and would otherwise lose its model)."""
    rows: dict[str, list[str]] = {}
    for _, r in table.iterrows():
        for note in str(r["notes"] if pd.notna(r["notes"]) else "").split("; "):
            if note:
                rows.setdefault(note, []).append(f"{r['label']} {r['protocol']}")
    return [note if len(where) == len(table) else f"{note} — {', '.join(where)}"
            for note, where in sorted(rows.items())]


def write_outputs(table: pd.DataFrame, out: Path, settings: Mapping[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png",
             "settings": out / "settings.json"}
    write_csv(paths["csv"], table)
    write_json(paths["settings"], settings, default=str)
    honest = table[~table["leaky"].astype(bool)]
    leaky = table[table["leaky"].astype(bool)]
    notes = table_notes(table)
    baselines = "; ".join(f"{name} UF1 " + ", ".join(f"{k} {v:.3f}" for k, v in vals.items())
                          for name, vals in FIELD_BASELINES.items())
    text = [
        f"# Benchmark: {settings['collection']} ({settings['samples']} samples, {settings['subjects']} subjects: "
        + ", ".join(f"{k} {v}" for k, v in sorted(settings["per_dataset"].items())) + ")",
        "",
        f"Pooled predictions of every fold of the split ({', '.join(_splits(table))}; loso = one fold per subject); "
        "UF1 = macro F1, UAR = mean per-class recall. "
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
        "Scores with a 95% interval from a bootstrap over subjects (subjects resampled with replacement, the pooled "
        "metric recomputed). Δ: each honest row minus the baseline row of its protocol over the same samples, with a "
        "paired subject-bootstrap interval and the p-value of a permutation test swapping the two runs' predictions "
        "within subjects; \"not distinguishable\" where the interval includes zero.",
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
        *(["- Seed repeats (`tune.repeats`): a row's UF1 / UAR / acc are one run (its `train.seed`); the `seeds` column "
           "gives the mean ± sd (sample sd) over that many independent runs of the row, seeds derived from "
           "`train.seed`, repeat 0 being the run shown."]
          if "repeats" in table and (pd.to_numeric(table["repeats"], errors="coerce") > 1).any() else []),
        f"- Apex face crops in the data: {'yes' if settings['apex_crops'] else 'no'}"
        + (f" ({settings['apex_crop_samples']} of {settings['samples']} samples)"
           if settings.get("apex_crop_samples") else "") + "; AU coding joined for: "
        + f"{', '.join(f'{k} ({v} samples)' for k, v in settings['au_coded'].items()) or 'none'}.",
        "",
    ]
    atomic_write(paths["md"], "\n".join(text))
    plot_results(table, paths["png"], settings)
    log.info("benchmark tables -> %s", out)
    return paths


def plot_results(table: pd.DataFrame, path: Path, settings: Mapping[str, Any]) -> list[str]:
    """Grouped UF1 bars per model (one panel per scope: composite and each source dataset); leaky bars hatched.
    Returns the protocols drawn, in their display order (`PROTOCOLS.rank`)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = plots.pyplot()
    scopes = [("overall", "composite")] + [(d, d.upper() if d != "casme2" else "CASME II") for d in DATASETS
                                           if f"{d}_uf1" in table and table[f"{d}_uf1"].notna().any()]
    labels = list(dict.fromkeys(table["label"]))
    protocols = sorted(set(table["protocol"]), key=lambda p: (PROTOCOLS.rank(p), p))  # every protocol, in order
    palette = plt.get_cmap("tab10")
    colours = {p: palette(i % 10) for i, p in enumerate(protocols)}
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
    axes[0][0].set_ylabel("UF1 (pooled over folds)")
    handles = [Patch(facecolor=colours[p], edgecolor="black", label=p) for p in protocols]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="leaky (oracle / annotated AUs)"))
    handles.append(Line2D([], [], color="black", linestyle="--", label="SSSNet, honest field baseline"))
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    fig.suptitle(f"{settings['collection']}: {settings['samples']} samples, {settings['subjects']} subjects "
                 f"({'GPU' if settings['cuda'] else 'CPU, reduced settings'})", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    write_with(path, lambda out: fig.savefig(out, format="png", dpi=110))
    plt.close(fig)
    return protocols
