"""Pipeline steps: each a plain function with a thin CLI, called by dvc.yaml stages and Kubeflow components."""

import os

# A local Ray started by any component binds to 127.0.0.1 (mer.components.ray_session). Ray 2.60 reads this variable when
# it is imported and otherwise replaces a loopback node address with the machine's, so it is set before any import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
