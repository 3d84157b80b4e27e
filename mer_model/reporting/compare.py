"""The comparison across experiments: the table one puts in a paper, models x protocols, UF1 / UAR per dataset.

Input is one row per finished experiment (the caller reads them from MLflow): `model`, `dataset` (what was loaded,
e.g. `megc2019`), `protocol`, `leaky`, `start_time`, and metrics `uf1`, `uar`, ... plus `<part>/uf1` ... for the
datasets inside a composite. The latest run per (model, protocol, dataset) wins. Leaky rows (oracle protocol or
annotated-AU input) are marked with a dagger and tinted: they are upper bounds, not comparable to honest rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mer_model.reporting import html

METRICS = ("uf1", "uar")
DAGGER = "†"
PROTOCOL_ORDER = {"fixed": 0, "inner": 1, "oracle": 2}


def comparison_table(runs: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Rows = (model, protocol), columns = `<dataset> <METRIC>` (composites also `<dataset>:<part> <METRIC>`), plus a
    boolean `leaky` column and `runs` (how many experiments were merged into the row)."""
    if runs.empty:
        return pd.DataFrame(columns=["model", "protocol", "leaky", "runs"])
    latest = runs.sort_values("start_time").groupby(["model", "protocol", "dataset"], as_index=False).last()
    rows: dict[tuple[str, str], dict[str, object]] = {}
    columns: list[str] = []
    for record in latest.to_dict("records"):
        key = (str(record["model"]), str(record["protocol"]))
        row = rows.setdefault(key, {"model": key[0], "protocol": key[1], "leaky": False, "runs": 0})
        row["leaky"] = bool(row["leaky"]) or bool(record["leaky"])
        row["runs"] = int(row["runs"]) + 1  # type: ignore[call-overload]
        parts = sorted({c.split("/", 1)[0] for c in record if "/" in str(c) and pd.notna(record[c])})
        for part in [None, *parts]:
            for metric in metrics:
                source = metric if part is None else f"{part}/{metric}"
                if source not in record or pd.isna(record[source]):
                    continue
                name = f"{record['dataset']}{'' if part is None else ':' + part} {metric.upper()}"
                row[name] = float(record[source])
                if name not in columns:
                    columns.append(name)
    table = pd.DataFrame(list(rows.values()))
    table["_order"] = table["protocol"].map(PROTOCOL_ORDER).fillna(9)
    table = table.sort_values(["leaky", "_order", "model"]).drop(columns="_order").reset_index(drop=True)
    ordered = sorted(columns, key=lambda c: (c.split(" ")[0].split(":")[0], ":" in c.split(" ")[0], c))
    return table[["model", "protocol", "leaky", "runs", *ordered]]


def write_comparison_report(table: pd.DataFrame, out_dir: str | Path, title: str) -> Path:
    """`compare.html` (leaky rows marked) and `compare.csv` under `out_dir`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    shown = table.drop(columns=["leaky", "runs"]).copy()
    shown["model"] = [f"{m}{DAGGER if leaky else ''}" for m, leaky in zip(table["model"], table["leaky"])]
    sections = [
        html.table(shown, leaky_rows=list(table["leaky"])),
        f'<p class="note">{DAGGER} leaky: the oracle protocol picks each fold\'s epoch by its TEST accuracy, and '
        "annotated-AU models read the human coding the labels derive from; such rows are upper bounds and must not "
        "be ranked against the others. UF1 = macro F1, UAR = mean per-class recall, on predictions pooled over all "
        "leave-one-subject-out folds; `dataset:part` columns are the parts of a composite.</p>",
    ]
    if table.empty:
        sections = ['<p class="note">No finished experiment found.</p>']
    path = out / "compare.html"
    path.write_text(html.page(title, sections))
    return path
