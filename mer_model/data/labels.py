"""Class sets: which raw emotions of which datasets become which class index, and which rows are left out.

A class set is explicit per dataset: a row of a dataset the set does not cover, or an emotion the set does not map,
is excluded with a reason -- counted and logged, never silently relabelled. The composite MEGC2019 table carries the
class name itself as its emotion (`negative`/`positive`/`surprise`), which every set accepts as its own name.

Counts on the public sheets (tests/test_data_labels.py checks them):
* `casme2_5` on CASME2-coding-20140508.xlsx: happiness 32, surprise 25, disgust 63, repression 27, others 99 (246);
  fear 2 and sadness 7 excluded. (Papers often quote disgust 64 / 247 samples from an older sheet.)
* `samm_5` on SAMM.xlsx: happiness 26, surprise 15, anger 57, contempt 12, others 26 (136).
* `megc2019_3` (See et al., MEGC2019): CASME II disgust+repression -> negative, happiness -> positive, surprise;
  SAMM anger, contempt, disgust, fear, sadness -> negative; SMIC as labelled. The released composite has no CASME II
  fear/sadness and leaves out two disgust clips (sub04/EP12_01f, sub05/EP09_05f); both are reproduced here, so the
  native sheets give the official 145 CASME II (88/32/25), 133 SAMM (92/26/15) and 164 SMIC (70/51/43) samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mer.model.errors import DataError
from mer.model.registry import Registry

log = logging.getLogger(__name__)
LOGGED_PER_REASON = 5  # rows logged individually per reason; all are in ingest's exclusions CSV


@dataclass(frozen=True)
class ClassSet:
    """`mapping[dataset][raw emotion, lower case] -> class name`; `excluded[dataset]` = (subject, clip) left out."""

    name: str
    names: tuple[str, ...]
    mapping: dict[str, dict[str, str]]
    excluded: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    def class_of(self, dataset: str, emotion: str) -> str | None:
        """Class name of a raw emotion, None when this set does not use it."""
        table = self.mapping.get(dataset)
        if table is None:
            return None
        key = normalise_emotion(emotion)
        if key in table:
            return table[key]
        return key if key in self.names else None


def normalise_emotion(emotion: object) -> str:
    return " ".join(str(emotion).split()).lower()


_CASME2_3 = {"disgust": "negative", "repression": "negative", "happiness": "positive", "surprise": "surprise"}
_SAMM_3 = {e: "negative" for e in ("anger", "contempt", "disgust", "fear", "sadness")} | {
    "happiness": "positive", "surprise": "surprise"}
_CASME3_3 = {e: "negative" for e in ("disgust", "fear", "anger", "sad")} | {"happy": "positive", "surprise": "surprise"}
_IDENTITY_5 = {e: e for e in ("happiness", "surprise", "disgust", "repression", "others")}

CLASS_SETS: Registry[ClassSet] = Registry("class set", "data.class_set", "mer_model/data/labels.py")
for _set in (
    ClassSet(
        "megc2019_3", ("negative", "positive", "surprise"),
        {"casme2": _CASME2_3, "samm": _SAMM_3, "smic": {}, "casme3": _CASME3_3, "synthetic": _CASME2_3},
        excluded={"casme2": frozenset({("casme2/sub04", "EP12_01f"), ("casme2/sub05", "EP09_05f")})},
    ),
    ClassSet(
        "casme2_5", ("happiness", "surprise", "disgust", "repression", "others"),
        {"casme2": _IDENTITY_5, "synthetic": _IDENTITY_5},
    ),
    ClassSet(
        "samm_5", ("happiness", "surprise", "anger", "contempt", "others"),
        {"samm": {"other": "others"}},
    ),
    ClassSet("smic_3", ("negative", "positive", "surprise"), {"smic": {}}),
    ClassSet(
        "casme3_7", ("happy", "surprise", "disgust", "fear", "anger", "sad", "others"),
        {"casme3": {}},
    ),
    ClassSet(
        "casme3_4", ("negative", "positive", "surprise", "others"),
        {"casme3": _CASME3_3 | {"others": "others"}},
    ),
    ClassSet("casme3_3", ("negative", "positive", "surprise"), {"casme3": _CASME3_3}),
):
    CLASS_SETS.add(_set.name, _set)


def get_class_set(name: str) -> ClassSet:
    """The registered class set `name`; ConfigError naming `data.class_set` when unknown."""
    return CLASS_SETS.get(name)


def apply_class_set(table: pd.DataFrame, class_set: ClassSet | str, *, strict: bool = False
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Set `label` from `emotion`; returns (labelled rows, excluded rows with `reason` and `detail` columns).

    Where a second coding of the same sample was joined beside the row (`coded_emotion`, e.g. the CASME II / SAMM
    sheet's emotion beside a composite label), both must fall in the same class of this set; a contradiction is
    excluded with the reason naming both sheets and rows (with `strict`, it raises DataError instead), because a
    label its own dataset's coding disagrees with is wrong data that looks valid.

    Raises DataError when nothing is left (e.g. `samm_5` asked of CASME II data), because training on an empty
    table is always a configuration mistake.
    """
    cs = get_class_set(class_set) if isinstance(class_set, str) else class_set
    reasons: list[tuple[str, str]] = []
    labels: list[int | None] = []
    # A part of a collection without an entry of its own (synthetic1, synthetic2 of synth.datasets) is labelled like
    # its collection.
    sources = [d if d in cs.mapping else c for d, c in zip(table["dataset"], table["collection"])]
    for dataset, row in zip(sources, table.itertuples(index=False)):
        reason, detail, label = "", "", None
        if dataset not in cs.mapping:
            reason = f"dataset {dataset} not in class set {cs.name}"
        elif (row.subject, row.clip) in cs.excluded.get(dataset, frozenset()):
            reason = f"not part of {cs.name} (standard exclusion)"
        else:
            name = cs.class_of(dataset, row.emotion)
            coded = cs.class_of(dataset, row.coded_emotion) if row.coded_emotion else name
            if name is None:
                reason = f"emotion {normalise_emotion(row.emotion)!r} not in class set {cs.name}"
            elif coded != name:
                reason = "label contradicts the dataset's coding"
                detail = (f"{Path(row.source_file).name}, row {row.source_row} says {normalise_emotion(row.emotion)}"
                          f" ({name}); {row.coded_source} says {normalise_emotion(row.coded_emotion)}"
                          f" ({coded or f'not in {cs.name}'})")
                if strict:
                    raise DataError(f"{row.sample_id}: {reason}: {detail}", file=row.source_file, row=row.source_row)
            else:
                label = cs.names.index(name)
        reasons.append((reason, detail))
        labels.append(label)
    out = table.copy()
    out["label"] = pd.array(labels, dtype="Int64")
    keep = pd.Series([r == "" for r, _ in reasons], index=table.index)
    excluded = out[~keep].assign(reason=[r for r, _ in reasons if r], detail=[d for r, d in reasons if r])
    labelled = out[keep].reset_index(drop=True)
    for reason, count in excluded["reason"].value_counts().items():
        log.info("class set %s: excluded %d samples: %s", cs.name, count, reason)
    for row in excluded[excluded["detail"] != ""].head(LOGGED_PER_REASON).itertuples(index=False):
        log.warning("%s, row %s: %s: %s (%s) (excluded)", row.source_file, row.source_row, row.sample_id, row.reason,
                    row.detail)
    if labelled.empty:
        raise DataError(f"class set {cs.name} keeps no sample of datasets {sorted(set(table['dataset']))}")
    counts = labelled["label"].value_counts().sort_index()
    log.info("class set %s: %s", cs.name, ", ".join(f"{cs.names[i]} {n}" for i, n in counts.items()))
    return labelled, excluded.reset_index(drop=True)
