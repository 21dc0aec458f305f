# Quick start: `make demo` (tiny preset, sample prompts, local Ray) and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUTPUT ?= outputs/demo

.PHONY: install demo demo-variations test bench clean

install: $(STAMP)

# torch is pinned in pyproject.toml: pip resolves it to the CUDA build on a GPU machine's PyPI and to the
# bundled CPU wheel where one is provided (find-links), so the install stays small on CPU-only machines.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.generate --preset tiny --input jobs/data/sample_prompts.parquet \
		--output $(DEMO_OUTPUT) --set output.mode=overwrite

# DALL-E 2's variations of four bundled images (tiny preset): two candidates each, the one closer to its caption kept.
demo-variations: $(STAMP)
	$(BIN)/python -m jobs.generate --preset tiny --input jobs/data/sample_images.parquet \
		--output $(DEMO_OUTPUT)-variations --set mode=variation --set rerank.candidates=2 --set output.mode=overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=30

# The scheduling benchmark (no models): prints a table; see docs/BENCHMARKS.md for the other modes.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench --simulate dalle2 --gpus 8 --prompts 2000

clean:
	rm -rf $(VENV) outputs .pytest_cache
