"""The platform's model as an MLflow pyfunc: preprocessed cache arrays in, class probabilities out.

Why a pyfunc over the project checkpoint rather than the plain `mlflow.pytorch` flavour: our models take a batch DICT
(`flow28`, `points5`, `onset224`, ...), which the pytorch flavour's generic predict cannot build, and the class names
and the preprocessing parameters the model was trained with must travel with the weights (a served or downloaded
model is useless without them). So the logged model holds

* `checkpoint`: `save_checkpoint` output (rebuilds the network without params.yaml),
* `info`: JSON with `class_names`, `preprocess` (the PreprocessConfig used for training) and `leaky`,

and its signature names one float32 tensor per model input, batched, in the cache layout (docs/architecture.md; pixel
arrays such as `apex224` keep their 0-255 values): a request to `mlflow models serve` is
`{"inputs": {"flow28": [[...]], "points5": [[...]]}}` and the answer is one row of class probabilities per sample,
columns = class names.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info, infer_signature

from components.tracking.base import check_tracking_server, redact, tracking_uri
from mer_model.config import Params, PreprocessConfig, set_dotted
from mer_model.data.labels import get_class_set
from mer_model.errors import ConfigError, DataError
from mer_model.io import read_json
from mer_model.inference import example_arrays, input_batch, predict_proba
from mer_model.models import load_checkpoint, save_checkpoint
from mer_model.training.protocols import reads_annotated_aus

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
INFO_ARTIFACT = "info"
# Installed distributions the served model needs besides this repository's packages (recorded with their versions).
REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pandas", "opencv-contrib-python-headless", "dlib",
                "face-recognition-models", "pydantic", "pyyaml", "scikit-learn", "mlflow")


class MerPyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint and its info; `predict` maps a dict of batched cache arrays to class probabilities."""

    # predict's input is a dict of tensors, which MLflow's type-hint schemas cannot express; the logged signature
    # (TensorSpecs per input) validates requests instead.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        info = read_json(context.artifacts[INFO_ARTIFACT], "model info")
        self.model = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.class_names: list[str] = _class_names(info.get("class_names"), self.model,
                                                   context.artifacts[INFO_ARTIFACT])
        self.preprocess = PreprocessConfig.model_validate(info["preprocess"])
        self.leaky = bool(info.get("leaky", False))

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ANN001
        """`model_input`: {input name: array (B, ...)}, what a `{"inputs": {...}}` request becomes. (Left unannotated
        on purpose: MLflow reads predict's type hint as a schema and supports no dict-of-tensors hint.)"""
        if not isinstance(model_input, Mapping):
            raise DataError(f"model input must map input names ({', '.join(self.model.inputs)}) to arrays, "
                            f"got {type(model_input).__name__}")
        batch = input_batch(model_input, self.model.inputs, batched=True)
        return pd.DataFrame(predict_proba(self.model, batch), columns=self.class_names)


def _class_names(names: Any, model: Any, source: str) -> list[str]:
    """The model's class names, one per output class; DataError naming `source` when they do not fit the model."""
    if not isinstance(names, list) or len(names) != model.num_classes:
        count = len(names) if isinstance(names, list) else "no list of"
        raise DataError(f"{count} class names for a model with {model.num_classes} classes", file=source)
    return [str(n) for n in names]


def _requirements() -> list[str]:
    found = []
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def model_info(class_names: Sequence[str], preprocess: PreprocessConfig, leaky: bool) -> dict[str, Any]:
    return {"class_names": list(class_names), "preprocess": preprocess.model_dump(mode="json", by_alias=True),
            "leaky": leaky}


def log_pyfunc_model(model: Any, class_names: Sequence[str], preprocess: PreprocessConfig, *, name: str = "model",
                     leaky: bool = False, registered_model_name: str | None = None) -> Any:
    """Log `model` (built by `create_model`) as a pyfunc into the ACTIVE MLflow run; returns mlflow's ModelInfo
    (`.model_uri` loads it; with `registered_model_name` it is also registered as a new version). The signature and
    the input example are the model's inputs in the cache layout (mer_model.batch_keys), one sample.

    `leaky`: the results that chose this model used test labels (oracle protocol) or a model input that encodes them
    (annotated AUs); recorded so that a served prediction can be traced back to it."""
    leaky = leaky or reads_annotated_aus(model)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(model, Path(tmp) / "model.pt", {"class_names": list(class_names)})
        info_path = Path(tmp) / "mer_model.json"
        info_path.write_text(json.dumps(model_info(class_names, preprocess, leaky), indent=2) + "\n")
        example = {k: v[None].astype(np.float32) for k, v in example_arrays(model.inputs, preprocess).items()}
        probabilities = pd.DataFrame(np.full((1, len(class_names)), 1.0 / len(class_names), dtype=np.float32),
                                     columns=list(class_names))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=MerPyfuncModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), INFO_ARTIFACT: str(info_path)},
            signature=infer_signature(example, probabilities),
            input_example=example,
            pip_requirements=_requirements(),
            registered_model_name=registered_model_name,
        )


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for `mer predict`: the network (eval mode), its class names and its training preprocessing."""

    model: Any
    class_names: list[str]
    preprocess: PreprocessConfig
    leaky: bool
    source: str  # what was loaded, for the log: "checkpoint", "mlflow pyfunc", "mlflow pytorch"


_MLFLOW_SCHEMES = ("models:/", "runs:/", "file:", "s3://", "gs://", "wasbs://", "mlflow-artifacts:", "http://",
                   "https://")


def load_for_inference(uri: str, params: Params) -> LoadedModel:
    """`uri`: a checkpoint file (`save_checkpoint`), an MLflow model directory, or an MLflow URI (`models:/NAME/1`,
    `runs:/RUN_ID/model`, ...; resolved against the configured tracking server). Anything else is a ConfigError."""
    path = Path(uri).expanduser()
    if path.is_file():
        return _from_checkpoint(path, params)
    if not (uri.startswith(_MLFLOW_SCHEMES) or (path / "MLmodel").is_file()):
        raise ConfigError(f"--model {uri}: no such checkpoint file or MLflow model directory, and not an MLflow URI "
                          "(models:/NAME/VERSION, runs:/RUN_ID/PATH)")
    server = tracking_uri(params.tracking)
    if uri.startswith(("models:/", "runs:/")):
        check_tracking_server(server)  # these URIs are resolved by the tracking server: say so if it is down
    mlflow.set_tracking_uri(server)
    try:
        return _from_mlflow(uri, params)
    except MlflowException as err:
        first = redact(str(err.message).strip().splitlines()[0]) if str(err.message).strip() else type(err).__name__
        raise ConfigError(f"--model {uri}: {first}") from None


def _from_checkpoint(path: Path, params: Params) -> LoadedModel:
    model = load_checkpoint(path)
    meta = getattr(model, "checkpoint_meta", {}) or {}
    names = _class_names(meta["class_names"], model, str(path)) if "class_names" in meta else [
        str(c) for c in range(model.num_classes)]
    if "preprocess" in meta:
        preprocess = PreprocessConfig.model_validate(meta["preprocess"])
    else:
        log.warning("%s records no preprocessing parameters; using those of the params file", path)
        preprocess = params.preprocess
    leaky = bool(meta.get("leaky", False)) or reads_annotated_aus(model)
    return LoadedModel(model, list(names), preprocess, leaky, "checkpoint")


def _from_mlflow(uri: str, params: Params) -> LoadedModel:
    info = get_model_info(uri)
    pyfunc_flavor = info.flavors.get("python_function", {})
    if "pytorch" not in info.flavors and pyfunc_flavor.get("loader_module") == "mlflow.pyfunc.model":
        wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        if not isinstance(wrapper, MerPyfuncModel):
            raise ConfigError(f"--model {uri}: a pyfunc model, but not one logged by log_pyfunc_model")
        return LoadedModel(wrapper.model, wrapper.class_names, wrapper.preprocess, wrapper.leaky, "mlflow pyfunc")
    if "pytorch" in info.flavors:
        # A plain mlflow.pytorch model carries no class names or preprocessing: read them from the run that logged it.
        model = mlflow.pytorch.load_model(uri, map_location="cpu").eval()
        run = mlflow.tracking.MlflowClient().get_run(info.run_id) if info.run_id else None
        logged = run.data.params if run is not None else {}
        class_set = logged.get("data.class_set")
        names = list(get_class_set(class_set).names) if class_set else [str(c) for c in range(model.num_classes)]
        preprocess = _logged_preprocess(logged) or params.preprocess
        leaky = run is not None and run.data.tags.get("leaky") == "true"
        return LoadedModel(model, names, preprocess, leaky or reads_annotated_aus(model), "mlflow pytorch")
    raise ConfigError(f"--model {uri}: flavours {sorted(info.flavors)}; expected this platform's pyfunc or pytorch")


def _logged_preprocess(logged: Mapping[str, str]) -> PreprocessConfig | None:
    """The `preprocess.*` run parameters (flattened by components.tracking.base.flatten) back as a PreprocessConfig."""
    tree: dict[str, Any] = {}
    for key, text in logged.items():
        if key.startswith("preprocess."):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            set_dotted(tree, key[len("preprocess."):], value)
    if not tree:
        return None
    return PreprocessConfig.model_validate(tree)
