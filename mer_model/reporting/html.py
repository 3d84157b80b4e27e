"""Minimal, dependency-free HTML for the reports: one self-describing page, tables escaped, figures as relative links
(the PNGs sit next to the page, so the same folder works opened locally and as an MLflow artifact directory)."""

from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tr.leaky td { background: #fde7ea; color: #7a0019; }
.banner { background: #fde7ea; border-left: 6px solid #b00020; padding: 0.6em 1em; margin: 1em 0; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def escape(value: object) -> str:
    return html.escape(str(value))


def page(title: str, sections: Sequence[str]) -> str:
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def table(frame: pd.DataFrame, leaky_rows: Sequence[bool] | None = None, floatfmt: str = "{:.4f}") -> str:
    """An HTML table of `frame` (index ignored); rows flagged in `leaky_rows` get the `leaky` class."""
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    rows = []
    for i, record in enumerate(frame.itertuples(index=False)):
        cells = "".join(f"<td>{escape(_format(v, floatfmt))}</td>" for v in record)
        cls = ' class="leaky"' if leaky_rows is not None and leaky_rows[i] else ""
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _format(value: object, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return floatfmt.format(value)
    return str(value)


def figure(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'
