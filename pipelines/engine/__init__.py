"""The experiment engine on Ray Tune, one module per responsibility:

* `storage`   - finished folds (summary + predictions) and fold checkpoints under `tune.storage_path` (local or s3://);
* `tasks`     - the Ray tasks: a list of fold jobs -> one stored FoldSummary per fold; the final model;
* `trial`     - one hyperparameter configuration as a Tune function trainable that fans its folds out as tasks;
* `callbacks` - Tune callbacks attached through RunConfig: the tracking mirror and the fold progress;
* `driver`    - `run_tune(params)`: search -> evaluation -> final model -> `tune.results`.

The tune stage (`mer.pipelines.loso.tune`: `mer tune`, `python -m mer.pipelines.loso` for `ray job submit`, the Kubeflow tune
step) and `mer benchmark` call `driver.run_tune`.
"""
