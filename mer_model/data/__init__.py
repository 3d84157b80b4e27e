"""Datasets: native-layout loaders -> one annotation table (schema), AU parsing, class sets, disk checks."""

from mer.model.data.aus import AU_LIST, aus_from_string, aus_to_string, parse_aus, to_multi_hot
from mer.model.data.checks import CheckSummary, check_table
from mer.model.data.labels import CLASS_SETS, ClassSet, apply_class_set, get_class_set
from mer.model.data.loaders import DATASETS, DatasetEntry, load_annotations
from mer.model.data.schema import COLUMNS, frame_file, read_table, validate_table

__all__ = [
    "AU_LIST", "CLASS_SETS", "COLUMNS", "DATASETS", "CheckSummary", "ClassSet", "DatasetEntry", "apply_class_set",
    "aus_from_string", "aus_to_string", "check_table", "frame_file", "get_class_set", "load_annotations", "parse_aus", "read_table",
    "to_multi_hot", "validate_table",
]
