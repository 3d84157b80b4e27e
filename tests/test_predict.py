"""`mer predict` and the pyfunc model: clip discovery, default key frames, the real CLI on real frames and a video,
MLflow model URIs, and `mlflow models serve` answering one request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import mer_process
from mer.components.settings import Params
from mer.model.config import PreprocessConfig
from mer.model.errors import SampleError
from mer.model.inference import example_arrays, input_batch, open_clip, predict_proba
from mer.model.models import create_model, save_checkpoint
from tests.servers import LOOPBACK, VENV_BIN, _spawn, free_port, stop, wait_until

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["negative", "positive", "surprise"]

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_mlflow_uris() -> Iterator[None]:
    """Tests here point MLflow's process-wide URIs at their own stores; later tests must not inherit them."""
    import mlflow

    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)


def _frames(directory: Path, names: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".txt"):
            (directory / name).write_text("not a frame")
        else:
            cv2.imwrite(str(directory / name), np.zeros((8, 8, 3), np.uint8))
    return directory


@pytest.mark.parametrize(("names", "template", "numbers"), [
    ([f"img{n}.jpg" for n in (46, 47, 9, 100)], "img{}.jpg", (9, 46, 47, 100)),
    ([f"{n:03d}.png" for n in range(1, 12)], "{:03d}.png", tuple(range(1, 12))),
    ([f"006_{n:05d}.jpg" for n in (10, 11)] + ["notes.txt"], "006_{:05d}.jpg", (10, 11)),
])
def test_folder_clip_keeps_the_dataset_numbering(tmp_path: Path, names: list[str], template: str,
                                                 numbers: tuple[int, ...]) -> None:
    clip = open_clip(_frames(tmp_path / "clip", names), tmp_path)
    assert (clip.template, clip.numbers, clip.source) == (template, numbers, "folder")
    assert clip.frame(numbers[0]).is_file()


@pytest.mark.parametrize(("names", "message"), [
    ([], "no image frames"),
    (["a1.jpg", "b2.jpg"], "more than one name pattern"),
    (["1.png", "02.png", "003.png"], "zero-padded to different widths"),
    (["face.png"], "has no frame number"),
])
def test_unusable_folders_fail_naming_the_clip(tmp_path: Path, names: list[str], message: str) -> None:
    with pytest.raises(SampleError, match=message) as err:
        open_clip(_frames(tmp_path / "myclip", names), tmp_path)
    assert err.value.sample_id == "myclip"


def _write_video(frames: list[Path], path: Path) -> Path:
    first = cv2.imread(str(frames[0]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (first.shape[1], first.shape[0]))
    for frame in frames:
        writer.write(cv2.imread(str(frame)))
    writer.release()
    return path


def _checkpoint(path: Path, name: str = "htnet") -> Path:
    model = create_model(name, "small", num_classes=len(CLASSES))
    meta = {"class_names": CLASSES, "preprocess": PreprocessConfig().model_dump(mode="json", by_alias=True)}
    return save_checkpoint(model, path, meta)


def test_predict_cli_on_real_frames_and_video(tmp_path: Path, casme2_clip_dir: Path) -> None:
    """Folder and lossless video of the same real frames give the same answer; failing clips are reported by name
    and counted while the others complete; default key frames are reported."""
    frames = sorted(casme2_clip_dir.glob("*.jpg"))
    video = _write_video(frames, tmp_path / "clip.avi")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 64)
    checkpoint = _checkpoint(tmp_path / "model.pt")
    result = mer_process("predict", "--model", str(checkpoint), "--json", "--params", str(REPO / "params.yaml"),
                  str(casme2_clip_dir), str(video), str(tmp_path / "empty"), str(tmp_path / "broken.mp4"),
                  cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    out = {r["clip"]: r for r in json.loads(result.stdout)}
    folder, decoded = out[casme2_clip_dir.name], out["clip.avi"]
    for r in (folder, decoded):
        assert r["status"] == "ok"
        assert (r["onset"], r["offset"]) == (1, 10) and 1 < r["apex"] <= 10
        assert r["key_frames"] == {"onset": "first frame", "offset": "last frame",
                                   "apex": "max flow magnitude from onset"}
        assert set(r["probabilities"]) == set(CLASSES)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert decoded["apex"] == folder["apex"]
    for name in CLASSES:
        assert decoded["probabilities"][name] == pytest.approx(folder["probabilities"][name], abs=1e-3)
    assert out["empty"]["status"] == "failed" and "no image frames" in out["empty"]["error"]
    assert out["broken.mp4"]["status"] == "failed" and "not a video OpenCV can decode" in out["broken.mp4"]["error"]
    assert "sample empty:" in result.stderr and "2 ok, 2 failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_given_key_frames_are_used_and_checked(casme2_clip_dir: Path, tmp_path: Path) -> None:
    from mer.components.predict import predict_clips
    from mer.components.tracking.pyfunc import load_for_inference

    loaded = load_for_inference(str(_checkpoint(tmp_path / "model.pt")), Params())
    [ok] = predict_clips(loaded, [str(casme2_clip_dir)], onset=2, apex=6)
    assert (ok["onset"], ok["apex"], ok["offset"]) == (2, 6, 10)
    assert ok["key_frames"]["apex"] == "given" and ok["key_frames"]["onset"] == "given"
    [bad] = predict_clips(loaded, [str(casme2_clip_dir)], onset=1, apex=42)
    assert bad["status"] == "failed" and "--apex 42: no such frame" in bad["error"]


def fresh_environment(requirements: Path, where: Path) -> Path:
    """A new virtual environment holding `requirements` and nothing else (no checkout of this project), built by uv
    from its local cache only (`--offline`: warm after `make install`); returns its bin folder."""
    import time

    start = time.monotonic()
    uv = [str(VENV_BIN / "uv"), "--offline", "--quiet"]
    subprocess.run([*uv, "venv", "--python", sys.executable, str(where)], check=True, timeout=120)
    subprocess.run([*uv, "pip", "install", "--python", str(where / "bin" / "python"), "-r", str(requirements)],
                   check=True, timeout=600)
    logging.getLogger(__name__).info("fresh environment from %s in %.1f s", requirements.name, time.monotonic() - start)
    return where / "bin"


@pytest.mark.slow
def test_pyfunc_registry_uris_and_mlflow_serve(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """log_pyfunc_model -> registered version; models:/ and runs:/ URIs load it for `mer predict`; `mlflow models
    serve`, run from a fresh environment built from the logged model's requirements.txt alone (not this project's
    venv, nor its checkout), answers an {"inputs": ...} request with the same probabilities as the model itself."""
    import mlflow

    from mer.components.tracking.pyfunc import load_for_inference, log_pyfunc_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("predict-test")
    model = create_model("htnet", "small", num_classes=3).eval()
    with mlflow.start_run() as run, caplog.at_level(logging.WARNING):
        info = log_pyfunc_model(model, CLASSES, PreprocessConfig(), name="model", registered_model_name="mer-model")
    assert not [r for r in caplog.records if "pickle" in r.getMessage().lower()]  # models from code, no pickle
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded")))
    assert (local / "code" / "mer" / "model" / "models" / "__init__.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and not any("mer" in r for r in requirements)
    arrays = {k: np.random.default_rng(0).random((2, *v.shape)).astype(np.float32)
              for k, v in example_arrays(model.inputs, PreprocessConfig()).items()}
    expected = predict_proba(model, input_batch(arrays, model.inputs, batched=True))

    params = Params.model_validate({"tracking": {"uri": uri}})
    for model_uri in ("models:/mer-model/1", f"runs:/{run.info.run_id}/model", info.model_uri):
        loaded = load_for_inference(model_uri, params)
        assert loaded.class_names == CLASSES and loaded.source == "mlflow pyfunc"
        np.testing.assert_allclose(predict_proba(loaded.model, input_batch(arrays, model.inputs, batched=True)),
                                   expected, atol=1e-6)

    fresh = fresh_environment(local / "requirements.txt", tmp_path / "fresh-env")
    away = tmp_path / "elsewhere"  # a working directory outside the checkout: nothing of the project on sys.path
    away.mkdir()
    probe = subprocess.run([str(fresh / "python"), "-c", "import mer.model"], cwd=away, capture_output=True,
                           timeout=60)
    assert probe.returncode != 0, "the fresh environment must not see this project"
    port = free_port()
    log = tmp_path / "serve.log"
    # mlflow starts `uvicorn` by name: the fresh environment's bin first on PATH.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "MLFLOW_TRACKING_URI": uri,
           "OMP_NUM_THREADS": "1", "PATH": f"{fresh}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = _spawn([str(fresh / "mlflow"), "models", "serve", "-m", "models:/mer-model/1", "-h", LOOPBACK,
                   "-p", str(port), "--env-manager", "local", "-w", "1"], log, env=env, cwd=away)
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200, 240,
                   "mlflow models serve", proc, log)
        body = json.dumps({"inputs": {k: v.tolist() for k, v in arrays.items()}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
            answer = json.loads(response.read())
    finally:
        stop(proc)
    rows = answer["predictions"]
    assert [list(r) for r in rows] == [CLASSES, CLASSES]
    np.testing.assert_allclose([[r[c] for c in CLASSES] for r in rows], expected, atol=1e-5)


def test_unknown_model_uri_is_one_clear_error(tmp_path: Path) -> None:
    from mer.components.tracking.pyfunc import load_for_inference
    from mer.model.errors import ConfigError

    with pytest.raises(ConfigError, match="no such checkpoint file"):
        load_for_inference(str(tmp_path / "nope.pt"), Params())


def test_plain_pytorch_model_takes_names_and_preprocessing_from_its_run(tmp_path: Path) -> None:
    """A plain `mlflow.pytorch` model (what the LOSO driver logged before it logged the pyfunc): class names and
    preprocessing come from the run's params."""
    import mlflow
    from mer.components.tracking import run_params
    from mer.components.tracking.mlflow_tracker import MlflowTracker
    from mer.components.tracking.pyfunc import load_for_inference

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pytorch-flavour")  # the active experiment is process-wide: never inherit another test's
    logged = Params.model_validate({"data": {"class_set": "casme2_5"}, "preprocess": {"seq_frames": 6},
                                    "tracking": {"uri": uri}})
    model = create_model("htnet", "small", num_classes=5).eval()
    with mlflow.start_run() as run:
        MlflowTracker(logged.tracking, "test", "unknown").log_params(run.info.run_id, run_params(logged))
        mlflow.set_tag("leaky", "true")
        mlflow.pytorch.log_model(model, name="final_model", serialization_format="pickle")
    loaded = load_for_inference(f"runs:/{run.info.run_id}/final_model", Params())
    assert loaded.source == "mlflow pytorch" and loaded.leaky
    assert loaded.class_names == ["happiness", "surprise", "disgust", "repression", "others"]
    assert loaded.preprocess == logged.preprocess


def test_champion_alias_follows_honest_models_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a leaky model adds a version but leaves the `champion` alias where it was (on an honest one)."""
    import mlflow

    from mer.components.settings import TrackingConfig
    from mer.components.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # another test's mlflow.set_tracking_uri sets it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(TrackingConfig(uri=uri, experiment="alias-test"), "test", "unknown")
    tracker.check()
    model = create_model("ststnet", "small", num_classes=3).eval()
    versions = []
    for honest in (True, False):
        run, _ = tracker.open_run(f"run-{honest}", "run", {})
        model_uri = tracker.log_model(run, model, CLASSES, PreprocessConfig(), leaky=not honest)
        versions.append(tracker.add_model_version(model_uri, run, "alias-model", {"leaky": str(not honest)}, honest))
        tracker.end_run(run)
    assert [(v.version, v.champion) for v in versions] == [(1, True), (2, False)]
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("alias-model", "champion").version) == "1"



# ------------------------------------------------------------------------------------ damaged models (issue 30)


def _flip_weight_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the largest tensor stored in a torch zip checkpoint (what a bad disk
    sector or a careless edit does; torch's reader checks no CRC)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = member.header_offset
    name_len, extra_len = int.from_bytes(data[header + 26:header + 28], "little"), int.from_bytes(
        data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len + member.file_size // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def _model_dir(tmp_path: Path) -> Path:
    """An MLflow model directory of this platform's pyfunc (what downloading a logged model's artifacts gives; its
    code is the served model's, the library is this checkout's)."""
    import mlflow

    from mer.components.tracking.pyfunc import CHECKPOINT_ARTIFACT, INFO_ARTIFACT, SERVED_MODEL_CODE, model_info

    work = tmp_path / "parts"
    checkpoint = _checkpoint(work / "model.pt")
    info = work / "mer_model.json"
    info.write_text(json.dumps(model_info(CLASSES, PreprocessConfig(), False), indent=2))
    # The served model's code as log_pyfunc_model logs it (models from code; mer_model is importable here).
    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=str(SERVED_MODEL_CODE), pip_requirements=[],
                             artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), INFO_ARTIFACT: str(info)})
    return tmp_path / "model"


def test_damaged_models_are_one_line_naming_the_file(tmp_path: Path, mer) -> None:  # noqa: ANN001
    """Before: 64 flipped bytes changed the prediction and exited 0; NaN weights predicted a class from NaN
    probabilities; an edited class count and a truncated mer_model.json were tracebacks. Now each is exit 2 with
    one line naming the file, and no prediction."""
    import torch as _torch

    (tmp_path / "clip").mkdir()
    cases = {}
    flipped = _checkpoint(tmp_path / "flipped.pt")
    _flip_weight_bytes(flipped)
    cases["flipped"] = (flipped, "flipped.pt: content does not match the digest recorded when it was written")

    model = create_model("htnet", "small", num_classes=len(CLASSES))
    with _torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    nan = save_checkpoint(model, tmp_path / "nan.pt", {"class_names": CLASSES})  # a valid digest over NaN weights
    cases["nan"] = (nan, "nan.pt: weight .* has NaN/inf values")

    blob = _torch.load(_checkpoint(tmp_path / "classes.pt"), weights_only=True)
    _torch.save({**blob, "num_classes": 5}, tmp_path / "classes.pt")
    cases["class count"] = (tmp_path / "classes.pt", "classes.pt: content does not match the digest")
    del blob["digest"]  # a checkpoint from before digests: the class count is still checked against the weights
    _torch.save({**blob, "num_classes": 5}, tmp_path / "old.pt")
    cases["class count, no digest"] = (tmp_path / "old.pt", r"old.pt: weights do not fit the htnet model it "
                                                             r"describes \(5 classes\)")

    directory = _model_dir(tmp_path / "mlflow")
    info = directory / "artifacts" / "mer_model.json"
    info.write_text(info.read_text()[:40])
    cases["truncated mer_model.json"] = (directory, "artifacts/mer_model.json: model info is not valid JSON")

    import re

    for case, (path, expected) in cases.items():
        result = mer("predict", "--model", str(path), "--params", str(REPO / "params.yaml"), str(tmp_path / "clip"),
                     cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (case, result.stderr)
        [line] = [x for x in result.stderr.splitlines() if ": error: " in x]
        assert re.search(expected, line), (case, line)


def test_non_finite_outputs_are_no_prediction(tmp_path: Path) -> None:
    """Finite weights, an input holding inf: the outputs are NaN, and argmax would still have named a class."""
    from mer.model.errors import NonFiniteError

    model = create_model("htnet", "small", num_classes=len(CLASSES)).eval()
    arrays = {k: v[None] for k, v in example_arrays(model.inputs, PreprocessConfig()).items()}
    arrays = {k: np.repeat(v, 2, axis=0).astype(np.float32) for k, v in arrays.items()}
    first = model.inputs[0]
    arrays[first][1] = np.inf
    with pytest.raises(NonFiniteError, match=r"model output has NaN/inf values for 1 of 2 input\(s\) \(first: #1\)"):
        predict_proba(model, input_batch(arrays, model.inputs, batched=True))
    assert np.isfinite(predict_proba(model, input_batch({k: v[:1] for k, v in arrays.items()}, model.inputs,
                                                        batched=True))).all()


def test_a_truncated_video_or_a_mixed_folder_is_refused_naming_the_clip(tmp_path: Path) -> None:
    """Before: a truncated AVI decoded 14 of its 24 frames and the clip was predicted "ok"; a folder with one frame
    carrying an EXIF orientation tag was decoded with that frame rotated. Both are now a SampleError naming the
    clip (mer predict reports it failed and goes on with the others)."""
    from PIL import Image

    from mer.model.inference import default_key_frames

    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(tmp_path / "whole.avi"), cv2.VideoWriter_fourcc(*"FFV1"), 30, (64, 48))
    for _ in range(24):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = (tmp_path / "whole.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.6)])
    assert open_clip(tmp_path / "whole.avi", tmp_path / "w1").numbers == tuple(range(1, 25))
    with pytest.raises(SampleError, match=r"cut.avi: the decoder stopped after \d+ of the 24 frames the video "
                                          r"declares \(truncated or corrupt file\)") as err:
        open_clip(tmp_path / "cut.avi", tmp_path / "w2")
    assert err.value.sample_id == "cut.avi" and err.value.reason == "truncated video"

    folder = _frames(tmp_path / "mixed", [f"img{n}.jpg" for n in range(1, 5)])
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "img3.jpg", exif=exif)
    with pytest.raises(SampleError, match=r"^sample mixed: frames decode differently inside the clip: .*img3.jpg has "
                                          r"EXIF orientation 8, onset frame .*img1.jpg has 1"):
        default_key_frames(open_clip(folder, tmp_path), PreprocessConfig())
