"""mer_model: the pure library of the MER platform (data, preprocessing, models, training, metrics).

It imports neither Ray, MLflow nor DVC: orchestration lives in `components/` and `pipelines/`.
"""

__version__ = "0.1.0"
