# The same commands for the README, CI and developers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (training only; the gateway does not need it). A plain `torch`
# requirement would pull a multi-GB CUDA build on machines without this wheel cached.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
WORKERS ?= 1

VENV_NP2 ?= .venv-numpy2

# Debian packages the tests and checks use (redis-server, prometheus + promtool, docker-compose,
# chromium for the /docs page), installed when missing.
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)
define apt_install
	@command -v $(1) >/dev/null || { $(APT) update -qq && \
		DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq --no-install-recommends $(2); }
endef

.PHONY: tools setup serve test test-numpy2 test-fast lint format demo bench bench-quick bench-serving bench-adaptive soak loadtest reliability deploy-check clean locks k8s-manifests

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[cpu,train,triton,dev]'
	touch $@

## Build the demo cascade if missing, start the bundled Triton and the gateway on $(HOST):$(PORT).
serve: setup
	$(BIN)/cascade-serve --demo --host $(HOST) --port $(PORT) --workers $(WORKERS)

## Every test tier: unit, integration (in-process app), e2e (real tritonserver + uvicorn).
tools:
	$(call apt_install,redis-server,redis-server)
	$(call apt_install,prometheus,prometheus)
	$(call apt_install,chromium,chromium)

test: setup tools
	$(BIN)/python -m pytest

## Training under numpy 2 (the serving stack stays on numpy 1 because of nvidia-pytriton).
NUMPY2_TESTS = tests/unit/test_losses.py tests/unit/test_methods.py tests/unit/test_engine.py \
	tests/unit/test_evaluate.py tests/unit/test_calibrate.py tests/unit/test_data.py \
	tests/unit/test_recipe.py tests/unit/test_device.py tests/unit/test_models.py \
	tests/unit/test_train_without_web_stack.py tests/unit/test_numpy_version.py \
	tests/unit/test_records.py tests/unit/test_config.py
$(VENV_NP2)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_NP2)
	$(VENV_NP2)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_NP2)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV_NP2)/bin/python -m pip install --quiet -e '.[cpu,train]' "numpy>=2" "pytest>=8"
	touch $@

test-numpy2: $(VENV_NP2)/.installed
	CASCADE_EXPECT_NUMPY=2 $(VENV_NP2)/bin/python -m pytest -p no:cacheprovider $(NUMPY2_TESTS)

test-fast: setup
	$(BIN)/python -m pytest tests/unit tests/integration

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: setup
	$(BIN)/cascade-train demo

## Every distillation method on ../shared/data/fashion_mnist (about 15 min on 2 cores).
bench: setup
	$(BIN)/python benchmarks/methods.py

bench-quick: setup
	$(BIN)/python benchmarks/methods.py --quick --out runs/bench-quick/results --runs runs/bench-quick

## The gateway beside echo, direct Triton and a Triton-only cascade (about 12 min; needs wrk).
bench-serving: setup
	$(BIN)/python benchmarks/serving.py

## Live delegation control on a real gateway and Triton: traffic shift, teacher overload,
## shadow estimates (about 8 min; JSON + PNG in benchmarks/results/adaptive).
bench-adaptive: setup
	$(BIN)/python benchmarks/adaptive.py

## 11 minutes under load with hot swaps, threshold changes, a Redis and a Triton restart
## (not in CI): memory, descriptors, tasks at start and end; lost requests and 5xx must be 0.
soak: setup tools
	$(BIN)/python benchmarks/soak.py

## deploy/ validated by the real tools: promtool (rules, rule unit tests, config; Debian's
## prometheus package), helm lint + helm template | kubernetes-validate --strict (Helm's Go SDK
## from PyPI), the plain manifests up to date with the chart, docker-compose config (Debian's;
## any warning fails), hadolint (PyPI), yamllint --strict.
CHART := deploy/helm/cascade
K8S_VERSION ?= 1.30.0
deploy-check: setup
	$(call apt_install,promtool,prometheus)
	$(call apt_install,docker-compose,docker-compose)
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules_test.yml
	promtool check config --syntax-only deploy/prometheus/prometheus.yml
	$(BIN)/python deploy/chart.py lint $(CHART)
	$(BIN)/python deploy/chart.py lint $(CHART) -f $(CHART)/ci/external-redis-values.yaml
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(BIN)/python deploy/chart.py template $(CHART) > $$tmp/default.yaml; \
	$(BIN)/python deploy/chart.py template $(CHART) -f $(CHART)/ci/external-redis-values.yaml > $$tmp/external.yaml; \
	$(BIN)/python deploy/chart.py template $(CHART) -f deploy/k8s/values.yaml > $$tmp/plain.yaml; \
	for f in $$tmp/*.yaml; do $(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) $$f; done; \
	tail -n +3 deploy/k8s/cascade.yaml | diff -u - $$tmp/plain.yaml || \
		{ echo "deploy/k8s/cascade.yaml is stale: run make k8s-manifests"; exit 1; }; \
	echo "chart renders validated against Kubernetes $(K8S_VERSION); plain manifests current"
	@out=$$(CASCADE_ADMIN_TOKEN=check docker-compose -f deploy/docker-compose.yml config -q 2>&1); \
	if [ -n "$$out" ]; then echo "$$out"; echo "docker-compose config: warnings"; exit 1; fi; \
	echo "docker-compose config: clean"
	$(BIN)/hadolint deploy/gateway.Dockerfile
	$(BIN)/yamllint --strict deploy configs .yamllint.yml .hadolint.yaml

## deploy/k8s/cascade.yaml: the chart rendered for clusters without Helm (values in deploy/k8s).
k8s-manifests: setup
	{ echo "# Rendered from deploy/helm/cascade with deploy/k8s/values.yaml by make k8s-manifests:"; \
	  echo "# edit the chart, not this file."; \
	  $(BIN)/python deploy/chart.py template $(CHART) -f deploy/k8s/values.yaml; } > deploy/k8s/cascade.yaml

## Fault tests under load (Triton hung, killed, slow; overload; hot swap; SIGTERM), ~3 min:
## figures into docs/reliability.md.
reliability: setup
	$(BIN)/python benchmarks/reliability.py --write docs/reliability.md

## Locust against a running gateway: CSVs, summary.json and a plot under $(LOADTEST_OUT).
LOADTEST_HOST ?= http://$(HOST):$(PORT)
USERS ?= 16
SPAWN_RATE ?= 16
DURATION ?= 30s
IMAGE_DATA ?= digits
TEXT_DATA ?= intents
LOADTEST_OUT ?= runs/loadtest
loadtest: setup
	$(BIN)/python -m loadtests.run --host $(LOADTEST_HOST) --users $(USERS) \
		--spawn-rate $(SPAWN_RATE) --duration $(DURATION) --image-data $(IMAGE_DATA) \
		--text-data $(TEXT_DATA) --out $(LOADTEST_OUT)

clean:
	rm -rf .cascade bundles model_repository/*/[0-9]*

## The gateway image's lock files (hashed; what deploy/gateway.Dockerfile installs): rerun after
## a dependency change in pyproject.toml.
LOCK = $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-header
locks: setup
	$(LOCK) --extra cpu -o deploy/requirements/gateway-cpu.txt
	$(LOCK) --extra gpu -c deploy/requirements/gpu-constraints.txt -o deploy/requirements/gateway-gpu.txt
