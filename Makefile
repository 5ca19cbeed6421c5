# densenet-suite: two environments, two commands.
#   make report   build what is missing, then print the parity report (book preset, 96x96)
#   make test     build what is missing, then run every test of every backend, MXNet included
#   make gpu      on a machine with an NVIDIA GPU: parity tests, reports and benchmarks on it,
#                 into $(OUT) (benchmarks/gpu_check.py); a short dry run on a CPU
#
# Why a Makefile over venv + pip: the main environment must take PyTorch through pip (on this
# project's machines pip finds the CPU build of torch 2.13.0 on disk; uv and poetry don't look
# there and would download a multi-GB CUDA build), and the MXNet environment needs its own
# interpreter and numpy < 1.24. Two venvs, each rebuilt only when pyproject.toml changes, is
# what make does with two stamp files and nothing else to install.

PYTHON       ?= python3
MXNET_PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV         := .venv
MXVENV       := .venv-mxnet
PRESET       ?= book
SIZE         ?= 96
PYTEST_ARGS  ?=
OUT          ?= docs/gpu/latest
# The GPU machine has its frameworks installed and no network: `make gpu` builds nothing and
# uses .venv's python where there is one (a CPU machine: the dry mode), else python3.
GPU_PYTHON   ?= $(shell [ -x $(VENV)/bin/python ] && echo $(VENV)/bin/python || echo python3)

.PHONY: report test gpu envs env mxnet-env clean-envs

envs: env mxnet-env
env: $(VENV)/.stamp
mxnet-env: $(MXVENV)/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[torch,flax,keras,onnx,train,test]'
	touch $@

$(MXVENV)/.stamp: pyproject.toml
	@$(MXNET_PYTHON) -c 'import sys; assert sys.version_info < (3, 12), "MXNet 1.9.1 needs Python <= 3.11; set MXNET_PYTHON"'
	$(MXNET_PYTHON) -m venv $(MXVENV)
	$(MXVENV)/bin/python -m pip install -q --upgrade pip
	$(MXVENV)/bin/python -m pip install -q -e '.[mxnet]'
	$(MXVENV)/bin/python -c 'import mxnet, numpy; print("MXNet env:", mxnet.__version__, "numpy", numpy.__version__)'
	touch $@

report: envs
	$(VENV)/bin/densenet report --preset $(PRESET) --size $(SIZE)

# Two pytest workers on two cores, one thread each: OpenMP threads that contend spin, and
# pinned to one the suite ran in 0.9 of the time. --dist loadgroup keeps the memory-heavy
# tests on one worker, --no-loadscope-reorder hands out work in the order conftest.py sets.
test: envs
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DENSENET_MXNET_PYTHON=$(CURDIR)/$(MXVENV)/bin/python \
	    $(VENV)/bin/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

gpu:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out $(OUT)

clean-envs:
	rm -rf $(VENV) $(MXVENV)
