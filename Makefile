# trainyard developer targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trainyard-installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install trainyard with its pinned dependencies

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==23.2.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

train: install ## train the offline default (CNN on scikit-learn digits, CPU); ARGS="k=v ..."
	$(BIN)/trainyard-train $(ARGS)

test: install ## run every test this machine can run (GPU tests skip without a GPU)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

CLUSTER ?= local
RUN ?= outputs

submit: install ## send trials to a cluster: make submit CLUSTER=slurm ARGS="optimizer.lr=1e-3,1e-2"
	$(BIN)/trainyard submit cluster=$(CLUSTER) $(ARGS)

status: install ## state of the runs below RUN (default outputs/), with the scheduler's view
	$(BIN)/trainyard status $(RUN)

logs: install ## the scheduler's output of what was submitted from RUN=<run or sweep dir>
	$(BIN)/trainyard logs $(RUN)

cancel: install ## cancel what was submitted from RUN=<run or sweep dir>
	$(BIN)/trainyard cancel $(RUN)

VARIANT ?= cuda
IMAGE_ARGS ?=
REGISTRY ?=

image: ## build the training image, tagged with the git commit: make image [VARIANT=cpu] [IMAGE_ARGS="--pip-from-host"]
	PYTHONPATH=src $(PYTHON) -m trainyard.image build --variant $(VARIANT) $(IMAGE_ARGS)

push: ## push this commit's image: make push REGISTRY=registry.example.com/team [VARIANT=cpu]
	PYTHONPATH=src $(PYTHON) -m trainyard.image push --registry "$(REGISTRY)" --variant $(VARIANT)

engine: ## install podman and its settings for this host (root; Debian packages)
	bash docker/engine.sh install

cluster: ## install and start the loopback Slurm cluster (root; Debian packages)
	bash cluster/slurm/cluster.sh install
	bash cluster/slurm/cluster.sh start

bench: install ## run the benchmarks (ratios measured side by side in one run)
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/ddp_step.py
	$(BIN)/python benchmarks/gpu_step.py
	$(BIN)/python benchmarks/slurm_submit.py
	$(BIN)/python benchmarks/slurm_scale.py

clean: ## remove outputs, caches and the virtual environment
	rm -rf outputs .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf $(VENV)

.PHONY: help install train test lint format bench clean submit status logs cancel cluster image push engine
