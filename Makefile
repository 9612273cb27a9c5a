# The two commands (see README.md):
#   make study   run the study (PROFILE=quick by default; full; third; device on a GPU machine), the
#                analysis notebook and the report
#   make test    run the whole test suite (unit tests, simulator kernels, PTX, notebooks)
# Each creates .venv and installs the pinned requirements the first time; after that the
# stamp file makes them start at once.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
# TORCH=1 adds the optional PyTorch contender (requirements-bench.txt: the CPU build of torch,
# which the benchmark and the study's baselines use where it is installed, and whose tests
# otherwise skip); CI sets it
TORCH   ?=
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml $(if $(TORCH),requirements-bench.txt) | cksum | cut -d' ' -f1)
PROFILE ?= quick
# the quick profile writes under results/quick so it never overwrites the committed results
# (those of the full profile, or of the third edition's, which replaces them)
MAIN    := $(filter full third,$(PROFILE))
RESULTS ?= $(if $(MAIN),results,results/$(PROFILE))

.PHONY: study test report bench venv clean

venv: $(STAMP)

# The pinned requirements first, then the package itself in editable mode (its dependencies
# are already there, so --no-deps): notebooks, scripts, tests and the study's child processes
# import `cnn` as an installed package, from this checkout.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	$(if $(TORCH),$(PY) -m pip install --disable-pip-version-check -q -r requirements-bench.txt)
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest

study: $(STAMP)
	mkdir -p $(RESULTS)
	$(PY) -m papermill --cwd notebooks notebooks/project.ipynb $(RESULTS)/project.ipynb \
	    -p profile $(PROFILE) -p out ../$(RESULTS)/df_results.pkl $(if $(CNN_DATA_DIR),-p data_root $(abspath $(CNN_DATA_DIR)))
	$(PY) -m papermill --cwd notebooks notebooks/results.ipynb $(RESULTS)/results.ipynb \
	    -p results_path ../$(RESULTS)/df_results.pkl -p figures_dir ../$(RESULTS)/figures \
	    -p summary_dir ../$(RESULTS) $(foreach m,$(MERGE),-y "merge: [../$(m)]")
	$(MAKE) report PROFILE=$(PROFILE)

# the full report merges another machine's results (the device profile) when they exist
MERGE := $(if $(MAIN),$(wildcard results/device/df_results.pkl))

report: $(STAMP)
	$(PY) -m cnn report --results $(RESULTS)/df_results.pkl --out $(if $(MAIN),report/report.pdf,$(RESULTS)/report.pdf) $(foreach m,$(MERGE),--merge $(m))

bench: $(STAMP)
	$(PY) -m cnn bench

clean:
	rm -rf $(VENV) .pytest_cache
