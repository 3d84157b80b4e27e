"""Training and evaluation core: cache-backed datasets, LOSO folds, the fold trainer, metrics."""
