# osteo-kit: one-step setup and the two main jobs.
#   make reproduce   set up .venv and run the whole notebook batch (profile: auto)
#   make test        set up .venv and run the test suite
PYTHON  ?= python3
VENV    ?= .venv
# PyTorch is installed first and pinned: these are the releases the kit is tested with.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= auto
BIN     := $(VENV)/bin

.PHONY: venv test reproduce clean-venv

$(BIN)/.osteo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(BIN)/.osteo-installed

# The notebooks run under the minutes-long smoke profile in the tests (nbval).
test: venv
	OSTEO_PROFILE=smoke $(BIN)/python -m pytest -q

reproduce: venv
	$(BIN)/osteo reproduce --profile $(PROFILE)

clean-venv:
	rm -rf $(VENV)
