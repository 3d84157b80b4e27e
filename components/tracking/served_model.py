"""The served model's code, logged with it as MLflow "models from code" (https://mlflow.org/docs/latest/ml/model/
models-from-code/): MLflow stores this file in the model and runs it when the model is loaded, and the project's
library (`mer.model`, which this file imports) travels in the model's `code/` folder (`code_paths`), so a model
logged here loads and predicts in any environment that has only the model's requirements.txt installed, with no
checkout of this repository and no pickled class (components/tracking/pyfunc.py logs it).

Imports only MLflow and `mer.model`: nothing else of the project is in the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model

from mer.model.config import PreprocessConfig
from mer.model.errors import DataError
from mer.model.inference import class_names_for, input_batch, predict_proba
from mer.model.io import read_json
from mer.model.models import load_checkpoint

CHECKPOINT_ARTIFACT = "checkpoint"
INFO_ARTIFACT = "info"


class MerPyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint and its info; `predict` maps a dict of batched cache arrays to class probabilities."""

    # predict's input is a dict of tensors, which MLflow's type-hint schemas cannot express; the logged signature
    # (TensorSpecs per input) validates requests instead.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        info = read_json(context.artifacts[INFO_ARTIFACT], "model info")
        self.model = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.class_names: list[str] = class_names_for(info.get("class_names"), self.model,
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


set_model(MerPyfuncModel())
