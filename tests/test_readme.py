"""The README states only figures that the committed results or the demo produce: its demo line is the demo's
metrics.json (`results/demo/metrics.json`, a fresh clone's `make demo`), and every number of its results table is the
committed `results/megc2019/results.csv` at the precision shown. No run: these read files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DEMO_LINE = re.compile(r"^Demo result \([^)]*\): UF1 ([0-9.]+), UAR ([0-9.]+), accuracy ([0-9.]+)$", re.M)
# README column -> the results.csv columns of the numbers it shows, in order (a score, its interval, a paired difference
# to the baseline with its interval and p-value)
TABLE_COLUMNS = {
    "UF1 [95% CI]": ("uf1", "uf1_ci_low", "uf1_ci_high"), "UAR [95% CI]": ("uar", "uar_ci_low", "uar_ci_high"),
    "acc": ("accuracy",), "CASME II UF1": ("casme2_uf1",), "SMIC UF1": ("smic_uf1",),
    "Δ UF1 vs STSTNet [95% CI], p": ("diff_uf1", "diff_uf1_ci_low", "diff_uf1_ci_high", "diff_uf1_p"),
}
NUMBER = re.compile(r"[-+]?\d+\.\d+")


def _same(shown: str, value: float) -> bool:
    """`shown` is `value` rounded to the decimals shown."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}" == shown


def test_readme_demo_line_is_the_demo_metrics() -> None:
    (match,) = DEMO_LINE.findall(README)
    metrics = json.loads((REPO / "results" / "demo" / "metrics.json").read_text())
    for shown, key in zip(match, ("uf1", "uar", "accuracy"), strict=True):
        assert _same(shown, metrics[key]), (key, shown, metrics[key])


def _cell_matches(cell: str, row: dict[str, str], keys: tuple[str, ...]) -> bool:
    """Every number of a README cell is its results.csv value at the precision shown ("–": the row has none)."""
    if cell == "–":
        return not row[keys[0]]
    shown = NUMBER.findall(cell)
    return len(shown) == len(keys) and all(row[k] != "" and _same(v.lstrip("+"), float(row[k]))
                                           for v, k in zip(shown, keys, strict=True))


def test_readme_results_table_is_the_committed_results() -> None:
    rows = list(csv.DictReader((REPO / "results" / "megc2019" / "results.csv").open()))
    lines = [line for line in README.splitlines() if line.startswith("| ")]
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| model | protocol | UF1"))
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    assert set(TABLE_COLUMNS) <= set(header), header
    table = []
    for line in lines[header_at + 1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        table.append(dict(zip(header, cells, strict=True)))
    assert len(table) == len(rows) == 12
    used = set()
    for shown in table:
        protocol = shown["protocol"].replace("⚠", "").strip()
        matches = [i for i, row in enumerate(rows) if row["protocol"] == protocol
                   and all(_cell_matches(shown[col], row, keys) for col, keys in TABLE_COLUMNS.items())]
        assert len(matches) == 1, shown
        used.add(matches[0])
    assert used == set(range(len(rows)))


def test_readme_is_a_short_guide() -> None:
    assert len(README.splitlines()) <= 220
    for doc in ("datasets", "results", "deployment", "experiments", "usage", "architecture"):
        assert f"(docs/{doc}.md)" in README and (REPO / "docs" / f"{doc}.md").is_file()
