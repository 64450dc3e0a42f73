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
	@# The browser test drives Debian's Chromium (never a downloaded browser); install it when we can.
	test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: /usr/bin/chromium missing; the browser test will be skipped"; }
	touch $(STAMP)

# The main job: distil the shipped shapes teacher into bk-base / bk-small / bk-tiny and evaluate them
# exactly (demo-output/report.md, grid.png, tradeoff.png).
demo: $(STAMP)
	$(BIN)/distill-sd demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
