# cde-workbench: `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test soak bench dashboard lab install system-deps check-generated clean-demo airflow-test demo-postgres wheels docker-test

$(STAMP): requirements.txt setup.py settings.ini
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

## Debian packages the tests need (PostgreSQL server binaries, Chromium), installed only when missing
system-deps:
	@bash scripts/system-deps.sh

## fail when nbdev_export or nbdev_clean would change the tree
check-generated: install
	@bash scripts/check-generated.sh

demo: install
	$(VENV)/bin/cde demo

# Tests run side by side (nbdev_test's two workers; a test beside the servers it started): one OpenMP thread each.
# Otherwise scikit-learn's histogram boosting spins for cores another process holds: one small training took 56 s
# instead of 4 s on a busy two-core machine.
test soak: export OMP_NUM_THREADS ?= 1

## the fast tier on two workers (pytest-xdist), each test file whole on one worker: a module's server (the dashboard's, say)
## is started once, and the session's fixtures (the small trained store, PostgreSQL) once per worker. 301 s against 568 s
## serially on the 2-core development machine.
test: install system-deps check-generated
	$(VENV)/bin/nbdev_test --n_workers 2
	$(VENV)/bin/pytest -q -n 2 --dist loadfile -m "not slow" tests

## the long system tests (marked slow): the demo end to end, kills, overload and SIGTERM faults, CLI round trips, and the
## MLLP SIGKILL soak at full size (20,000 messages). CI runs `make test` and then this.
soak: install system-deps
	CDE_SOAK=1 $(VENV)/bin/pytest -q -m slow tests

bench: install
	$(PY) benchmarks/run.py

dashboard: install
	$(VENV)/bin/cde dashboard

## JupyterLab for researchers on 127.0.0.1 (research/: the getting-started notebook, the deployments' pipelines)
lab: install
	$(VENV)/bin/cde lab

## the generated Airflow DAGs (`cde schedule export-airflow`) loaded by Airflow's own DagBag, in a virtual environment of
## their own (.venv-airflow: Airflow 2.10.5 and its papermill provider). Not part of `make test`: Airflow is large.
airflow-test: install
	@bash scripts/airflow-test.sh

## `cde demo`, unchanged, against a throwaway PostgreSQL on 127.0.0.1 (stopped when the demo ends, on SIGTERM or Ctrl-C)
demo-postgres: install system-deps
	$(PY) scripts/demo-postgres.py

## the wheelhouse the images install from, offline (pip --no-index): every requirement and the workbench's own wheel
## WHEELS_PYTHON: the oldest Python the images run (Debian bookworm's 3.11.2): wheels that need a newer one are joined by
## versions that fit it (pip download for that version and the manylinux platforms), so any 3.11 base installs offline
WHEELS_PYTHON ?= 3.11.2
WHEELS_PLATFORMS := $(foreach v,5 12 17 24 27 28 31 34 35 36,--platform manylinux_2_$(v)_x86_64) --platform manylinux2014_x86_64 --platform linux_x86_64
wheels: install
	$(PY) -m pip wheel --quiet --disable-pip-version-check -r requirements.txt -w wheelhouse
	$(PY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version $(WHEELS_PYTHON) --implementation cp \
	  --abi cp311 --abi abi3 --abi none $(WHEELS_PLATFORMS) --find-links wheelhouse -d wheelhouse -r requirements.txt
	rm -f wheelhouse/cde_workbench-*.whl
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps . -w wheelhouse
	cp requirements.txt wheelhouse/requirements.txt

## the images and the stack on a local dockerd, from a debootstrap'ed Debian base (no registry): up, score, dashboard,
## JupyterLab, down. Long (minutes), so outside `make test`; needs root for dockerd and debootstrap.
docker-test: wheels
	bash scripts/docker-test.sh
