# Two commands from a fresh clone: `make demo` and `make test`. Each builds .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-fast venv clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch that this machine keeps on disk; a plain `torch` would pull CUDA.
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	# The mediapipe face/hand model files the tests and the demo detect with (into the pack's cache,
	# ~/.cache/fairhuman-hgdpo/mediapipe; kept when already there with the right checksums).
	$(PY) -m trainers models
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainers demo

# Everything, what CI runs (about 17 minutes here). test-quick leaves out the heavy tests (full-size
# training in a real ComfyUI, a fresh-venv install: minutes each on a loaded machine).
test: $(STAMP)
	$(PY) -m pytest

test-quick: $(STAMP)
	$(PY) -m pytest -m "not heavy"

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not comfyui"

clean:
	rm -rf $(VENV) outputs .pytest_cache
