# Two commands do everything on a fresh machine:
#   make demo   set up, then run the main job (the demo recipe end to end)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
JOBS   ?= 2

.PHONY: setup test test-slow demo clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(STAMP)

# the suite CI runs (under 15 minutes on 2 cores); `test-slow` adds the minutes-long end-to-end
# run of the demo in --quick mode
test: setup
	$(BIN)/python -m pytest -q -n $(JOBS) -m "not slow" tests

test-slow: setup
	$(BIN)/python -m pytest -q -n $(JOBS) -m slow tests

demo: setup
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
