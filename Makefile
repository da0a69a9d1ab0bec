# `make demo` and `make test` each set up .venv themselves (torch pinned to the CPU wheel by constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-nnunet experiment test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# nnunetv2 pulls timm, and timm a torchvision built for PyPI's CUDA torch: beside the CPU wheel it fails on
	# import (torchvision::nms), which breaks nnU-Net's trainer lookup. Without it timm and nnU-Net run.
	$(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pcl-hpc demo --config configs/demo.yaml --out outputs/demo

experiment: $(STAMP)  # the demo's protocol with the power to answer: 15 pairs at M = 1 (9 frozen), a positive control (about 3 h)
	$(VENV)/bin/pcl-hpc demo --config configs/experiment.yaml --out outputs/experiment

demo-nnunet: $(STAMP)  # the demo's protocol with nnU-Net as the fine-tuning trainer (longer than make demo)
	$(VENV)/bin/pcl-hpc demo --config configs/demo_nnunet.yaml --out outputs/demo_nnunet

test: $(STAMP)
	PYTHONUTF8=1 $(PY) -m pytest -q --durations=30 tests

test-fast: $(STAMP)  # what a developer runs between edits: no SLURM, no slow end-to-end tests (CI runs everything)
	PYTHONUTF8=1 $(PY) -m pytest -q -m "not slurm and not slow" tests

clean:
	rm -rf outputs .pytest_cache
