# osteo-kit: one-step setup and the two main jobs.
#   make reproduce   set up .venv and run the whole notebook batch (profile: auto)
#   make test        set up .venv and run the test suite
#   make lab         set up .venv and open the notebooks in JupyterLab (make lab PROFILE=smoke)
PYTHON  ?= python3
VENV    ?= .venv
# PyTorch is installed first and pinned: these are the releases the kit is tested with.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= auto
BIN     := $(VENV)/bin
# Metadata that JupyterLab writes on save and that git should not keep (the kernel's exact version etc.)
NB_EXTRA_KEYS := metadata.language_info.codemirror_mode metadata.language_info.file_extension \
	metadata.language_info.mimetype metadata.language_info.nbconvert_exporter \
	metadata.language_info.pygments_lexer metadata.language_info.version
NBSTRIPOUT = "$(abspath $(BIN))/python" -m nbstripout --keep-id

.PHONY: venv hooks kernel test reproduce lab clean-venv

$(BIN)/.osteo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(BIN)/.osteo-installed hooks

# The notebooks are committed without outputs: this git filter (nbstripout; .gitattributes names
# it) strips outputs, execution counts and run metadata whenever a notebook is added, committed or
# diffed, so a notebook saved in JupyterLab shows only its source edits in `git diff`. Cell ids are
# kept, so an inserted cell does not renumber the others.
hooks: $(BIN)/.osteo-installed
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		$(BIN)/nbstripout --install --attributes .gitattributes && \
		git config filter.nbstripout.clean '$(NBSTRIPOUT)' && \
		git config diff.ipynb.textconv '$(NBSTRIPOUT) -t' && \
		git config filter.nbstripout.extrakeys '$(NB_EXTRA_KEYS)' && \
		echo "git filter nbstripout installed: committed notebooks stay without outputs"; \
	else echo "not a git checkout: no nbstripout filter installed"; fi

# The notebooks name the kernel osteo-kit: this registers it (for this user) as the Python of .venv,
# so the notebooks run with the kit from any Jupyter, not only from `make lab`.
kernel: $(BIN)/.osteo-installed
	$(BIN)/python -m ipykernel install --user --name osteo-kit --display-name "osteo-kit"

# The notebooks run under the minutes-long smoke profile in the tests (nbval).
test: venv kernel
	OSTEO_PROFILE=smoke $(BIN)/python -m pytest -q

reproduce: venv
	$(BIN)/osteo reproduce --profile $(PROFILE)

# JupyterLab from the kit's environment, on notebooks/. PROFILE=smoke|laptop|paper sets the profile
# the notebooks pick (OSTEO_PROFILE); the default, auto, lets each notebook choose (paper with a
# CUDA GPU, else laptop).
lab: venv kernel
	$(if $(filter-out auto,$(PROFILE)),OSTEO_PROFILE=$(PROFILE)) $(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean-venv:
	rm -rf $(VENV)
