"""The four real-world inputs of ../shared/cases (see its README.md), each run as a user would: `ingest` then
`preprocess` with the demo model (reads flow28 + AU targets). Every case must end with the sample excluded, a
one-line reason naming the file or row, the counts in the ingest summary or the preprocessing manifest, and the good
samples beside it complete. Skipped cleanly when ../shared is absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mer.pipelines.cli import main
from mer.components.ingest import ingest, output_paths
from mer.components.preprocess import preprocess
from mer.components.settings import Params, parse_params

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the session (tests/conftest.py)

FAST_FLOW = {"size": 112, "nscales": 3, "warps": 3, "inner_iterations": 10, "outer_iterations": 3}


def _params(case: Path, tmp_path: Path, source: str, class_set: str, **preprocess: Any) -> Params:
    return parse_params({
        "data": {"source": source, "root": str(case), "class_set": class_set,
                 "ingested": str(tmp_path / "ingested" / "annotations.csv")},
        "preprocess": {"out": str(tmp_path / "preprocessed"), "num_workers": 2, "flow": FAST_FLOW, **preprocess},
        "model": {"name": "cva_fpf", "config": "flow_small"},
    })


def _run(params: Params) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """(ingest summary, ingest exclusions, preprocessing manifest, index.csv by sample id)."""
    ingest(params)
    paths = output_paths(params)
    summary = json.loads(paths["summary"].read_text())
    exclusions = pd.read_csv(paths["exclusions"], keep_default_na=False)
    manifest = preprocess(params)
    index = pd.read_csv(Path(params.preprocess.out) / "index.csv", dtype=str, keep_default_na=False)
    return summary, exclusions, manifest, index.set_index("sample_id")


def test_onset_equals_apex(cases_dir: Path, tmp_path: Path) -> None:
    """casme3: the apex ON the onset frame is excluded at ingest (its flow would be exactly zero); the row with
    Offset 0 is kept for the flow map (a CAS(ME)^3 recording's last frame is not its offset) and refused only where a
    sequence is read."""
    case = cases_dir / "onset-equals-apex"
    params = _params(case, tmp_path, "casme3", "casme3_7")
    summary, exclusions, manifest, index = _run(params)
    assert (summary["loaded"], summary["ingested"]) == (3, 2)
    assert summary["excluded"] == {"apex equals onset (zero motion)": 1}
    assert summary["warnings"] == {"offset not annotated": 1}
    row = exclusions.iloc[0]
    assert (row["sample_id"], row["source_row"], row["detail"]) == ("casme3/spNO.1/a", 2, "onset 1, apex 1")
    assert row["source_file"] == str(case / "casme3_table.xlsx")
    assert (manifest["counts"]["ok"], manifest["counts"]["failed"]) == (2, 0)
    assert index.loc["casme3/spNO.1/a#2", "modalities"] == "flow28+aus"

    sequence = preprocess(params.model_copy(update={"preprocess": params.preprocess.model_copy(
        update={"modalities": ["flow28", "frames128"], "seq_frames": 4, "seq_size": 64})}))
    assert sequence["counts"]["excluded"] == {"offset not annotated": 1}
    assert sequence["failures"] == [{
        "sample_id": "casme3/spNO.1/a#2", "reason": "offset not annotated",
        "error": "sample casme3/spNO.1/a#2: offset not annotated and the recording holds several samples: no sequence"}]


def test_grey_flow_maps(cases_dir: Path, tmp_path: Path) -> None:
    """megc2019: grey single-channel maps are refused naming the PNG (a 224 px map too); the colour maps are kept."""
    case = cases_dir / "grey-flow-maps"
    summary, _, manifest, index = _run(_params(case, tmp_path, "megc2019", "megc2019_3"))
    assert (summary["loaded"], summary["ingested"], summary["excluded"]) == (6, 6, {})
    counts = manifest["counts"]
    assert (counts["total"], counts["ok"], counts["failed"]) == (6, 2, 4)
    assert counts["excluded"] == {"grey flow map": 3, "flow map size": 1}
    maps = case / "datasets" / "STSNet_whole_norm_u_v_os"
    for clip in ("sub01/EP19_05f", "sub02/EP01_11f", "sub02/EP02_04f"):
        sid = f"casme2/{clip}"
        png = maps / f"{clip.replace('/', '_')} .png"
        assert index.loc[sid, "error"] == f"sample {sid}: grey flow map {png}: one channel, not u, v and strain"
        assert index.loc[sid, "source_row"] in {"3", "4", "5"}
    assert index.loc["casme2/sub01/EP02_01f", "error"].endswith("sub01_EP02_01f .png is 224x224, expected 28x28")
    assert index.loc[["smic/s01/s01_ne_01", "smic/s01/s01_ne_02"], "status"].tolist() == ["ok", "ok"]


def test_frame_size_jump(cases_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """casme2: raw and cropped frames mixed in one clip (sizes change at frame 6) are refused naming img6.jpg; the
    clean clip is kept. Under data.strict the same is one line with exit code 2, the clean clip's entry kept."""
    case = cases_dir / "frame-size-jump"
    params = _params(case, tmp_path, "casme2", "casme2_5")
    summary, _, manifest, index = _run(params)
    assert (summary["loaded"], summary["ingested"], summary["excluded"]) == (2, 2, {})
    assert (manifest["counts"]["ok"], manifest["counts"]["excluded"]) == (1, {"frame size changes": 1})
    frames = case / "sub02" / "EP03_02"
    assert index.loc["casme2/sub02/EP03_02", "error"] == (
        f"sample casme2/sub02/EP03_02: frame size changes inside the clip: {frames / 'img6.jpg'} is 231x282, "
        f"onset frame {frames / 'img1.jpg'} is 280x340")
    assert index.loc["casme2/sub01/EP02_01f", "status"] == "ok"

    params_file = tmp_path / "params.yaml"
    params_file.write_text(params.model_dump_json(by_alias=True))  # JSON is YAML
    assert main(["preprocess", "--params", str(params_file), "-S", "data.strict=true"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert errors == [f"mer preprocess: error: {tmp_path / 'preprocessed' / 'index.csv'}: data.strict: 1 samples "
                      f"excluded; first: {index.loc['casme2/sub02/EP03_02', 'error']}"]
    assert (tmp_path / "preprocessed" / "samples" / "casme2__sub01__EP02_01f" / "flow28.npz").is_file()


def test_duplicate_rows(cases_dir: Path, tmp_path: Path) -> None:
    """casme2: a hand-merged sheet listing each clip twice (`01`/`1`, `sub02`/`02`): one sample per clip, the
    repeats excluded naming both rows."""
    case = cases_dir / "duplicate-rows"
    summary, exclusions, manifest, index = _run(_params(case, tmp_path, "casme2", "casme2_5"))
    assert (summary["loaded"], summary["ingested"], summary["excluded"]) == (4, 2, {"duplicate row": 2})
    assert exclusions[["sample_id", "source_row", "detail"]].values.tolist() == [
        ["casme2/sub01/EP02_01f#2", 5, "the same sample as row 2 (casme2/sub01/EP02_01f); this is row 5"],
        ["casme2/sub02/EP03_02#2", 6, "the same sample as row 3 (casme2/sub02/EP03_02); this is row 6"]]
    assert sorted(index.index) == ["casme2/sub01/EP02_01f", "casme2/sub02/EP03_02"]
    assert (manifest["counts"]["total"], manifest["counts"]["ok"]) == (2, 2)
