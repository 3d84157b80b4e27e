"""Class sets on the real sheets: the published class counts, and exclusions that are counted, never silent."""

from __future__ import annotations

from pathlib import Path

import pytest

from mer.model.data import CLASS_SETS, apply_class_set, load_annotations
from mer.model.errors import ConfigError, DataError

SHEETS = {"casme2": "CASME2-coding-20140508.xlsx", "samm": "SAMM.xlsx", "smic": "smic_apex.xlsx",
          "casme3": "casme3_table.xlsx"}


def _counts(annotations_dir: Path, source: str, class_set: str) -> tuple[dict[str, int], dict[str, int]]:
    table = load_annotations(source, annotations_dir, annotations_dir / SHEETS[source], frames=False)
    labelled, excluded = apply_class_set(table, class_set)
    assert len(labelled) + len(excluded) == len(table)  # every row is either labelled or excluded with a reason
    names = CLASS_SETS[class_set].names
    per_class = {names[k]: int(v) for k, v in labelled["label"].value_counts().items()}
    return per_class, excluded["reason"].value_counts().to_dict()


@pytest.mark.parametrize(
    ("source", "class_set", "expected"),
    [
        ("casme2", "casme2_5", {"happiness": 32, "surprise": 25, "disgust": 63, "repression": 27, "others": 99}),
        ("samm", "samm_5", {"happiness": 26, "surprise": 15, "anger": 57, "contempt": 12, "others": 26}),
        ("casme2", "megc2019_3", {"negative": 88, "positive": 32, "surprise": 25}),  # official composite part
        ("samm", "megc2019_3", {"negative": 92, "positive": 26, "surprise": 15}),
        ("smic", "megc2019_3", {"negative": 70, "positive": 51, "surprise": 43}),
        ("smic", "smic_3", {"negative": 70, "positive": 51, "surprise": 43}),
        ("casme3", "casme3_4", {"negative": 457, "positive": 55, "surprise": 187, "others": 161}),
    ],
)
def test_class_counts(annotations_dir: Path, source: str, class_set: str, expected: dict[str, int]) -> None:
    assert _counts(annotations_dir, source, class_set)[0] == expected


def test_exclusions_have_reasons(annotations_dir: Path) -> None:
    _, reasons = _counts(annotations_dir, "casme2", "megc2019_3")
    assert reasons == {"emotion 'others' not in class set megc2019_3": 99,
                       "emotion 'sadness' not in class set megc2019_3": 7,
                       "emotion 'fear' not in class set megc2019_3": 2,
                       "not part of megc2019_3 (standard exclusion)": 2}


def test_native_megc_matches_composite(annotations_dir: Path, composite_dir: Path) -> None:
    """megc2019_3 on the native CASME II sheet selects exactly the composite's CASME II samples and labels."""
    native, _ = apply_class_set(load_annotations("casme2", annotations_dir, annotations_dir / SHEETS["casme2"],
                                                 frames=False), "megc2019_3")
    composite, _ = apply_class_set(load_annotations("megc2019", composite_dir, frames=False), "megc2019_3")
    composite = composite[composite["dataset"] == "casme2"]
    assert dict(zip(native["sample_id"], native["label"])) == dict(zip(composite["sample_id"], composite["label"]))


def test_wrong_class_set(annotations_dir: Path) -> None:
    table = load_annotations("casme2", annotations_dir, annotations_dir / SHEETS["casme2"], frames=False)
    with pytest.raises(DataError, match="class set samm_5 keeps no sample"):
        apply_class_set(table, "samm_5")
    with pytest.raises(ConfigError, match="data.class_set: unknown class set 'casme2_7'"):
        apply_class_set(table, "casme2_7")
