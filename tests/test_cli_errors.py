"""User errors through the real `mer` CLI: exit code 2, no traceback, and ONE line on stderr that says what is
wrong and where (file, row, key or path).

The cases run the CLI's `main` in this process (the same parser, dispatch and error printing as the `mer` script);
the process itself (entry point, exit status, stderr) is checked by real `python -m mer.pipelines.cli` subprocesses for
a user error and for usage errors."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import CliResult, mer_process

REPO = Path(__file__).resolve().parents[1]


def error_lines(result: CliResult | subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error: " in line or line.startswith("Traceback")]


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A working directory holding the repository's params.yaml (every other input deliberately missing, but for
    `cache/index.csv`, an empty stand-in for a preprocessed cache)."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.csv").write_text("")
    (tmp_path / "empty.yaml").write_text("")
    return tmp_path


def _bad_params(project: Path, key: str, value: object) -> str:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    section, name = key.split(".")
    raw[section][name] = value
    (project / "bad.yaml").write_text(yaml.safe_dump(raw))
    return str(project / "bad.yaml")


def _casme2_sheet(project: Path) -> Path:
    """A CASME II coding sheet whose second data row (sheet line 3) has an unparseable onset."""
    root = project / "casme2"
    root.mkdir()
    rows = [["01", "EP02_01f", 46, 59, 86, "12", "happiness"], ["01", "EP03_02", "abc", 61, 80, "4", "disgust"]]
    pd.DataFrame(rows, columns=["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units",
                                "Estimated Emotion"]).to_excel(root / "coding.xlsx", index=False)
    return root


CASES = {
    # The rejected value, and the override that set it: the file says otherwise, so the line must say where.
    "params value out of range": (["synth", "-S", "synth.subjects=1"],
                                  "params.yaml: synth.subjects: Input should be greater than or equal to 2 (got 1; "
                                  "set by the override synth.subjects=1)"),
    "unknown params key": (["tune", "-S", "train.epoch=3"],
                           "train.epoch: Extra inputs are not permitted (did you mean train.epochs; got 3; set by the "
                           "override train.epoch=3)"),
    "two bad values": (["tune", "-S", "train.ema_decay=-0.1", "-S", "train.lr=-1"],
                       "train.lr: Input should be greater than 0 (got -1; set by the override train.lr=-1) "
                       "(and 1 more: train.ema_decay)"),
    # A platform section (components/settings.py) is validated like a library one; the tracker names are the registry's.
    "unknown tracker": (["register", "-S", "tracking.backend=wandb"],
                        "params.yaml: tracking.backend: Input should be 'mlflow' or 'none' (got wandb; set by the "
                        "override tracking.backend=wandb)"),
    "malformed override": (["evaluate", "-S", "train.epochs"], "override 'train.epochs': expected key=value"),
    "missing params file": (["ingest", "--params", "missing.yaml"], "missing.yaml: parameters file not found"),
    "missing data root": (["ingest", "-S", "data.source=casme2", "-S", "data.root=nowhere"],
                          "nowhere: data.root: directory not found"),
    "missing annotation table": (["preprocess", "-S", "data.ingested=nope.csv"], "nope.csv: annotation table not"),
    "missing AU sheet": (["ingest", "-S", "data.source=megc2019", "-S", "data.root=.",
                          "-S", "data.class_set=megc2019_3", "-S", "data.au_sheets={casme2: nonexist.xlsx}"],
                         "nonexist.xlsx: AU coding sheet not found (data.au_sheets.casme2)"),
    "no tune results for evaluate": (["evaluate"], "runs/results/summary.json: missing; run `mer tune` first"),
    "no tune results for register": (["register"], "runs/results/summary.json: missing; run `mer tune` first"),
    "no tune results for report": (["report"], "runs/results/summary.json: missing; run `mer tune` first"),
    "report flag misuse": (["report", "--experiment", "x"], "--experiment: only with --compare"),
    "missing model for predict": (["predict", "--model", "nope.pt", "clip"], "--model nope.pt: no such checkpoint"),
    "missing cache for tune": (["tune"], "data/preprocessed: no index.csv; run `mer preprocess` first"),
    # Checked before the cache is read (`cache/` holds only an index.csv) and before Ray or the tracker start.
    "unknown model for tune": (["tune", "-S", "model.name=nope", "-S", "preprocess.out=cache"],
                               "model.name: unknown model 'nope' (known: "),
    "unwritable preprocess.out": (["preprocess", "-S", "preprocess.out=params.yaml/cache"],
                                  "preprocess.out: params.yaml/cache: output directory is not writable"),
    "unwritable tune.results": (["tune", "-S", "tune.results=params.yaml/results"],
                                "tune.results: params.yaml/results: output directory is not writable"),
    # Validated when params.yaml is loaded, not inside each trial once Ray and the tracker run.
    "unknown search space key": (["tune", "-S", "tune.search_space={train.lrr: {type: uniform, low: 0.1, high: 1}}"],
                                 "tune.search_space.train.lrr: no such parameter"),
    "search space value out of range": (
        ["tune", "-S", "tune.search_space={train.epochs: {type: int, low: 0, high: 3}}"],
        "tune.search_space.train.epochs: value 0: Input should be greater than"),
    "search without a space": (["tune", "-S", "tune.num_samples=4"], "num_samples > 0 needs a non-empty search_space"),
    "no wait for a fold node": (["tune", "-S", "tune.fold_node_wait_s=0"],
                                "tune.fold_node_wait_s: Input should be greater than 0"),
    # Ranges that make no sense are refused at load, naming the key (before: 10**12 epochs ran without end, lr 1e30
    # trained to NaN, a margin of 2 face widths and a billion CPUs per fold were accepted).
    "endless epochs": (["tune", "-S", "train.epochs=1000000000000"],
                       "train.epochs: Input should be less than or equal to 10000 (got 1000000000000"),
    "absurd learning rate": (["tune", "-S", "train.lr=1e30"], "train.lr: Input should be less than or equal to 10"),
    "fraction above 1": (["preprocess", "-S", "preprocess.margin=2"],
                         "preprocess.margin: Input should be less than or equal to 1 (got 2"),
    "negative count": (["tune", "-S", "tune.max_retries=-1"], "tune.max_retries: Input should be greater than or "
                                                               "equal to 0"),
    "absurd resources": (["tune", "-S", "tune.fold_cpus=1e9"], "tune.fold_cpus: Input should be less than or equal"),
    # An empty file is refused, not read as "every default" (`{}` says that): it is usually a failed write.
    "empty params file": (["tune", "--params", "empty.yaml"], "empty.yaml: empty parameters file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_without_traceback(project: Path, case: str, mer: Callable[..., CliResult]) -> None:
    args, expected = CASES[case]
    result = mer(*args, cwd=project)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line.startswith(f"mer {args[0]}: error: ") and expected in line, line


def test_invalid_value_in_params_file_names_file_and_key(project: Path, mer: Callable[..., CliResult]) -> None:
    bad = _bad_params(project, "train.protocol", "honest")
    result = mer("evaluate", "--params", bad, cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert f"{bad}: train.protocol: Input should be 'fixed', 'inner' or 'oracle' (got honest)" in line
    assert "override" not in line  # the value came from the file


def test_unparseable_annotation_row_names_file_and_row(project: Path, mer: Callable[..., CliResult]) -> None:
    root = _casme2_sheet(project)
    result = mer("ingest", "-S", "data.source=casme2", "-S", f"data.root={root}", "-S",
                 f"data.annotation={root / 'coding.xlsx'}", cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "coding.xlsx" in line and "row 3" in line and "abc" in line, line


def test_unwritable_report_dir_fails_before_work(project: Path, mer: Callable[..., CliResult]) -> None:
    (project / "afile").write_text("not a directory")
    results = project / "results"
    results.mkdir()
    (results / "summary.json").write_text('{"experiment": "x"}')
    (results / "predictions.csv").write_text("sample_id,label,pred\n")
    result = mer("report", "-S", f"tune.results={results}", "--out", str(project / "afile" / "reports"), cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "evaluate.report" in line and "afile/reports" in line and "not writable" in line, line


def test_the_mer_process_exits_2_with_one_line(project: Path) -> None:
    args, expected = CASES["unknown model for tune"]
    result = mer_process(*args, cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line.startswith("mer tune: error: ") and expected in line, line


def test_unknown_subcommand_and_missing_argument_are_usage_errors(project: Path) -> None:
    result = mer_process("trian", cwd=project)
    assert result.returncode == 2 and "invalid choice: 'trian'" in result.stderr and "Traceback" not in result.stderr
    result = mer_process("predict", "clip", cwd=project)
    assert result.returncode == 2 and "--model" in result.stderr and "Traceback" not in result.stderr


def test_s3_storage_without_credentials_is_refused_before_anything_starts(project: Path, mer: Callable[..., CliResult],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):  # no ~/.aws either
        monkeypatch.setenv(key, str(project / "nowhere"))
    result = mer("tune", "-S", "tune.storage_path=s3://mer-bucket/tune", "-S", "preprocess.out=cache", cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "tune.storage_path: s3://mer-bucket/tune: no AWS credentials found" in line, line
    assert not (project / "mlflow.db").exists()  # nothing was tracked: checked before the tracker and Ray


def test_empty_mapping_is_every_default(project: Path) -> None:
    from mer.components.settings import Params, load_params

    (project / "defaults.yaml").write_text("{}\n")
    assert load_params(project / "defaults.yaml") == Params()


def test_every_numeric_setting_has_a_range() -> None:
    """Each int/float setting of params.yaml declares a lower and an upper bound (seeds: a lower one), so that a
    value that makes no sense is refused at load naming the key, not found out after hours of a run."""
    from annotated_types import Ge, Gt, Le, Lt
    from pydantic import BaseModel

    from mer.components.settings import Catalogue, Params

    def numeric(model: type[BaseModel], prefix: str = "") -> list[tuple[str, list]]:
        out = []
        for name, field in model.model_fields.items():
            key = f"{prefix}{field.alias or name}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += numeric(field.annotation, f"{key}.")
            elif field.annotation in (int, float):
                out.append((key, field.metadata))
        return out

    fields = numeric(Params) + numeric(Catalogue, "(catalogue) ")
    assert len(fields) > 50
    unbounded = [k for k, meta in fields if not any(isinstance(m, (Ge, Gt)) for m in meta)
                 or (not k.endswith("seed") and not any(isinstance(m, (Le, Lt)) for m in meta))]
    assert not unbounded, f"numeric settings without a range: {unbounded}"


def test_every_subcommand_describes_itself_and_mer_has_a_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`mer COMMAND --help` starts with what the command does (not only its usage line); `mer --version` prints the
    installed version."""
    from importlib import metadata

    from mer.pipelines.cli import build_parser, main

    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there
    assert {"synth", "ingest", "preprocess", "tune", "evaluate", "register", "report", "predict", "benchmark"} <= set(
        commands)
    for name, command in commands.items():
        assert command.description and len(command.description.split()) >= 5, name
        assert " ".join(command.description.split()[:8]) in " ".join(command.format_help().split()), name
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mer {metadata.version('mer-platform')}"
