"""FACS action-unit strings of the coding sheets -> AU numbers, and the fixed AU vocabulary of the models.

The sheets write AUs in many dialects: `4+7`, `R12`, `L14C` (laterality prefix L/R/T/B/A/U, intensity suffix A-E),
`AU4 + R12C`, `12 or 14`, `(R6 or R12)+R15`, `ref(24)`, `10A/B`, `A/L12`. Laterality and intensity are dropped; the
AU number is kept. Interpretation choices (checked against every distinct string of the CASME II, SAMM, SMIC and
CAS(ME)^3 sheets, see tests/test_data_aus.py):

* `X or Y` keeps BOTH AUs: the coder saw one of the two movements and the union is what a multi-hot can express.
* `ref(X)` keeps X: SAMM marks a movement that is present but coded as a reflex/reference (e.g. a blink `ref(43)`).
* `?`, `-`, `none`, `n/a` and empty mean no usable coding -> no AUs.
* Free-text descriptors that are not AUs (SAMM's `soft focus`) are dropped by name; anything else that does not parse
  raises `DataError` naming the row -- never a silent guess.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable

import numpy as np

from mer.model.errors import DataError

log = logging.getLogger(__name__)

# The 21 AUs most frequent in the CASME II (2014-05-08) and SAMM sheets together, counting each AU once per clip,
# ties broken by AU number; the authors of CVA+FPF+AU also use a 21-AU vector. Order = ascending AU number.
# Clips per AU (CASME II + SAMM): 4:129+23, 7:38+46, 12:34+30, 14:27+13, 2:21+18, 1:26+6, 17:25+7, 10:17+6, 15:16+4,
# 6:13+5, 9:13+5, 5:2+10, 24:2+10, 25:2+7, 20:1+7, 43:0+8, 26:1+6, 18:1+4, 39:0+5, 38:2+2, 13:0+3; next is 31 (0+2).
AU_LIST: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15, 17, 18, 20, 24, 25, 26, 38, 39, 43)

_EMPTY = {"", "?", "-", "none", "n/a", "na", "nan"}
_DESCRIPTORS = {"soft focus"}  # non-AU notes written in the AU column of SAMM
_TOKEN = re.compile(r"^(?:[ABLRTU](?:/[ABLRTU])?)?(\d{1,2})(?:[A-E](?:/[A-E])?)?$", re.IGNORECASE)
_SPLIT = re.compile(r"\+|,|\bor\b", re.IGNORECASE)
_REF = re.compile(r"ref\s*\(([^()]*)\)", re.IGNORECASE)


def parse_aus(value: object, *, file: str | None = None, row: int | str | None = None) -> tuple[int, ...]:
    """Parse one sheet cell into sorted unique AU numbers; raises DataError (file, row) on anything unparseable."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return _check_range((int(value),), value, file, row)
    text = " ".join(str(value).split())
    if text.lower() in _EMPTY:
        return ()
    body = _REF.sub(r"\1", text)
    body = re.sub(r"\bAU\s*", "", body, flags=re.IGNORECASE).replace("(", " ").replace(")", " ")
    numbers: list[int] = []
    for token in _SPLIT.split(body):
        token = token.strip()
        if token.lower() in _DESCRIPTORS:
            log.debug("AU string %r: dropped descriptor %r", text, token)
            continue
        match = _TOKEN.match(token)
        if match is None:
            raise DataError(f"cannot parse action units {text!r} (bad part {token!r})", file=file, row=row)
        numbers.append(int(match.group(1)))
    return _check_range(tuple(sorted(set(numbers))), text, file, row)


def _check_range(numbers: tuple[int, ...], text: object, file: str | None, row: int | str | None) -> tuple[int, ...]:
    if any(not 1 <= n <= 99 for n in numbers):
        raise DataError(f"action units {text!r}: AU numbers must be 1..99", file=file, row=row)
    return numbers


def aus_to_string(aus: Iterable[int]) -> str:
    """The table's `aus` column form: sorted unique numbers joined by '+', '' for none."""
    return "+".join(str(n) for n in sorted(set(int(a) for a in aus)))


def aus_from_string(text: object) -> tuple[int, ...]:
    """Inverse of `aus_to_string` (accepts '' and NaN as no AUs, as a CSV round trip produces)."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or str(text).strip() == "":
        return ()
    try:
        return tuple(int(part) for part in str(text).split("+"))
    except ValueError:
        raise DataError(f"aus column value {text!r} is not of the form '4+7'") from None


def to_multi_hot(aus: Iterable[int], au_list: tuple[int, ...] = AU_LIST) -> np.ndarray:
    """uint8 vector over `au_list`; AUs outside the vocabulary are ignored (they are rare, see AU_LIST)."""
    index = {au: i for i, au in enumerate(au_list)}
    vec = np.zeros(len(au_list), dtype=np.uint8)
    for au in aus:
        if int(au) in index:
            vec[index[int(au)]] = 1
    return vec
