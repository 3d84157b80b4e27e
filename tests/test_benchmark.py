"""`mer benchmark` end to end on a tiny real composite (4 subjects of the shared CASME II + SMIC part, 1 epoch):
ingest -> preprocess -> the Ray Tune LOSO driver -> results.csv / results.md / results.png."""

from __future__ import annotations

import os
import shutil
import subprocess
import logging
from pathlib import Path

import pandas as pd
import pytest

from mer.pipelines.benchmark import (adapt_entry, data_capabilities, order_protocols, parse_au_sheets, portable_path, run_params,
                                 with_models_inputs)
from mer.pipelines.cli import main
from mer.components.settings import BenchmarkModel, load_catalogue, load_params
from mer.components.tracking.base import git_commit
from mer.model.errors import ConfigError, DataError
from mer.model.reporting.benchmark import markdown_table, table_notes

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = {("casme2", "sub02"), ("casme2", "sub19"), ("smic", "s14"), ("smic", "s08")}
CSV = "combined_3_class2_for_optical_flow.csv"
FLOWS = Path("datasets") / "STSNet_whole_norm_u_v_os"


@pytest.fixture()
def tiny_composite(composite_dir: Path, tmp_path: Path) -> Path:
    """Four subjects of the shared composite, copied into tmp (flow PNGs, the label CSV and the 5-point file)."""
    root = tmp_path / "composite"
    (root / FLOWS).mkdir(parents=True)
    table = pd.read_csv(composite_dir / CSV, dtype=str, keep_default_na=False)
    table = table[[(d, s) in SUBJECTS for d, s in zip(table["dataset"], table["sub"], strict=True)]]
    table.to_csv(root / CSV, index=False)
    for sub, clip in zip(table["sub"], table["filename_o"], strict=True):
        name = f"{sub}_{clip} .png"
        shutil.copy(composite_dir / FLOWS / name, root / FLOWS / name)
    points = pd.read_csv(composite_dir / "landmarks5_28px.csv", dtype=str, keep_default_na=False)
    points[points["imagename"].isin(set(table["imagename"]))].to_csv(root / "landmarks5_28px.csv", index=False)
    return root


# The full-shape composite: three "datasets" like the real one (CASME II coded by its sheet, SMIC without AU coding,
# a SAMM part coded by a SAMM sheet with one subject whose coded AUs are all outside the AU list, i.e. zero vectors),
# apex crops for every sample, no landmarks file (five points by dlib, or the template where it finds no face:
# casme2/sub13 and one of smic/s19), a one-class test subject (casme2/sub13: two positive samples).
FULL_SHAPE = {("casme2", "sub13"), ("smic", "s05"), ("smic", "s19")}
# SAMM rows of the shared SAMM sheet (subject, clip) -> the composite's label; their maps and crops are borrowed from
# CASME II samples (the shared part has no SAMM files): only the shape of the data matters here.
SAMM_ROWS = {("006", "006_1_2"): 0, ("006", "006_3_5"): 2, ("007", "007_6_2"): 1, ("007", "007_5_3"): 2}
SILENT_SAMM_SUBJECT = 7  # coded, but with AU 45 only (not in AU_LIST): a test subject on whom no coded AU occurs
CROPS = Path("datasets") / "combined_datasets_whole"


@pytest.fixture()
def full_shape_composite(composite_dir: Path, annotations_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(root, SAMM sheet) of a composite shaped like the full MEGC2019 one, built from the shared part in tmp."""
    root = tmp_path / "full-shape"
    for folder in (FLOWS, CROPS):
        (root / folder).mkdir(parents=True)
    table = pd.read_csv(composite_dir / CSV, dtype=str, keep_default_na=False)
    donors = table[table["dataset"] == "casme2"].iloc[:len(SAMM_ROWS)]
    table = table[[(d, s) in FULL_SHAPE for d, s in zip(table["dataset"], table["sub"], strict=True)]]
    samm = [{"dataset": "samm", "sub": sub, "filename_o": clip, "label": str(label), "apex": "",
             "imagename": f"{sub}_{clip}.jpg", "sub_filename": ""} for (sub, clip), label in SAMM_ROWS.items()]
    for row, donor in zip(samm, donors.itertuples(), strict=True):
        shutil.copy(composite_dir / FLOWS / f"{donor.sub}_{donor.filename_o} .png",
                    root / FLOWS / f"{row['sub']}_{row['filename_o']} .png")
        shutil.copy(composite_dir / CROPS / donor.imagename, root / CROPS / row["imagename"])
    for row in table.itertuples():
        shutil.copy(composite_dir / FLOWS / f"{row.sub}_{row.filename_o} .png", root / FLOWS)
        shutil.copy(composite_dir / CROPS / row.imagename, root / CROPS)
    pd.concat([table, pd.DataFrame(samm)], ignore_index=True).to_csv(root / CSV, index=False)
    sheet = pd.read_excel(annotations_dir / "SAMM.xlsx", dtype={"Subject": str})
    sheet = sheet[[(f"{int(s):03d}", c) in SAMM_ROWS for s, c in zip(sheet["Subject"], sheet["Filename"],
                                                                     strict=True)]].copy()
    sheet.loc[sheet["Subject"].astype(int) == SILENT_SAMM_SUBJECT, "Action Units"] = "45"
    sheet.to_excel(tmp_path / "SAMM.xlsx", index=False)
    return root, tmp_path / "SAMM.xlsx"


CATALOGUE = load_catalogue(REPO / "benchmarks" / "catalogue.yaml")
CPU_ENTRIES = [key for key in CATALOGUE.models if key.endswith("-cpu")]


@pytest.mark.usefixtures("local_ray")
def test_every_cpu_entry_runs_over_the_full_shape_composite(full_shape_composite: tuple[Path, Path],
                                                            annotations_dir: Path, tmp_path: Path) -> None:
    """Every `*-cpu` entry of params.yaml completes over the full-shape composite (one epoch, `inner`): FPF runs on
    the apex crops on the first run with no extra setting, because the collection has them (said in the notes and in
    results.md); the main system's two-seed ensemble survives folds without an AU F1 (SMIC, the silent SAMM
    subject), which stay absent; HTNet covers every sample without the landmarks file, the template points counted."""
    root, samm_sheet = full_shape_composite
    out = tmp_path / "results"
    argv = [
        "benchmark", "megc2019", "--root", str(root), "--models", *CPU_ENTRIES, "--protocol", "inner",
        "--epochs", "1", "--out", str(out), "--au-sheets",
        f"casme2={annotations_dir / 'CASME2-coding-20140508.xlsx'}", f"samm={samm_sheet}",
        "--params", str(REPO / "params.yaml"), "--catalogue", str(REPO / "benchmarks" / "catalogue.yaml"),
        "-S", f"benchmark.work={tmp_path / 'work'}",
        "-S", "tracking.backend=none", "-S", "benchmark.cpus=2", "-S", "tune.fold_group_size=3",
    ]
    assert main(argv) == 0
    table = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""]).set_index("model")
    n = len(pd.read_csv(root / CSV))
    assert sorted(table.index) == sorted(CPU_ENTRIES) and (table["protocol"] == "inner").all()
    assert (table["folds"] == "5/5").all() and (table["n_samples"] == n).all()
    assert (table["coverage"] == f"{n}/{n}").all()  # HTNet included: no sample lost to the face detector
    assert table["datasets"].eq("casme2+samm+smic").all()
    for key in ("cva-fpf-flow-cpu", "cva-fpf-flow-au-cpu"):
        assert '"position": "fpf"' in table.loc[key, "model_kwargs"] and "FPF on the apex face crops" in table.loc[
            key, "notes"]
    main_system = table.loc["cva-fpf-flow-cpu"]
    assert main_system["ensemble"] == 2 and main_system["au"] == "predicted"
    # AU F1 defined on the CASME II folds and the SAMM subject who shows AUs only; never a zero for the others.
    assert main_system["au_f1_folds"] == 2 and 0 <= main_system["au_f1"] <= 1
    assert "smic uncoded" in main_system["notes"]
    points = table.loc["htnet-cpu", "notes"]
    assert "points5: dlib on the apex crop" in points and "template points (no face found; aligned crop) 3" in points
    markdown = (out / "results.md").read_text()
    assert f"Apex face crops in the data: yes ({n} of {n} samples)" in markdown


@pytest.mark.usefixtures("local_ray")  # the session's Ray (tests/conftest.py), not one of its own
def test_benchmark_command_end_to_end(tiny_composite: Path, annotations_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    small = "benchmark.models.cva-fpf-flow-au.kwargs"
    argv = [
        "benchmark", "megc2019", "--root", str(tiny_composite), "--models", "ststnet", "cva-fpf-flow-au",
        "--protocol", "oracle", "inner", "--epochs", "1", "--out", str(out),
        "--au-sheets", f"casme2={annotations_dir / 'CASME2-coding-20140508.xlsx'}",
        "--params", str(REPO / "params.yaml"), "--catalogue", str(REPO / "benchmarks" / "catalogue.yaml"),
        "-S", f"benchmark.work={tmp_path / 'work'}", "-S", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "-S", "benchmark.cpus=2", "-S", f"{small}.img_size=32", "-S", f"{small}.stage_channels=[8,8,8,8]",
        "-S", f"{small}.act_channels=8", "-S", f"{small}.fc_dim=16", "-S", f"{small}.fc2_dim=8",
    ]
    code = main(argv)
    assert code == 0
    table = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert set(zip(table["model"], table["protocol"], strict=True)) == {
        (m, p) for m in ("ststnet", "cva-fpf-flow-au") for p in ("inner", "oracle")}
    n = len(pd.read_csv(tiny_composite / CSV))
    assert (table["n_samples"] == n).all() and (table["n_subjects"] == 4).all()
    assert table[["uf1", "uar", "accuracy", "casme2_uf1", "smic_uf1"]].notna().all().all()
    assert table["samm_uf1"].isna().all() and (table["samm_n"] == 0).all()
    # Leak flags: every oracle row, and every row whose model reads annotated AUs.
    expected_leaky = (table["protocol"] == "oracle") | (table["model"] == "cva-fpf-flow-au")
    assert (table["leaky"].astype(bool) == expected_leaky).all()
    au_rows = table[table["model"] == "cva-fpf-flow-au"]
    assert (au_rows["au"] == "annotated").all()
    # Leak reasons as stored with each run's result.
    assert (au_rows["leak"].str.contains("annotated AUs as input")).all()
    assert (table.loc[table["protocol"] == "oracle", "leak"].str.contains("oracle epoch selection")).all()
    # Subject-bootstrap intervals of every score, overall and per dataset.
    for score in ("uf1", "uar", "accuracy", "casme2_uf1", "smic_uar"):
        assert ((table[f"{score}_ci_low"] <= table[score]) & (table[score] <= table[f"{score}_ci_high"])).all()
    assert au_rows["notes"].str.contains("FPF disabled").all() and au_rows["notes"].str.contains("smic uncoded").all()
    assert table["device"].eq("cpu").all() and (table["wall_s"] > 0).all() and (table["fold_s"] > 0).all()
    assert (table["coverage"] == f"{n}/{n}").all() and (table["split"] == "loso").all()
    # Committed results never name the machine's directories: tmp paths become placeholders.
    recorded = " ".join(table["command"]) + (out / "settings.json").read_text() + (out / "results.md").read_text()
    assert str(tmp_path) not in recorded
    inner = table[table["protocol"] == "inner"]
    assert inner["inner_val_uf1"].between(0, 1).all()
    markdown = (out / "results.md").read_text()
    assert markdown.index("## Honest protocols") < markdown.index("## Leaky rows")
    assert "0.8603 / 0.8475" in markdown  # the published HTNet row of the reproduction check
    assert (out / "results.png").stat().st_size > 10_000

    # Run again: every fold is found stored, so the invocation is short, but `fold_s` still reports the folds' own
    # training time (the rows' compute, not the resuming command's).
    driver_log, said = logging.getLogger("mer.pipelines.engine.driver"), []
    handler = logging.Handler()  # on the driver's logger: the CLI's logging setup replaces the root handlers
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    driver_log.addHandler(handler)
    try:
        assert main(argv) == 0
    finally:
        driver_log.removeHandler(handler)
    assert sum("evaluate: 4 of 4 folds found stored" in m for m in said) == 4  # said, not left to the speed
    again = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert again["fold_s"].tolist() == table["fold_s"].tolist()
    assert again[["uf1", "uar", "accuracy"]].equals(table[["uf1", "uar", "accuracy"]])
    # MLflow holds a parent run per model x protocol.
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmark-megc2019")
    parents = client.search_runs([experiment.experiment_id], "tags.`mer.kind` = 'parent'")
    assert len(parents) == 4


def test_portable_path_is_relative_beside_the_repository_and_a_placeholder_elsewhere(tmp_path: Path) -> None:
    assert portable_path(str(REPO.parent / "shared" / "data" / "x"), "<root>") == "../shared/data/x"
    assert portable_path(str(REPO / "results" / "megc2019"), "<out>") == "results/megc2019"
    assert not Path(portable_path(str(tmp_path / "data"), "<root>")).is_absolute()
    assert portable_path("sqlite:////nowhere/near/mlflow.db", "<local path>") in (
        "sqlite:///<local path>", f"sqlite:///{os.path.relpath('/nowhere/near/mlflow.db', REPO)}")
    assert portable_path("data/relative", "<root>") == "data/relative" and portable_path("3", "<x>") == "3"


def test_recorded_command_reads_path_arguments_from_the_working_directory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out bench` typed in a scratch folder is that folder's `bench`, not the repository's: recorded as the
    placeholder (outside the repository's parent), like the absolute paths given beside it."""
    from mer.pipelines.benchmark import command_line
    from mer.pipelines.cli import build_parser

    args = build_parser().parse_args(["benchmark", "megc2019", "--root", "composite", "--out", "bench",
                                    "-S", "benchmark.cpus=2"])
    monkeypatch.chdir(tmp_path)
    recorded = command_line(args)
    assert "--out '<out>'" in recorded and "--root '<megc2019 root>'" in recorded, recorded
    assert "benchmark.cpus=2" in recorded
    assert "--catalogue '<catalogue>'" in recorded  # that folder has its own (or no) benchmarks/catalogue.yaml
    monkeypatch.chdir(REPO)
    assert "--out bench" in command_line(args)  # from the repository root: repository-relative, as typed
    assert "--catalogue" not in command_line(args)  # the repository's catalogue, the default


def test_benchmark_settings_split_the_overrides_between_params_and_the_catalogue(tmp_path: Path) -> None:
    """`-S benchmark.*` sets the catalogue (benchmarks/catalogue.yaml), every other key params.yaml; the catalogue is
    not a run-time param (params.yaml has no `benchmark` section), and its bad keys are one line naming its file."""
    from mer.components.common import params_from_args
    from mer.pipelines.benchmark import catalogue_from_args
    from mer.pipelines.cli import build_parser

    def settings(*overrides: str) -> tuple:
        args = build_parser().parse_args(
            ["benchmark", "megc2019", "--root", "x", "--params", str(REPO / "params.yaml"), "--catalogue",
             str(REPO / "benchmarks" / "catalogue.yaml"), *[x for o in overrides for x in ("-S", o)]])
        return params_from_args(args), catalogue_from_args(args)

    params, cfg = settings("benchmark.cpus=2", "train.epochs=3")
    assert cfg.cpus == 2 and params.train.epochs == 3 and cfg.models == CATALOGUE.models
    assert "benchmark" not in params.model_dump()
    with pytest.raises(ConfigError, match=r"catalogue.yaml: benchmark.cpu: Extra inputs are not permitted \(did you "
                                          r"mean benchmark.cpus; got 2; set by the override benchmark.cpu=2\)"):
        settings("benchmark.cpu=2")
    old = tmp_path / "params.yaml"  # a params.yaml from before the catalogue moved out
    old.write_text((REPO / "params.yaml").read_text() + "benchmark: {cpus: 2}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: benchmark: Extra inputs are not permitted"):
        load_params(old)


def test_adapt_entry_switches_off_what_the_data_lacks() -> None:
    entry = BenchmarkModel(name="cva_fpf", config="flow_small", kwargs={"au_mode": "predicted"},
                           faces={"position": "fpf", "position_frames": ["apex224"]})
    bare = {"faces": False, "apex_crops": 0, "au_coded": {}, "per_dataset": {"smic": 3}}
    kwargs, shown, notes = adapt_entry("cva", entry, bare)
    assert kwargs == {"au_mode": "none"} and shown == {"au": "none"}
    assert any("FPF disabled: no apex face crops" in n for n in notes) and any("AUs disabled" in n for n in notes)
    partly = {**bare, "apex_crops": 2}
    assert any("apex face crops for only 2 of 3 samples" in n for n in adapt_entry("cva", entry, partly)[2])
    full = {"faces": True, "apex_crops": 2, "au_coded": {"casme2": 2}, "per_dataset": {"casme2": 2}}
    kwargs, shown, notes = adapt_entry("cva", entry, full)
    assert kwargs["position"] == "fpf" and shown == {"au": "predicted"} and not any("disabled" in n for n in notes)
    assert any("FPF on the apex face crops" in n for n in notes)


def test_capabilities_come_from_the_ingested_table_before_preprocessing() -> None:
    """Crops and AU coding are properties of the collection: read from the annotation table the loader wrote (an
    empty cache, or one preprocessed for other models, cannot hide them), so the `faces` variant's inputs are
    preprocessed on the first run."""
    table = pd.DataFrame({"dataset": ["casme2", "casme2", "smic"], "apex_path": ["a.jpg", "b.jpg", "c.jpg"],
                          "au_coded": [True, True, False]})
    caps = data_capabilities(table)
    assert caps == {"faces": True, "apex_crops": 3, "au_coded": {"casme2": 2},
                    "per_dataset": {"casme2": 2, "smic": 1}}
    assert data_capabilities(table.assign(apex_path=["a.jpg", "", ""]))["faces"] is False
    base = load_params(REPO / "params.yaml")
    entry = CATALOGUE.models["cva-fpf-flow-cpu"]
    kwargs = {"cva-fpf-flow-cpu": adapt_entry("cva-fpf-flow-cpu", entry, caps)[0]}
    inputs = with_models_inputs(base, CATALOGUE.models, ["cva-fpf-flow-cpu"], kwargs).preprocess
    assert "apex224" in inputs.modalities
    # the crops cached at the network's input size (resized once, not every batch); a model without faces: no change
    assert inputs.face_size == entry.face_size == entry.kwargs["img_size"]
    assert with_models_inputs(base, CATALOGUE.models, ["ststnet-cpu"]).preprocess.face_size == base.preprocess.face_size


def test_the_collection_is_preprocessed_for_every_benchmarked_model() -> None:
    """One preprocessing serves all models of the run: HTNet's 5 landmarks are computed beside STSTNet's flow map
    (the HTNet row of a run whose default model reads only flow28 + aus failed on a cache without points5)."""
    base = load_params(REPO / "params.yaml")
    assert base.preprocess.modalities == []
    assert with_models_inputs(base, CATALOGUE.models, ["ststnet-cpu"]).preprocess.modalities == ["flow28"]
    both = with_models_inputs(base, CATALOGUE.models, ["ststnet-cpu", "htnet-cpu", "cva-fpf-flow-au-cpu"])
    assert both.preprocess.modalities == ["flow28", "points5", "aus"]


def test_protocol_order_and_au_sheet_arguments(tmp_path: Path) -> None:
    assert order_protocols(["oracle", "fixed", "inner"], True) == ["oracle", "inner", "fixed"]
    assert order_protocols(["fixed", "inner", "fixed"], False) == ["fixed", "inner"]
    with pytest.raises(ConfigError, match="DATASET=PATH"):
        parse_au_sheets(["casme2"])
    with pytest.raises(DataError, match="missing.xlsx"):
        parse_au_sheets([f"casme2={tmp_path / 'missing.xlsx'}"])


def test_notes_name_the_rows_they_concern_unless_they_concern_all() -> None:
    """A per-row note (the `fixed` epoch count of one model) keeps its row in results.md; a note of every row does not
    repeat them."""
    table = pd.DataFrame({"label": ["A", "A", "B"], "protocol": ["fixed", "inner", "fixed"],
                          "notes": ["common; fixed epochs (11)", "common", "common; fixed epochs (16)"]})
    assert table_notes(table) == ["common", "fixed epochs (11) — A fixed", "fixed epochs (16) — B fixed"]


def test_results_md_marks_seed_ensembles_and_reads_tables_without_the_column() -> None:
    row = {"label": "A", "protocol": "inner", "leaky": False, "uf1": 0.7, "uar": 0.7, "accuracy": 0.7,
           "n_samples": 10, "n_subjects": 2, "epochs": 30, "selected_epoch_median": 12.0, "au": "none",
           "wall_s": 1.0, "fold_s": 1.0, "device": "cpu"}
    lines = markdown_table(pd.DataFrame([{**row, "ensemble": 3}, {**row, "ensemble": 1}])).splitlines()[2:]
    assert "30 (sel. 12), 3-seed ensemble" in lines[0] and "ensemble" not in lines[1]
    assert "ensemble" not in markdown_table(pd.DataFrame([row]))  # a results.csv written before the column


def _results(directory: Path, predictions: pd.DataFrame) -> None:
    from mer.model.training.results import ExperimentSummary, Results, write_results

    write_results(directory, Results(ExperimentSummary(experiment="x", protocol="inner", leaky=False,
                                                       class_names=["a", "b", "c"]), predictions, []))


def test_honest_rows_get_their_paired_difference_to_the_baseline(tmp_path: Path) -> None:
    """Each honest row's difference to the baseline row of its protocol, with interval, p-value and the verdict; a
    leaky row and the baseline itself get none; a row over other samples is said in its notes, not compared."""
    import numpy as np

    from mer.model.config import IntervalConfig
    from mer.pipelines.benchmark import baseline_differences

    rng = np.random.default_rng(0)
    subjects = np.repeat([f"casme2/s{i}" for i in range(20)], 8)
    label = rng.integers(0, 3, len(subjects))
    base = pd.DataFrame({"sample_id": [f"x{i}" for i in range(len(label))], "subject": subjects,
                         "dataset": "casme2", "label": label,
                         "pred": np.where(rng.random(len(label)) < 0.5, label, rng.integers(0, 3, len(label)))})
    runs = {"base": base, "good": base.assign(pred=np.where(rng.random(len(label)) < 0.9, label, base["pred"])),
            "same": base.assign(pred=np.where(rng.random(len(label)) < 0.5, label, rng.integers(0, 3, len(label)))),
            "leaky": base.assign(pred=label), "other": base.iloc[8:]}
    for name, predictions in runs.items():
        _results(tmp_path / name, predictions)
    table = pd.DataFrame({"model": list(runs), "label": [n.upper() for n in runs], "protocol": "inner",
                          "leaky": [False, False, False, True, False], "notes": ""})
    out = baseline_differences(table, lambda model, protocol: tmp_path / model, ["absent", "base"],
                               IntervalConfig(resamples=500)).set_index("model")
    assert out.loc["good", "baseline"] == "base" and out.loc["good", "diff_uf1_ci_low"] > 0
    assert out.loc["good", "diff_uf1_verdict"] == "better" and out.loc["good", "diff_uf1_p"] < 0.01
    assert out.loc["same", "diff_uf1_verdict"] == "not distinguishable"
    assert out[["diff_uf1"]].loc[["base", "leaky", "other"]].isna().all().all()
    assert "no difference to the baseline: not comparable: different samples" in out.loc["other", "notes"]
    lines = markdown_table(out.reset_index().assign(
        uf1=0.5, uar=0.5, accuracy=0.5, n_samples=1, n_subjects=1, epochs=1, selected_epoch_median=1, au="none",
        wall_s=1.0, fold_s=1.0, device="cpu")).splitlines()
    assert "Δ UF1 vs BASE [95% CI], p" in lines[0]
    assert "not distinguishable" in next(line for line in lines if line.startswith("| SAME"))


def test_results_md_gives_the_spread_over_seed_repeats_only_for_rows_that_have_them() -> None:
    row = {"label": "A", "protocol": "inner", "leaky": False, "uf1": 0.7, "uar": 0.7, "accuracy": 0.7,
           "n_samples": 10, "n_subjects": 2, "epochs": 30, "selected_epoch_median": 12.0, "au": "none",
           "wall_s": 1.0, "fold_s": 1.0, "device": "cpu", "notes": ""}
    spread = {"repeats": 3, "uf1_repeat_mean": 0.71, "uf1_repeat_sd": 0.02, "uar_repeat_mean": 0.69,
              "uar_repeat_sd": 0.03, "accuracy_repeat_mean": 0.72, "accuracy_repeat_sd": 0.01}
    lines = markdown_table(pd.DataFrame([{**row, **spread}, {**row, "repeats": 1}])).splitlines()
    assert "seeds: UF1 / UAR / acc mean ± sd (n)" in lines[0]
    assert "| 0.710 ± 0.020 / 0.690 ± 0.030 / 0.720 ± 0.010 (3) |" in lines[2] and "| – |" in lines[3]
    assert "seeds" not in markdown_table(pd.DataFrame([row]))  # single runs, or a table from before the column


# The committed recipe searches (benchmarks/recipes/<entry>.yaml), one per searched CPU entry of params.yaml.
RECIPES = sorted((REPO / "benchmarks" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_searches_score_inner_validation_only_and_match_their_entry(recipe: Path) -> None:
    """The committed search behind each searched CPU entry is valid, searches (num_samples > 0) under `inner` (trials
    scored on validation subjects, never a test fold), and trains the model its params.yaml entry names."""
    search = load_params(recipe)
    entry = CATALOGUE.models[recipe.stem]
    assert search.tune.num_samples > 0 and search.tune.search_space
    assert search.train.protocol == "inner"
    assert (search.model.name, search.model.config) == (entry.name, entry.config)


# What a recipe search may set differently from the benchmark run it chooses for: its split (subject_5fold instead of
# LOSO), where it runs, how batches are assembled (`device_data`: equal to the reference path within interpolation
# tolerance, tests/test_fold_batch.py) and the seed-ensemble size (each member trains exactly as the searched single
# model; K is decided afterwards by a design check). Everything else a trial trains with, from flip TTA to the weight
# average, must be what the benchmark trains with, or the search tunes another trainer than the one the recipe is used
# in.
SEARCH_ONLY_TRAIN_KEYS = {"split", "device", "amp", "device_data", "ensemble"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_search_trials_train_as_the_benchmark_run_does(recipe: Path) -> None:
    """Every training setting a search does not search equals the benchmark run's (params.yaml `train` under the
    entry's recipe): a search once ran without the flip TTA and weight average the benchmark evaluates with."""
    search = load_params(recipe)
    base = load_params(REPO / "params.yaml")
    entry = CATALOGUE.models[recipe.stem]
    run = run_params(base, CATALOGUE, recipe.stem, entry, entry.kwargs, "inner", None, "megc2019")
    searched = {key.split(".", 1)[1] for key in search.tune.search_space if key.startswith("train.")}
    differs = {key: (getattr(search.train, key), value) for key, value in run.train.model_dump().items()
               if key not in searched | SEARCH_ONLY_TRAIN_KEYS and getattr(search.train, key) != value}
    assert not differs, f"{recipe.name}: train settings (search, benchmark) differ: {differs}"
    # a search over face crops trains the entry's `faces` variant (what the benchmark runs where the data has crops)
    kwargs = {**entry.kwargs, **(entry.faces if "apex224" in search.preprocess.modalities else {})}
    fixed_kwargs = {key: value for key, value in kwargs.items()
                    if f"model.kwargs.{key}" not in search.tune.search_space}
    assert search.model.kwargs == fixed_kwargs, f"{recipe.name}: model kwargs differ from the entry's unsearched ones"


def test_a_runs_own_tables_do_not_mark_its_code_dirty(tmp_path: Path) -> None:
    """Each `mer benchmark` invocation of one run rewrites the tracked results/ tables; only a code change is dirty."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True, timeout=30)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    clean = git_commit(tmp_path)
    (tmp_path / "results" / "results.csv").write_text("b\n")
    assert git_commit(tmp_path) == clean and not clean.endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
