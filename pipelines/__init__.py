"""Orchestration: the experiment engine (engine/), its entry points (loso.py, the `mer` CLI in cli.py), the
benchmark loop and the Kubeflow pipeline. Imports components and mer_model, never the reverse."""

import mer.components  # noqa: F401  (sets the variable that keeps a local Ray on 127.0.0.1 before any Ray import)
