"""benchmarks/gpu.py in its tiny CPU form: every part runs and writes its JSON and Markdown (the GPU figures
themselves come from a run on a GPU machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mer.model.models import list_models

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_writes_every_part(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        report = _load().main(["--cpu-smoke", "--out", str(tmp_path), "--catalogue",
                               str(SCRIPT.parents[1] / "benchmarks" / "catalogue.yaml")])
    finally:
        torch.set_num_threads(threads)
    stored = json.loads((tmp_path / "gpu.json").read_text())
    assert stored["cpu_smoke"] is True and stored["device"].startswith("CPU")
    assert sorted(r["model"] for r in stored["steps"]) == sorted(list_models())
    assert all(r["s_per_step"] > 0 and r["precision"] == "float32" for r in stored["steps"])
    assert [r["model"] for r in stored["loso"]] == ["ststnet", "htnet"]
    for row in stored["loso"]:
        assert row["folds"] == 4 and row["per_fold_extrapolated"] and row["batched_total_s"] > 0
    assert stored["htnet_recipe"]["recipe_epochs"] == 800 and stored["htnet_recipe"]["recipe_s_extrapolated"] > 0
    table = (tmp_path / "gpu.md").read_text()
    assert stored["device"] in table and "not GPU figures" in table and report["loso"] == stored["loso"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_full_form_refuses(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        _load().main(["--out", str(tmp_path)])
    assert exit_.value.code == 2 and not (tmp_path / "gpu.json").exists()
