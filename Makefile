# Two commands set everything up: `make serve` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test install install-test fmnist bench default-bundle clean help

help:
	@echo "make serve   set up .venv and serve the embedded default bundle on http://127.0.0.1:8000 (ARGS='--port 9000 …')"
	@echo "make test    set up .venv with test extras and the Fashion-MNIST data, run the test suite"
	@echo "make bench   run the serving benchmark and rewrite docs/benchmarks.md sections"
	@echo "make default-bundle  rebuild the default bundle from scratch (hours on a CPU; resumes)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,data]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Real photos for the training tests: Debian's dataset-fashion-mnist (needs root + apt).
fmnist:
	@test -d $(FMNIST_DIR) || { \
	  echo "installing dataset-fashion-mnist (real Fashion-MNIST photos) into $(FMNIST_DIR)"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  echo "warning: could not install dataset-fashion-mnist; training tests will fail"; }

serve: install
	$(BIN)/platform serve $(ARGS)

test: install-test fmnist
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/platform bench serve --output docs/benchmarks.md

# The default bundle, from scratch: data, teacher, Entropic Student stage 1, classification stage 2,
# then the heads moved onto one shared trunk and packed in float16. Every step resumes (--resume)
# where an interrupted run stopped; outputs live in $(DEFAULT_WORK). See docs/benchmarks.md for times.
DEFAULT_WORK ?= runs/default
DEFAULT_BETA ?= 1.28
default-bundle: install
	test -d $(DEFAULT_WORK)/fm64 || $(BIN)/platform data fmnist-scenes --out $(DEFAULT_WORK)/fm64 --train 20000 --val 2000 --size 64
	test -f $(DEFAULT_WORK)/teacher-cls/teacher.json || $(BIN)/platform teacher --recipe recipes/fmnist_scenes_teacher.yaml \
	    --data $(DEFAULT_WORK)/fm64 --out $(DEFAULT_WORK)/teacher-cls --resume --keep-checkpoint
	test -f $(DEFAULT_WORK)/es/manifest.json || $(BIN)/platform distill --recipe recipes/fmnist_scenes_distill.yaml \
	    --teacher $(DEFAULT_WORK)/teacher-cls --data $(DEFAULT_WORK)/fm64 --beta $(DEFAULT_BETA) --out $(DEFAULT_WORK)/es --resume
	$(BIN)/platform finetune --recipe recipes/fmnist_scenes_finetune.yaml --bundle $(DEFAULT_WORK)/es \
	    --teacher $(DEFAULT_WORK)/teacher-cls --data $(DEFAULT_WORK)/fm64 --resume
	$(BIN)/platform bundle pack $(DEFAULT_WORK)/es platform/splitserve/assets/default-bundle

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
