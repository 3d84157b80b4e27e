# Two commands for users (see README): `make demo` and `make test`. Both create .venv/ on first use and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test pipeline-yaml clean

install: $(STAMP)

# --compile-bytecode: the .pyc files are written once, here. Without them every process compiles the sources of
# torch, sklearn, mlflow... again on import when PYTHONDONTWRITEBYTECODE is set (as on CI runners): 6 s for
# `import torch` instead of 3, in each of the many processes a LOSO run starts (driver, trial actor, fold workers).
$(STAMP): requirements.lock pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.8
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# dvc runs the stages' `mer ...` commands from PATH: put the venv first.
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: install
	$(BIN)/python -m pytest -q

pipeline-yaml: install
	$(BIN)/python -m mer.pipelines.kfp_pipeline --output infra/kubeflow/mer_pipeline.yaml

clean:
	rm -rf $(VENV) data runs mlruns mlartifacts mlflow.db metrics.json plots reports
