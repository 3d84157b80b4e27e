"""Pipeline steps: each a plain function with a thin CLI, called by dvc.yaml stages and Kubeflow components."""
