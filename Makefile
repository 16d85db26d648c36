# Two commands from a fresh clone: `make demo` and `make test`. Each builds .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-fast venv clean

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

# What CI runs (.ci/run): every test not marked slow, on two workers (pytest-xdist; whole files to
# a worker, so a file's fixtures are built once), then the slow ComfyUI tests but the heavy ones,
# one at a time (one server per tree, full-size models in memory): about 20 minutes on two
# cores. test-all is the whole suite (an hour or more); docs/testing.md says what each holds.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile; quick=$$?; \
	$(PY) -m pytest -m "comfyui and slow and not heavy"; comfy=$$?; exit $$(( quick || comfy ))

test-all: $(STAMP)
	$(PY) -m pytest -m "not comfyui" -n 2 --dist loadfile; pack=$$?; \
	$(PY) -m pytest -m comfyui; comfy=$$?; exit $$(( pack || comfy ))

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not comfyui" -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs .pytest_cache
