"""Preprocessing: face alignment, TV-L1 flow and optical strain, landmarks -> the per-modality cache (no Ray here)."""

from mer.model.preprocess.cache import Cache, SampleResult, entry_file, params_hash, process_row
from mer.model.preprocess.modalities import MODALITIES, model_modalities, modalities_for
from mer.model.preprocess.sample import SampleOutput, preprocess_sample

__all__ = ["MODALITIES", "Cache", "SampleOutput", "SampleResult", "entry_file", "model_modalities", "modalities_for",
           "params_hash", "preprocess_sample", "process_row"]
