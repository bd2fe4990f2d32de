# The two commands a new user needs (see README.md):
#   make demo   set up .venv and run the demo dose receipt on the embedded default
#   make test   set up .venv with the test tools and run the whole suite
# Both work on a machine that has only Python 3.11+ (and make): everything else is installed here.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the project's dependencies change.
STAMP  := $(VENV)/.installed

.PHONY: demo test check install clean

# Debian packages the project needs outside Python: Chromium for the browser tests, a CJK font so
# Chinese renders in PDFs, and Pango for WeasyPrint. Installed once, only when something is missing.
SYSTEM_PACKAGES := chromium fonts-noto-cjk libpango-1.0-0 libpangoft2-1.0-0

$(STAMP): pyproject.toml
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -q $$missing >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q $$missing >/dev/null; }; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sopflow demo

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# Format, lint, types and every SOP file (scripts/check); CI runs it before the tests.
check: $(STAMP)
	scripts/check

clean:
	rm -rf $(VENV) build *.egg-info
