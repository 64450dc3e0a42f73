# Two commands for a new user: `make demo` and `make test`. Both create .venv and install on first use;
# re-running them skips the install unless pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0 numpy
	$(PIP) -e '.[dev]'
	touch $(STAMP)

# Until the shapes-world demo lands: the catalogue, then a bk-tiny student of a full-size random-weight
# SD-1.5 teacher (4.3 GB on disk; its images are noise), built and inspected.
demo: $(STAMP)
	$(BIN)/distill-sd students --arch sd15
	rm -rf demo-output && mkdir -p demo-output
	$(BIN)/distill-sd reference --arch sd15 --out demo-output/sd15-random
	$(BIN)/distill-sd build --teacher demo-output/sd15-random --student bk-tiny --out demo-output/bk-tiny
	$(BIN)/distill-sd inspect demo-output/bk-tiny

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
