# Two commands set everything up: `make serve` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test install install-test fmnist wallpapers bench default-bundle study clean help

help:
	@echo "make serve   set up .venv and serve the embedded default bundle on http://127.0.0.1:8000 (ARGS='--port 9000 …')"
	@echo "make test    set up .venv with test extras and the Fashion-MNIST data, run the test suite"
	@echo "make bench   run the serving benchmark and rewrite docs/benchmarks.md sections"
	@echo "make default-bundle  rebuild the default bundle from scratch (hours on a CPU; resumes)"
	@echo "make study   the fmnist-scenes study: default-bundle, every other training run, platform evaluate (resumes)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

# executorch (the .pte export) cannot be an extra: its metadata asks for numpy>=2, which compressai
# cannot load; with numpy 1.26 it exports and runs (tests/test_export_pte.py), so it goes in apart.
EXECUTORCH := executorch==1.5.1
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,data,pte]"
	$(BIN)/python -m pip install --quiet --no-deps $(EXECUTORCH)
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Real photos for the training tests: Debian's dataset-fashion-mnist (needs root + apt).
fmnist:
	@test -d $(FMNIST_DIR) || { \
	  echo "installing dataset-fashion-mnist (real Fashion-MNIST photos) into $(FMNIST_DIR)"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  echo "warning: could not install dataset-fashion-mnist; training tests will fail"; }

# The benchmark's background photographs: Debian's wallpaper packages (needs root + apt). Tests use
# scikit-image's pictures only, so `make test` needs none of this.
WALLPAPERS := mate-backgrounds plasma-workspace-wallpapers
wallpapers:
	@dpkg -s $(WALLPAPERS) >/dev/null 2>&1 || { \
	  echo "installing the background photographs ($(WALLPAPERS))"; \
	  (apt-get update -qq && apt-get install -y -qq $(WALLPAPERS)) >/dev/null 2>&1 || \
	  { echo "error: could not install $(WALLPAPERS) (root and apt needed): fmnist-scenes draws its backgrounds from them" >&2; exit 1; }; }

serve: install
	$(BIN)/platform serve $(ARGS)

test: install-test fmnist
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/platform bench serve --output docs/benchmarks.md

# The default bundle, from scratch: data, the three task teachers, RAC N = 8 variable-rate over seven λ
# (one encoder, every rate) distilled from all three teachers; detection and segmentation heads started
# from their teachers and trained as the Entropic Student reference does; then one layer2..4 trunk shared
# by the three full-width heads, fine-tuned on all three tasks' losses for 4 epochs. The bundle is packed
# into the package with the trunk and heads in int8 and the encoder in float16 (under 30 MB), default
# rate $(DEFAULT_RATE), and measured there on the 2,000 val scenes, through the served path, for its
# manifest's metrics.
# recipes/sweeps/fmnist_scenes_runs.sh holds every training step; each resumes (--resume) where an
# interrupted run stopped; outputs live in $(DEFAULT_WORK).
# Times on a 2-core AVX512-BF16 EPYC: docs/benchmarks/fmnist-scenes-v2.md.
DEFAULT_WORK ?= runs/default
DEFAULT_RATE ?= 1  # the highest rate whose val payloads stay within 200 bytes per image (~160 B)
RUNS := PLATFORM=$(BIN)/platform bash recipes/sweeps/fmnist_scenes_runs.sh $(DEFAULT_WORK)
default-bundle: install fmnist wallpapers
	$(RUNS) default
	$(BIN)/platform bundle pack $(DEFAULT_WORK)/rac8-vr-mt-tinit-joint platform/splitserve/assets/default-bundle \
		--fp16-encoder --int8 --default-rate $(DEFAULT_RATE)
	$(BIN)/platform bundle measure platform/splitserve/assets/default-bundle --data $(DEFAULT_WORK)/fm64 --no-progress

# The v2 study (docs/benchmarks/fmnist-scenes-v2/): the default bundle's runs, every other rate point,
# baseline and task teacher (each resumable), then the report on both vals (unseen photographs, the
# headline; val_seen, in-distribution). The sweep file reads runs/default, so keep DEFAULT_WORK at its
# default here.
STUDY := recipes/sweeps/fmnist_scenes_v2.yaml
study: default-bundle
	$(RUNS) study
	$(BIN)/platform evaluate $(STUDY) --out docs/benchmarks/fmnist-scenes-v2
	$(BIN)/platform evaluate $(STUDY) --split val_seen --out docs/benchmarks/fmnist-scenes-v2/val_seen

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
