"""Learning check for every registered model: its small configuration must fit two dozen training samples.

A network that cannot overfit 24 samples in a few dozen steps has a bug (a saturated attention map, BatchNorm
statistics that lag the weights, a head that never sees its input), not a budget problem: the MEGC2019 rows of
MMNet and CVA+FPF+AU sat at chance for exactly such reasons. Parametrised over the registry, so a new model or a new
`*small*` configuration is covered without editing this file. Flow-only models train on real composite maps
(8 CASME II samples per class, ../shared), the position variants (FPF, PC) on those maps plus the real apex crops;
models that need face frames on the synthetic set. One recipe for all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mer.components.settings import load_params
from mer.model.config import ModelConfig, TrainConfig
from mer.model.models.registry import list_configs, list_models, model_io
from mer.model.training.data import SampleStore
from mer.model.training.trainer import fit_check

from conftest import tiny_params

CASES = [pytest.param(name, config, {}, id=f"{name}-{config}")
         for name in list_models() for config in list_configs(name) if "small" in config]
# The position variants on real faces: the flow map + the composite's real apex crop (the benchmark's `faces` variant),
# FPF (the main system's Swin focaliser, CPU scale: embed dim 16, depths 1-1-1, the crop at the config's 64 px) and
# PC (MMNet's position calibration; the main system's PC ablation).
APEX = {"position_frames": ["apex224"]}
CASES += [pytest.param("cva_fpf", "flow_small", {"position": "fpf", **APEX}, id="cva_fpf-flow_small-fpf-apex"),
          pytest.param("cva_fpf", "flow_small", {"position": "pc", **APEX}, id="cva_fpf-flow_small-pc-apex"),
          pytest.param("mmnet", "flow_small", {"position": "pc", **APEX}, id="mmnet-flow_small-pc-apex")]
# Cache arrays the composite provides (no face frames; the apex crop at the tiny set's face_size, 64 px): a model
# reading only these trains on real maps and faces.
COMPOSITE_KEYS = {"flow28", "points5", "aus", "apex224"}
PER_CLASS = 8
EPOCHS = 16  # 3 steps per epoch at batch 8: 48 steps
RECIPE = TrainConfig(epochs=EPOCHS, lr=1e-3, batch_size=8, optimizer="adamw", weight_decay=0.0, augment=False,
                     device="cpu", seed=0)
FIT_UF1 = 0.9


@pytest.fixture(scope="module")
def composite_subset(composite_dir: Path, annotations_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                     local_ray: None) -> tuple[SampleStore, list[str]]:
    """The composite's maps (+ CASME II AUs from the coding sheet) and a fixed draw of 8 CASME II samples per class."""
    from mer.components.ingest import ingest
    from mer.components.preprocess import preprocess

    root = tmp_path_factory.mktemp("learning-composite")
    params = load_params(tiny_params(
        root, root / "data", **{"data.source": "megc2019", "data.root": str(composite_dir),
                                "data.class_set": "megc2019_3",
                                "data.au_sheets": {"casme2": str(annotations_dir / "CASME2-coding-20140508.xlsx")},
                                "preprocess.modalities": sorted(COMPOSITE_KEYS)}))
    ingest(params)
    preprocess(params)
    store = SampleStore.open(params.preprocess.out)
    index = store.index[store.index["dataset"] == "casme2"]
    rng = np.random.default_rng(0)
    ids = [str(s) for label in range(store.num_classes)
           for s in rng.choice(sorted(index.loc[index["label"] == label, "sample_id"]), PER_CLASS, replace=False)]
    return store, ids


@pytest.fixture(scope="module")
def synthetic_subset(tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> tuple[SampleStore, list[str]]:
    """24 synthetic clips (8 subjects x 3) with every frame-based modality, at the tiny set's coarse settings."""
    from mer.components.ingest import ingest
    from mer.components.preprocess import preprocess
    from mer.components.synth import synthesize

    root = tmp_path_factory.mktemp("learning-synthetic")
    params = load_params(tiny_params(
        root, root / "data", **{"synth.subjects": 8, "synth.datasets": 1, "preprocess.seq_frames": 8,
                                "preprocess.seq_size": 64,
                                "preprocess.modalities": ["onset224", "apex224", "frames128", "flows128",
                                                          "landmarks68", "aus"]}))
    synthesize(params.synth)
    ingest(params)
    preprocess(params)
    store = SampleStore.open(params.preprocess.out)
    return store, list(store.index["sample_id"])


@pytest.mark.parametrize(("name", "config", "kwargs"), CASES)
def test_small_configuration_fits_its_training_samples(name: str, config: str, kwargs: dict,
                                                       request: pytest.FixtureRequest) -> None:
    inputs, targets = model_io(name, config, **kwargs)
    reads = set(inputs) | set(targets) - {"label"}
    store, ids = request.getfixturevalue("composite_subset" if reads <= COMPOSITE_KEYS else "synthetic_subset")
    history = fit_check(ModelConfig(name=name, config=config, kwargs=kwargs), RECIPE, store, ids, EPOCHS)
    last = history[-1]
    assert last["fit_uf1"] >= FIT_UF1, f"{name}/{config} {kwargs} fits only to train UF1 {last['fit_uf1']:.2f}: {last}"
    assert np.isfinite(last["fit_loss"])
    if "flows128" in targets:  # MOL's auxiliary tasks are scored, not just trained
        assert np.isfinite(last["fit_flow_epe"]) and np.isfinite(last["fit_landmark_nme"]), last
