"""Preprocessing: face alignment, TV-L1 flow and optical strain, landmarks -> the per-sample cache (no Ray here)."""

from mer_model.preprocess.cache import Cache, SampleResult, params_hash, process_row, sample_file
from mer_model.preprocess.sample import SampleOutput, preprocess_sample

__all__ = ["Cache", "SampleOutput", "SampleResult", "params_hash", "preprocess_sample", "process_row", "sample_file"]
