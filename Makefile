# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both install what they need first (idempotent, keyed on the lock file).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTOS := $(wildcard protos/arbiter/v1/*.proto)
GEN_STAMP := arbiter/v1/.generated
# Bounded torch threads keep two cores usable by the gRPC and client sides.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install protos lint test demo demo-data bench gpu-wheels bench-chaos bench-soak bench-e2e bench-learning bench-online-rm bench-ensemble bench-ensemble-members bench-scale clean prometheus-tools triton-env demo-triton

install: $(STAMP) $(GEN_STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: it is the CPU wheel on disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Generated code goes to arbiter/v1 (package path = import path) and is never
# edited or committed.
protos: $(GEN_STAMP)
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -f arbiter/v1/*_pb2.py arbiter/v1/*_pb2.pyi arbiter/v1/*_pb2_grpc.py
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

lint: $(BUF)
	cd protos && ../$(BUF) lint
	cd protos && ../$(BUF) format --diff --exit-code

# Debian's Prometheus (server + promtool) for the rule tests and the drift-alert
# integration test.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q --no-install-recommends prometheus || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }; }

# The local Triton Inference Server (tritonserver bundled in nvidia-pytriton)
# and the Python its models run in: a venv of its own, since pytriton pins
# numpy<2 (see requirements-triton.lock).
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
triton-env: $(TRITON_STAMP)
$(TRITON_STAMP): requirements-triton.lock
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q torch==2.13.0
	$(TRITON_VENV)/bin/pip install -q -r requirements-triton.lock
	touch $@

# ARBITER_REQUIRE_TRITON: the Triton tests fail, not skip, without .venv-triton.
test: install lint prometheus-tools triton-env demo-data
	ARBITER_REQUIRE_TRITON=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The demo's corpus: Debian's fortunes quotes (BSD-licensed fortune-mod).
demo-data:
	@test -d /usr/share/games/fortunes || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q --no-install-recommends fortunes-min fortunes || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends fortunes-min fortunes; }; }

demo: install demo-data
	$(BIN)/arbiter demo $(DEMO_ARGS)

# The reward service with its forward passes in a real Triton server, checked
# against the in-process backend.
demo-triton: install triton-env
	$(BIN)/python -m services.demo_triton $(DEMO_ARGS)

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Wheels for the GPU check (bench/gpu_check.sh) on the device machine, whose
# image has torch and transformers but not these (or not at these versions):
# Python 3.12, manylinux x86-64, into .whl/ (git-ignored; carry it).
GPU_WHEELS = grpcio==1.81.1 grpcio-tools==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
	protobuf==6.33.6 kafka-python==3.0.12 crc32c==2.9.post0 river==0.26.1
gpu-wheels: install
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)

# arbiter up with each component killed by SIGKILL in turn (broker and its
# object store included): seconds until training resumes, and the
# exactly-once ledger. Minutes; not part of make bench.
bench-chaos: install
	$(BIN)/python -m bench.chaos $(BENCH_ARGS)

# Three services as processes under mixed valid and hostile traffic for 3
# minutes: RSS growth, 60 MiB refusals, health latency (not part of `bench`).
bench-soak: install
	$(BIN)/python -m bench.run --only soak $(BENCH_ARGS)

# The demo's task end to end, the same wall-clock budget each: Arbiter's GRPO
# and PPO through `arbiter up` against TRL's GRPOTrainer and PPOTrainer, each
# in one process, on the demo's models and prompts. TRL goes into .venv-trl
# and .venv-trl-ppo (created by the benchmark; never this venv). Minutes; not
# part of make test or make bench.
bench-e2e: install demo-data
	$(BIN)/python -m bench.e2e $(BENCH_ARGS)

# Arbiter's algorithms (PPO, RLOO, GRPO, A2C, NLPO, offline ILQL with its data
# sampled inside the budget) and TRL's GRPO and PPO on the demo's task: the
# same models, wall-clock budget and seeds (3); gold gain, RM reward, KL and
# fluency, mean ± sd, a table and a plot in runs/bench-learning. About an hour;
# not part of make test or make bench.
bench-learning: install demo-data
	$(BIN)/python -m bench.learning $(BENCH_ARGS)

# The demo with its reward model retrained online from simulated live
# annotation vs frozen at v1; PPO against one RM vs a penalized ensemble.
bench-online-rm: install demo-data
	$(BIN)/python -m bench.online_rm $(BENCH_ARGS)

bench-ensemble: install demo-data
	$(BIN)/python -m bench.ensemble_rm $(BENCH_ARGS)

# The ensemble's members under each diversity scheme, diagnosed on fresh
# gold-labelled pairs without PPO (minutes; --full for the full demo's RMs).
bench-ensemble-members: install demo-data
	$(BIN)/python -m bench.ensemble_rm --members-only $(BENCH_ARGS)

# The whole loop with a GPT-2-small-shaped (124 M) model and a 2-rank trainer.
bench-scale: install
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) .tools $(GEN_STAMP) arbiter/v1/*_pb2*.py* build runs
