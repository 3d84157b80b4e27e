"""Seed repeats (tune.repeats) and the nested search (tune.nested) on the session's tiny synthetic set.

Repeats: independent runs with derived seeds whose fold tasks are in flight together (Ray's task table shows their
lifetimes overlap), mean and sd over them in summary.json and MLflow, stored folds reused by a re-run. Nested: every
LOSO fold's search sees its training subjects only, each fold is trained with its own choice, recorded on its fold run
and in summary.json. The parts without Ray (seeds, fold jobs, the searcher) are checked directly.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import pytest

from conftest import mlflow_client, runs_by_kind, tiny_data, tiny_params

LR_SPACE = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}


def test_repeat_seeds_are_derived_and_key_their_own_folds() -> None:
    """Repeat 0 is the single run; other repeats get seeds of their own (never an ensemble member's), so their folds
    are stored under other keys; a nested evaluation's fold trains with its own choice and carries its own leak
    verdict."""
    from mer.components.settings import parse_params
    from mer.model.errors import ConfigError
    from mer.model.training.folds import Fold
    from mer.model.training.repeats import repeat_seed, repeat_spread
    from mer.model.training.trainer import member_seed
    from mer.pipelines.engine.trial import REPEAT_KEY, TrialContext

    assert repeat_seed(7, 0) == 7 and len({repeat_seed(7, r) for r in range(5)}) == 5
    assert repeat_seed(7, 1) != member_seed(7, 1) and repeat_seed(7, 1) == repeat_seed(7, 1)
    spread = repeat_spread([{"uf1": 0.5, "uar": 0.4, "accuracy": 0.6}, {"uf1": 0.7, "uar": None, "accuracy": 0.6}],
                           [7, 8])
    assert spread["uf1_mean"] == pytest.approx(0.6) and spread["uf1_sd"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert spread["uar_mean"] == pytest.approx(0.4) and spread["uar_sd"] is None and spread["accuracy_sd"] == 0

    with pytest.raises(ConfigError, match="tune: nested: true needs a search"):
        parse_params({"tune": {"nested": True}})
    params = parse_params({"model": {"name": "cva_fpf", "config": "flow_small"}, "train": {"seed": 7}})
    folds = [Fold("a", ("s2", "s3"), ("s1",)), Fold("b", ("s1", "s3"), ("s2",))]
    ctx = TrialContext(phase="evaluate", params=params.model_dump(mode="json", by_alias=True), protocol="fixed",
                       folds=folds, cache_dir="", storage="", data_version="v", fold_cpus=1, fold_gpus=0,
                       max_retries=0, per_fold={"a": {"model.kwargs.au_mode": "annotated"},
                                                "b": {"model.kwargs.au_mode": "none"}})
    first, second = ctx.jobs({REPEAT_KEY: 0}), ctx.jobs({REPEAT_KEY: 1})
    assert [j.train["seed"] for j in first] == [7, 7] and {j.train["seed"] for j in second} == {repeat_seed(7, 1)}
    assert len({j.key for j in first + second}) == 4  # repeats never share a stored fold
    assert [j.leaky for j in first] == [True, False]  # each fold's verdict from the configuration that trains it
    assert [j.model["kwargs"]["au_mode"] for j in first] == ["annotated", "none"]


def test_nested_searcher_hands_out_trials_round_robin_and_survives_a_restore(tmp_path: Path) -> None:
    from ray import tune

    from mer.pipelines.engine.nested import NestedSearch, best_per_fold
    from mer.pipelines.engine.trial import OBJECTIVE, OUTER_KEY

    searcher = NestedSearch(["a", "b"], num_samples=2, seed=0)
    assert searcher.set_search_properties(OBJECTIVE, "max", {"train.lr": tune.loguniform(1e-4, 1e-2)})
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c[OUTER_KEY] for c in configs] == ["a", "b", "a", "b"]
    assert all(1e-4 <= c["train.lr"] <= 1e-2 for c in configs)
    assert searcher.suggest("t4") == NestedSearch.FINISHED
    searcher.on_trial_complete("t0", {OBJECTIVE: 0.5})
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = NestedSearch(["x"], num_samples=1, seed=1)
    restored.restore(str(path))
    assert restored.owner == searcher.owner and set(restored.searchers) == {"a", "b"}
    restored.on_trial_complete("t2", {OBJECTIVE: 0.7})  # reaches fold a's study
    assert len(restored.searchers["a"]._ot_study.trials) == 2

    class Result:  # what best_per_fold reads of a ray.tune.Result
        def __init__(self, outer: str, lr: float, score: float) -> None:
            self.config, self.metrics = {OUTER_KEY: outer, "train.lr": lr}, {OBJECTIVE: score}

    grid = [Result("a", 1e-3, 0.5), Result("b", 2e-3, 0.4), Result("a", 3e-3, 0.7), Result("b", 4e-3, 0.4)]
    assert best_per_fold(grid, ["train.lr"]) == {"a": {"chosen": {"train.lr": 3e-3}, "inner_score": 0.7},
                                                 "b": {"chosen": {"train.lr": 2e-3}, "inner_score": 0.4}}


@pytest.mark.slow
def test_seed_repeats_run_as_parallel_work_and_reuse_stored_folds(tiny_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from ray.util.state import list_tasks

    from mer.components.settings import load_params
    from mer.pipelines.engine.driver import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(tiny_params(tmp_path, tiny_data(tmp_path), **{"tune.repeats": 2, "tune.final_model": False,
                                                                     "train.epochs": 1}))
    start_ms = time.time() * 1000
    summary = run_tune(params)
    spread = summary.repeats
    assert spread["n"] == 2 and spread["seeds"][0] == params.train.seed != spread["seeds"][1]
    values = [r["uf1"] for r in spread["per_repeat"]]
    assert summary.metrics["uf1"] == pytest.approx(values[0])  # the single-run figures are repeat 0's
    assert spread["uf1_mean"] == pytest.approx(statistics.mean(values))
    assert spread["uf1_sd"] == pytest.approx(statistics.stdev(values))

    # Parallel work, not a loop of whole runs: each repeat's fold tasks were created before the other's last ended.
    tasks = [t for t in list_tasks(filters=[("func_or_class_name", "=", "run_folds")], detail=True, limit=10_000,
                                   raise_on_missing_output=False)
             if t.creation_time_ms and t.creation_time_ms >= start_ms]
    spans = {r: [(t.creation_time_ms, t.end_time_ms) for t in tasks if t.name.startswith(f"evaluate repeat {r}:")]
             for r in (0, 1)}
    assert len(spans[0]) == len(spans[1]) == 4, [t.name for t in tasks]
    assert all(end for span in spans.values() for _, end in span)
    assert min(c for c, _ in spans[1]) < max(e for _, e in spans[0])
    assert min(c for c, _ in spans[0]) < max(e for _, e in spans[1])

    runs = runs_by_kind(tmp_path)
    (parent,) = runs["parent"]
    assert "2 repeats" in parent.info.run_name
    assert parent.data.metrics["uf1_repeat_mean"] == pytest.approx(spread["uf1_mean"])
    assert parent.data.metrics["uf1_repeat_sd"] == pytest.approx(spread["uf1_sd"])
    assert parent.data.metrics["uf1"] == pytest.approx(values[0])
    trials = {r.data.tags["repeat"]: r for r in runs["trial"]}
    assert set(trials) == {"0", "1"} and trials["1"].data.metrics["uf1"] == pytest.approx(values[1])
    assert {r.data.params["train.seed"] for r in runs["fold"]} == {str(s) for s in spread["seeds"]}
    stored = {p: p.stat().st_mtime_ns for p in Path(params.tune.storage_path).glob("*/folds/*/result.json")}
    assert len(stored) == 8

    # The evaluate stage's outputs carry the spread beside the single run's figures: metrics.json (dvc metrics show)
    # and the HTML report.
    from mer.components.evaluate import write_metrics_and_report

    metrics = write_metrics_and_report(params)
    assert json.loads(Path(params.evaluate.metrics).read_text())["uf1_repeat_sd"] == pytest.approx(spread["uf1_sd"])
    assert metrics["repeats"] == 2 and metrics["uf1_repeat_mean"] == pytest.approx(spread["uf1_mean"])
    page = next(Path(params.evaluate.report).rglob("report.html")).read_text()
    assert "Seed repeats (2 runs)" in page and f"<td>{spread['uf1_mean']:.4f}</td>" in page

    # A third repeat (untracked, to save time): the first two repeats' folds are read back from storage (unchanged),
    # only the new one trains.
    caplog.set_level(logging.INFO, logger="mer.pipelines.engine.driver")
    more = run_tune(load_params(tiny_params(tmp_path, tiny_data(tmp_path), **{
        "tune.repeats": 3, "tune.final_model": False, "train.epochs": 1, "tracking.backend": "none"})))
    assert "evaluate: 8 of 12 folds found stored" in caplog.text
    assert more.repeats["seeds"][:2] == spread["seeds"]
    assert [r["uf1"] for r in more.repeats["per_repeat"][:2]] == pytest.approx(values)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in stored.items())
    assert len(list(Path(params.tune.storage_path).glob("*/folds/*/result.json"))) == 12


@pytest.mark.slow
def test_nested_search_chooses_per_fold_on_its_training_subjects_only(tiny_root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mer.components.settings import load_params
    from mer.pipelines.engine.driver import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(tiny_params(tmp_path, tiny_data(tmp_path), **{
        "tune.num_samples": 2, "tune.nested": True, "tune.search_folds": 2, "tune.search_space": LR_SPACE,
        "train.epochs": 1, "tune.final_model": True, "tune.max_concurrent_trials": 8}))
    summary = run_tune(params)
    subjects = sorted({s for f in json.loads((Path(params.tune.results) / "folds.json").read_text())
                       for s in f["test_subjects"]})
    assert summary.folds == 4 and sorted(summary.chosen_per_fold) == subjects
    assert summary.search["nested"] is True and summary.chosen == {} and summary.model_uri is None
    for fold, choice in summary.chosen_per_fold.items():
        assert set(choice) == {"chosen", "inner_score", "leaky"} and choice["leaky"] is False
        assert 1e-4 <= choice["chosen"]["train.lr"] <= 1e-2

    # Every search fold of an outer fold lies inside that fold's training subjects: its test subject never appears.
    inner = [json.loads(p.read_text()) for p in Path(params.tune.storage_path).glob("*/folds/*/result.json")]
    inner = [f for f in inner if "|" in f["fold"]]
    assert len(inner) >= 2 * len(subjects)  # 2 search folds per outer fold (trials with equal choices share them)
    for fold in inner:
        outer = fold["fold"].split("|")[0]
        assert outer not in fold["train_subjects"] + fold["val_subjects"] + fold["test_subjects"]
        assert fold["protocol"] == "inner" and fold["val_subjects"]

    runs = runs_by_kind(tmp_path)
    (parent,) = runs["parent"]
    assert "nested search" in parent.info.run_name
    search = [r for r in runs["trial"] if r.data.tags["phase"] == "search"]
    assert len(search) == 8 and sorted(r.data.tags["outer_fold"] for r in search) == sorted(subjects * 2)
    (evaluation,) = [r for r in runs["trial"] if r.data.tags["phase"] == "evaluate"]
    folds = [r for r in runs["fold"] if r.data.tags["mlflow.parentRunId"] == evaluation.info.run_id]
    assert len(folds) == 4
    for run in folds:
        choice = summary.chosen_per_fold[run.data.tags["fold"]]
        assert json.loads(run.data.tags["nested.chosen"]) == choice["chosen"]
        assert float(run.data.params["train.lr"]) == pytest.approx(choice["chosen"]["train.lr"])
        assert run.data.tags["leaky"] == "false"
    client, _ = mlflow_client(tmp_path)
    assert "nested_search.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
