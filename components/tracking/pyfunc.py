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

The model is logged as "models from code" (components/tracking/served_model.py, MLflow's documented way for a custom
pyfunc: no pickled class) with the `mer.model` library in its code/ folder and the distributions that code imports,
pinned, as its requirements: it loads in a fresh environment built from its requirements.txt alone
(tests/test_pipeline.py builds one with uv from the local cache and predicts there).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info, infer_signature

import mer.model
from mer.components.tracking.base import check_tracking_server, redact, tracking_uri
from mer.model.config import PreprocessConfig, set_dotted
from mer.model.data.labels import get_class_set
from mer.model.errors import ConfigError
from mer.model.inference import class_names_for, example_arrays
from mer.model.io import write_json
from mer.model.models import load_checkpoint, save_checkpoint
from mer.model.training.protocols import reads_annotated_aus

if TYPE_CHECKING:  # the settings validate `tracking.backend` against this package's registry
    from mer.components.settings import Params

log = logging.getLogger(__name__)

# The model's code (MLflow models-from-code; the class MLflow instantiates) and the library it needs, logged with it.
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
CHECKPOINT_ARTIFACT = "checkpoint"  # the artifact names served_model.py reads
INFO_ARTIFACT = "info"
SERVED_CLASS = "MerPyfuncModel"
# MLflow's loaders of a custom pyfunc: models from code (what log_pyfunc_model writes), a pickled PythonModel (older).
PYFUNC_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
# The modules the served code imports (mer_model and its loading path), as installed distributions with their
# versions: the model's requirements.txt, the only packages a serving environment needs.
SERVED_MODULES = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "cv2", "PIL", "yaml", "pydantic",
                  "openpyxl", "sklearn", "scipy", "dlib", "face_recognition_models")


def _providers(module: str) -> list[str]:
    """The installed distributions providing top-level `module`: their top_level.txt, else their file lists (dlib-bin
    declares only `_dlib_pybind11` there but installs `dlib/` too)."""
    declared = metadata.packages_distributions().get(module)
    if declared:
        return list(declared)
    return [dist.metadata["Name"] for dist in metadata.distributions()
            if any(str(f).split("/")[0] == module for f in dist.files or ())]


def _requirements() -> list[str]:
    """`name==version` of the distributions providing SERVED_MODULES in this environment (e.g. cv2 ->
    opencv-contrib-python-headless, dlib -> dlib-bin), sorted; a module not installed here is left out."""
    return sorted({f"{dist}=={metadata.version(dist)}" for module in SERVED_MODULES for dist in _providers(module)})


def _library_copy(tmp: Path) -> Path:
    """The library `mer.model` without byte code, for the model's code/ folder: `mer/model/...` (`mer` a namespace
    package, as installed), so the served code imports it under the name it has everywhere."""
    shutil.copytree(Path(mer.model.__file__).parent, tmp / "code" / "mer" / "model",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp / "code" / "mer"


def model_info(class_names: Sequence[str], preprocess: PreprocessConfig, leaky: bool) -> dict[str, Any]:
    return {"class_names": list(class_names), "preprocess": preprocess.model_dump(mode="json", by_alias=True),
            "leaky": leaky}


def log_pyfunc_model(model: Any, class_names: Sequence[str], preprocess: PreprocessConfig, *, name: str = "model",
                     leaky: bool = False, registered_model_name: str | None = None) -> Any:
    """Log `model` (built by `create_model`) as a pyfunc into the ACTIVE MLflow run; returns mlflow's ModelInfo
    (`.model_uri` loads it; with `registered_model_name` it is also registered as a new version). The signature and
    the input example are the model's inputs in the cache layout (mer.model.batch_keys), one sample.

    `leaky`: the results that chose this model used test labels (oracle protocol) or a model input that encodes them
    (annotated AUs); recorded so that a served prediction can be traced back to it."""
    leaky = leaky or reads_annotated_aus(model)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(model, Path(tmp) / "model.pt", {"class_names": list(class_names)})
        info_path = Path(tmp) / "mer_model.json"
        write_json(info_path, model_info(class_names, preprocess, leaky))
        example = {k: v[None].astype(np.float32) for k, v in example_arrays(model.inputs, preprocess).items()}
        probabilities = pd.DataFrame(np.full((1, len(class_names)), 1.0 / len(class_names), dtype=np.float32),
                                     columns=list(class_names))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVED_MODEL_CODE),
            code_paths=[str(_library_copy(Path(tmp)))],
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
    """`uri`: a checkpoint file (`save_checkpoint`), an MLflow model directory, or an MLflow URI
    (`models:/NAME@champion`, `models:/NAME/1`, `runs:/RUN_ID/model`, ...; resolved against the configured tracking
    server). Anything else is a ConfigError."""
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
    names = class_names_for(meta["class_names"], model, str(path)) if "class_names" in meta else [
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
    if "pytorch" not in info.flavors and pyfunc_flavor.get("loader_module") in PYFUNC_LOADERS:
        wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        # Compared by name: MLflow runs the model's own copy of served_model.py, so the class is not this checkout's.
        if type(wrapper).__name__ != SERVED_CLASS or not hasattr(wrapper, "class_names"):
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
    """The `preprocess.*` run parameters (flattened by mer.components.tracking.base.flatten) back as a PreprocessConfig."""
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
