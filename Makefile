# Quick start: `make demo` (tiny preset, sample prompts, local Ray) and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUTPUT ?= outputs/demo

.PHONY: install demo demo-variations test bench clean

install: $(STAMP)

# uv installs everything (seconds, where pip takes about a minute and a half on a 2-core machine). uv does not read
# pip's configuration, so the find-links it names are handed on: where a machine provides its own torch wheel (a
# CPU build, say) that one is taken, and elsewhere PyPI's (the CUDA build on Linux), as pip would.
UV_PIN := uv==0.13.9
PIP_FIND_LINKS_SET = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | tr ' ' '\n' | sort -u)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(UV_PIN)'
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python \
		$(foreach links,$(PIP_FIND_LINKS_SET),--find-links $(links)) -e '.[test]'
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
