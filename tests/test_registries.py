"""Registry-driven checks: every registry (mer.model.registry.all_registries(), the platform's included) refuses a
duplicate name naming both places, names its setting for an unknown name and has its row in docs/architecture.md's
"Where to add X: one file" table; every registered model, dataset, epoch-selection protocol, split scheme, class set
and batch key is covered by iterating its registry (as timm does over `list_models()`), with its consumers driven
from the entry, so a new one is tested without editing a list.
"""

from __future__ import annotations

import ast
import importlib
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_models import make_batch
from test_training_data import CLASSES

from mer.model.batch_keys import BATCH_KEYS, Geometry, example_array
from mer.components.settings import BenchmarkModel, parse_params
from mer.model.config import DataConfig, ModelConfig, PreprocessConfig, TrainConfig
from mer.model.data import CLASS_SETS, COLUMNS, DATASETS, load_annotations
from mer.model.errors import ConfigError, DataError
from mer.model.inference import example_arrays, input_batch
from mer.model.models import create_model, list_configs, list_models, model_io, resolve_kwargs
from mer.model.models.registry import get_entry
from mer.model.preprocess.sample import COMPOSITE_BUILDERS, FRAME_BUILDERS
from mer.model.registry import DuplicateNameError, Registry, all_registries
from mer.model.training import augment
from mer.model.training.data import SampleStore, to_tensor
from mer.model.training.protocols import PROTOCOLS, get_protocol, is_leaky, retrain_epochs
from mer.model.training.splits import SPLITS, make_folds
from mer.model.training.trainer import FoldSpec, train_fold

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- every registry


def _import_every_registry() -> list[Registry]:
    """Import every project module that creates a Registry at module level (found in the source, so a registry
    another stream adds, a tracker or a stage one, is covered without a list here); the project's registries."""
    for package in ("mer_model", "components", "pipelines"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            creates = any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry"
                          for stmt in tree.body for node in ast.walk(stmt)
                          if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef)))
            if creates:
                parts = ["mer", package.removeprefix("mer_"), *path.relative_to(REPO / package).with_suffix("").parts]
                importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [r for r in all_registries() if not r.where_to_add.startswith("tests/")]


REGISTRIES = _import_every_registry()


def _add_from_another_place(registry: Registry, name: str, entry: object) -> None:
    registry.add(name, entry)


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.axis)
def test_every_registry_refuses_a_duplicate_naming_both_places_and_names_its_setting(registry: Registry) -> None:
    names = registry.names()
    entry = registry.entries()[0] if len(registry) else object()
    try:
        registry.add("__dummy__", entry)
        with pytest.raises(DuplicateNameError) as err:
            _add_from_another_place(registry, "__dummy__", entry)
        assert str(err.value).count(f"{Path(__file__).name}:") == 2 and f"{registry.axis} '__dummy__'" in str(err.value)
    finally:
        registry.remove("__dummy__")
    assert registry.names() == names
    with pytest.raises(ConfigError, match=rf"^{re.escape(registry.setting)}: unknown {registry.axis} 'no-such'"):
        registry.get("no-such")


def test_the_where_to_add_table_lists_every_registry() -> None:
    """docs/architecture.md's "Where to add X: one file" table is {axis: file} of every registry: a new axis without
    a row (or a row whose registry moved) fails."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("### Where to add X: one file", 1)[1]
    table = section[section.index("\n|"):].split("\n\n", 1)[0].strip().splitlines()
    rows = {cells[0]: cells[1].strip("`") for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                         for line in table[2:])}
    assert rows == {r.axis: r.where_to_add for r in REGISTRIES}


# ------------------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name", list_models())
def test_every_model_small_config_trains_on_its_declared_keys(name: str) -> None:
    """The small configuration reads only batch keys of the spec, and one step on exactly its declared inputs and
    targets gives finite logits and a finite loss with gradients."""
    assert {"paper", "small"} <= set(list_configs(name))
    inputs, targets = model_io(name, "small")
    assert set(inputs) | set(targets) <= set(BATCH_KEYS.names()) | {"label"}
    torch.manual_seed(0)
    model = create_model(name, "small", num_classes=3)
    batch = make_batch(tuple(dict.fromkeys((*inputs, *targets))), b=2, classes=3)
    outputs = model(batch)
    assert outputs["logits"].shape == (2, 3) and torch.isfinite(outputs["logits"]).all()
    loss, parts = model.loss(outputs, batch)
    loss.backward()
    assert torch.isfinite(loss) and "loss" in parts
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_model_leak_flag_matches_the_leak_rule(name: str) -> None:
    """The built model's `leaks_labels` and the library's leak rule (which never builds it) agree, per config."""
    for config in list_configs(name):
        with torch.device("meta"):
            model = create_model(name, config, num_classes=3)
        assert bool(model.leaks_labels) == is_leaky("fixed", ModelConfig(name=name, config=config)), config


@pytest.mark.parametrize("name", list_models())
def test_every_model_option_really_switches_an_input(name: str) -> None:
    """Each optional input the entry declares (argument, off value) is what the model reads: switched off, any
    configuration reads no more than with any value its configurations switch it on with, and less in some."""
    entry = get_entry(name)
    configs = list_configs(name)
    for option in entry.options:
        values = {resolve_kwargs(name, c)[option.kwarg] for c in configs} - {option.off}
        strict = False
        for config, value in ((c, v) for c in configs for v in values):
            off = set().union(*model_io(name, config, **{option.kwarg: option.off}))
            on = set().union(*model_io(name, config, **{option.kwarg: value}))
            assert off <= on, (config, option.kwarg, value)
            strict = strict or off < on
        assert strict or not values, f"{name}: {option.kwarg} switches no input in any configuration"


@pytest.mark.parametrize("name", list_models())
def test_the_benchmark_adapts_every_model_from_its_entry(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """`adapt_entry` knows no model: data without any capability switches every declared option off (each named in a
    note), data with every capability leaves the configuration as it is."""
    from mer.pipelines.benchmark import CAPABILITIES, adapt_entry

    entry = BenchmarkModel(name=name, config="paper")
    options = get_entry(name).options
    assert {o.needs for o in options} <= set(CAPABILITIES)
    lacking = {"faces": False, "apex_crops": 0, "au_coded": {}, "per_dataset": {"smic": 3}}
    with caplog.at_level(logging.WARNING):
        kwargs, _, notes = adapt_entry(name, entry, lacking)
    resolved, paper = resolve_kwargs(name, "paper", **kwargs), resolve_kwargs(name, "paper")
    assert all(resolved[o.kwarg] == o.off for o in options)
    switched = [o for o in options if paper[o.kwarg] != o.off]
    assert len([n for n in notes if "disabled" in n]) == len(switched)
    having = {"faces": True, "apex_crops": 3, "au_coded": {"smic": 3}, "per_dataset": {"smic": 3}}
    kwargs, shown, notes = adapt_entry(name, entry, having)
    assert kwargs == {} and not any("disabled" in n for n in notes)
    assert shown == {o.column: str(paper[o.kwarg]) for o in options if o.column}


# ---------------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("source", DATASETS.names())
def test_every_loader_names_the_missing_root_in_one_line(source: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_annotations(source, tmp_path / "nowhere")
    message = str(err.value)
    assert "nowhere" in message and "\n" not in message


@pytest.mark.parametrize("source", DATASETS.names())
def test_every_dataset_is_a_valid_source_and_ingest_passes_exactly_its_options(
        source: str, caplog: pytest.LogCaptureFixture) -> None:
    """`data.source` accepts it; ingest hands the loader the options its entry accepts and names, in a warning,
    each option set that only other datasets accept; what it provides are table columns."""
    from mer.components.ingest import loader_options

    assert parse_params({"data": {"source": source}}).data.source == source
    entry = DATASETS.get(source)
    assert entry.provides <= set(COLUMNS)
    offered = {o for e in DATASETS.entries() for o in e.options}
    data = DataConfig(source=source, **{o: {"casme2": "sheet.xlsx"} for o in offered})
    with caplog.at_level(logging.WARNING, logger="mer.components.ingest"):
        options = loader_options(data)
    assert set(options) == set(entry.options)
    for option in offered - set(entry.options):
        assert any(f"data.{option} is only used by" in r.getMessage() and source in r.getMessage()
                   for r in caplog.records)


# --------------------------------------------------------------------------------------------------------- class sets


@pytest.mark.parametrize("name", CLASS_SETS.names())
def test_every_class_set_is_a_valid_setting_of_registered_datasets(name: str) -> None:
    """`data.class_set` accepts it, and every dataset it maps is a registered one."""
    assert parse_params({"data": {"class_set": name}}).data.class_set == name
    assert set(CLASS_SETS.get(name).mapping) <= set(DATASETS.names())


# --------------------------------------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("name", PROTOCOLS.names())
def test_every_protocol_keeps_its_promises(name: str, store: SampleStore) -> None:
    """What a protocol declares is what the trainer does: which split it watched every epoch, that validation
    subjects come from the training subjects only, that only a leaky protocol ever scored the test subject during
    training, and which epoch it selected."""
    protocol = get_protocol(name)
    fold = make_folds("loso", store.index)[0]
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, device="cpu", protocol=name, patience=0)
    result = train_fold(FoldSpec(ModelConfig(name="ststnet", config="small"), cfg, fold, CLASSES), store)
    keys = set().union(*(entry.keys() for entry in result.history))
    assert result.leaky == protocol.leaky
    assert any(k.startswith("test_") for k in keys) == (protocol.watch == "test") == protocol.leaky
    assert any(k.startswith("val_") for k in keys) == protocol.needs_validation
    if protocol.needs_validation:
        assert result.val_subjects and set(result.val_subjects) <= set(fold.train_subjects)
        assert not set(result.val_subjects) & set(result.train_subjects)
        assert result.val_score is not None
    assert not set(fold.test_subjects) & (set(result.train_subjects) | set(result.val_subjects))
    if protocol.watch == "none":
        assert result.selected_epoch == cfg.epochs
    else:
        scores = [protocol.score(entry) for entry in result.history]
        assert protocol.score(result.history[result.selected_epoch - 1]) == max(scores)
    assert sorted(result.predictions["subject"].unique()) == list(fold.test_subjects)


@pytest.mark.parametrize("name", PROTOCOLS.names())
def test_every_protocol_is_a_valid_setting(name: str) -> None:
    assert parse_params({"train": {"protocol": name}}).train.protocol == name


def test_retrain_epochs_follow_the_fold_averaged_validation_curve() -> None:
    """`fixed` and the final model retrain for the best epoch of the validation UF1 averaged over folds, not the median
    of the folds' own (noisy) choices; over the epochs every fold reached; the median choice without a curve."""
    def fold(curve: list[float], selected: int) -> SimpleNamespace:  # the FoldSummary fields it reads
        return SimpleNamespace(history=[{"epoch": e, "val_uf1": v} for e, v in enumerate(curve, 1)],
                               selected_epoch=selected)

    # Two folds peak early by chance (their choices: epochs 1, 1, 4); averaged, epoch 4 is best.
    curves = [[0.9, 0.5, 0.6, 0.8], [0.7, 0.5, 0.6, 0.65], [0.2, 0.5, 0.6, 0.9]]
    assert retrain_epochs([fold(c, s) for c, s in zip(curves, [1, 1, 4])]) == 4
    # A fold that stopped early bounds the curve; ties go to the fewer epochs.
    assert retrain_epochs([fold([0.5, 0.7, 0.7], 2), fold([0.5, 0.7, 0.7, 1.0], 4)]) == 2
    # No validation curve (`fixed`, `oracle`): the median selected epoch.
    no_curve = [SimpleNamespace(history=[{"epoch": 1, "test_accuracy": 1.0}], selected_epoch=e) for e in (3, 5, 8)]
    assert retrain_epochs(no_curve) == 5
    with pytest.raises(ValueError, match="no folds"):
        retrain_epochs([])


# ------------------------------------------------------------------------------------------------------------ splits


def _index(datasets: dict[str, int], clips: int = 2) -> pd.DataFrame:
    rows = [{"sample_id": f"{d}/s{s}/c{c}", "dataset": d, "subject": f"{d}/s{s}", "label": c % 3}
            for d, subjects in datasets.items() for s in range(subjects) for c in range(clips)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("name", SPLITS.names())
def test_every_split_tests_each_subject_exactly_once_and_never_trains_on_it(name: str) -> None:
    index = _index({"casme2": 3, "smic": 2, "samm": 2})
    folds = make_folds(name, index)
    tested = [s for f in folds for s in f.test_subjects]
    assert sorted(tested) == sorted(index["subject"].unique())
    for fold in folds:
        assert fold.train_subjects and not set(fold.train_subjects) & set(fold.test_subjects)
        assert set(fold.train_subjects) | set(fold.test_subjects) == set(index["subject"])
    assert parse_params({"train": {"split": name}}).train.split == name


def test_lodo_holds_out_one_whole_dataset_per_fold() -> None:
    index = _index({"casme2": 3, "smic": 2})
    folds = make_folds("lodo", index)
    assert [f.name for f in folds] == ["casme2", "smic"]
    assert all(s.startswith("casme2/") for s in folds[0].test_subjects)
    assert all(s.startswith("smic/") for s in folds[0].train_subjects)
    with pytest.raises(ConfigError, match="train.split: lodo needs at least 2 datasets"):
        make_folds("lodo", _index({"casme2": 3}))


# -------------------------------------------------------------------------------------------------------- batch keys


@pytest.mark.parametrize("key", BATCH_KEYS.names())
def test_every_batch_key_has_its_producers_and_is_a_valid_modality(key: str) -> None:
    """Its builders exist for both source kinds (frame folders, the composite's files), the settings it depends on
    are real `preprocess` settings, and `preprocess.modalities` (validated from this registry) accepts it."""
    spec = BATCH_KEYS.get(key)
    assert key in FRAME_BUILDERS and key in COMPOSITE_BUILDERS and spec.stored[0] == key
    section = PreprocessConfig().model_dump(mode="json", by_alias=True)
    for dotted in spec.depends:
        node = section
        for part in dotted.split("."):
            assert part in node, f"{key} depends on preprocess.{dotted}, which does not exist"
            node = node[part]
    assert parse_params({"preprocess": {"modalities": [key]}}).preprocess.modalities == [key]
    with pytest.raises(ConfigError, match=rf"preprocess.modalities.0: Input should be .*'{key}'"):
        parse_params({"preprocess": {"modalities": [f"{key}x"]}})


@pytest.mark.parametrize("key", BATCH_KEYS.names())
def test_every_batch_key_converts_and_augments_by_its_spec(key: str) -> None:
    """The cache array of the spec becomes the documented batch tensor, survives the augmentation with its shape
    and dtype, and reaches a served model's input the same way."""
    spec = BATCH_KEYS[key]
    cfg = PreprocessConfig(seq_frames=3, seq_size=32, face_size=48)
    rng = np.random.default_rng(0)
    array = example_array(key, cfg)
    array = (rng.integers(0, 256, array.shape) if spec.pixels else rng.random(array.shape)).astype(spec.dtype)
    tensor = to_tensor(key, array)
    expected = tuple(np.moveaxis(array, -1, 0).shape) if spec.hwc else array.shape
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == expected
    if spec.pixels:
        assert float(tensor.max()) <= 1.0
    moved = augment.apply({key: array}, augment.Augmentation(flip=True, angle=2.0, shift_x=0.02, shift_y=0.0))
    assert moved[key].shape == array.shape and moved[key].dtype == array.dtype
    if spec.geometry is Geometry.NONE:
        assert np.array_equal(moved[key], array)
    else:
        assert not np.array_equal(moved[key], array)
    batch = input_batch(example_arrays([key], cfg), [key])
    assert tuple(batch[key].shape) == (1, *expected)


def test_a_new_protocol_is_ordered_and_shown_by_every_table_from_the_registry(request: pytest.FixtureRequest,
                                                                               tmp_path: Path) -> None:
    """The display order of protocols is the registry's (no consumer lists fixed/inner/oracle again): a fourth
    protocol sorts after the others in results.csv and the comparison table and gets its own bars in results.png."""
    from mer.model.reporting.benchmark import plot_results
    from mer.model.reporting.compare import comparison_table
    from mer.model.training import protocols
    from mer.pipelines.benchmark import merge_rows

    PROTOCOLS.add("patience", protocols.Inner())  # registered last
    request.addfinalizer(lambda: PROTOCOLS.remove("patience"))
    assert PROTOCOLS.rank("patience") == 3 and PROTOCOLS.rank("old") == 4
    rows = pd.DataFrame([{"model": "m", "protocol": p, "label": "m", "leaky": False, "uf1": 0.5 + i / 10}
                         for i, p in enumerate(["patience", "oracle", "fixed", "inner"])])
    assert list(merge_rows(tmp_path / "none.csv", rows, ["m"])["protocol"]) == ["fixed", "inner", "oracle", "patience"]
    runs = rows.assign(run_id=[f"r{i}" for i in range(4)], dataset="d", split="loso", data_version="v",
                       settings="{}", settings_digest="s", start_time=range(4), uar=0.5)
    assert list(comparison_table(runs)["protocol"]) == ["fixed", "inner", "oracle", "patience"]
    settings = {"collection": "c", "samples": 4, "subjects": 2, "cuda": False}
    assert plot_results(rows, tmp_path / "results.png", settings) == ["fixed", "inner", "oracle", "patience"]
