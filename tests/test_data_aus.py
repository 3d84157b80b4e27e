"""AU strings -> AU numbers: the dialects of the real sheets, and refusal of garbage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mer.model.data.aus import AU_LIST, aus_from_string, aus_to_string, parse_aus, to_multi_hot
from mer.model.errors import DataError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("R12", (12,)), ("L14", (14,)), ("4+7", (4, 7)), ("AU4 + R12C", (4, 12)), ("12 or 14", (12, 14)),
        ("R14A", (14,)), ("4+L10", (4, 10)), ("1+2+25+26", (1, 2, 25, 26)), ("4+7+6", (4, 6, 7)),
        ("(R6 or R12) + R15", (6, 12, 15)), ("12A+ref(24)", (12, 24)), ("ref(L10)+A12B", (10, 12)),
        ("10A/B", (10,)), ("A/L12", (12,)), ("T18+39", (18, 39)), ("B28", (28,)), ("4D+ref(6)+7C+43E", (4, 6, 7, 43)),
        ("R14+17+soft focus", (14, 17)), ("12+15 ", (12, 15)), ("7B+ ref(43)", (7, 43)),
        ("?", ()), ("-", ()), ("none", ()), ("", ()), (None, ()), (float("nan"), ()), (4, (4,)), (12.0, (12,)),
    ],
)
def test_parse_dialects(text: object, expected: tuple[int, ...]) -> None:
    assert parse_aus(text) == expected


@pytest.mark.parametrize("text", ["A", "4++7", "4+", "AU", "happy", "12 and 14", "R", "100", "0", "4+X7"])
def test_garbage_raises_with_row(text: str) -> None:
    with pytest.raises(DataError, match=r"sheet.xlsx, row 17: .*action units"):
        parse_aus(text, file="sheet.xlsx", row=17)


def test_every_string_of_the_real_sheets_parses(annotations_dir) -> None:
    """Every distinct AU cell of the CASME II, SAMM and CAS(ME)^3 sheets parses, to numbers its digits contain."""
    sheets = {"CASME2-coding-20140508.xlsx": "Action Units", "SAMM.xlsx": "Action Units", "casme3_table.xlsx": "AU"}
    seen = 0
    for name, column in sheets.items():
        values = pd.read_excel(annotations_dir / name, usecols=[column])[column].dropna().unique()
        for value in values:
            aus = parse_aus(value, file=name)
            digits = "".join(ch if ch.isdigit() else " " for ch in str(value)).split()
            assert {str(a) for a in aus} == set(digits), value  # no AU invented, none lost
            seen += 1
    assert seen > 200


def test_string_round_trip_and_multi_hot() -> None:
    assert aus_to_string((7, 4, 4)) == "4+7"
    assert aus_from_string("4+7") == (4, 7)
    assert aus_from_string("") == () and aus_from_string(float("nan")) == ()
    with pytest.raises(DataError):
        aus_from_string("4,7")
    assert len(AU_LIST) == 21 and list(AU_LIST) == sorted(AU_LIST)
    vec = to_multi_hot((4, 7, 31))  # 31 is outside the vocabulary
    assert vec.dtype == np.uint8 and vec.sum() == 2
    assert vec[AU_LIST.index(4)] == 1 and vec[AU_LIST.index(7)] == 1
