# The two commands a new user needs (see README.md):
#   make demo   set up .venv and run the demo dose receipt on the embedded default
#   make test   set up .venv with the test tools and run the whole suite
# Both work on a machine that has only Python 3.11+ (and make): everything else is installed here.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the project's dependencies change.
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sopflow demo

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
