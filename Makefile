# Two commands: `make demo` (set up, run the depth challenge offline, print its report) and `make test`;
# CI also runs `make rehearse` (the GPU check, rehearsed on this CPU).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install slurm demo test rehearse bench clean

# The stamp is rebuilt when the dependencies change, so `make test` also updates an old .venv.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The challenge's runs train side by side, one process per core with one thread each: these nets are thin
# and deep, so a step is mostly per-layer work that a second thread barely shortens (BENCHMARKS.md).
DEMO_JOBS ?= $(shell nproc 2>/dev/null || echo 1)

demo: $(STAMP)
	$(VENV)/bin/depthbench sweep configs/challenge.yaml --jobs $(DEMO_JOBS)
	$(VENV)/bin/depthbench report runs/challenge

# The cluster tests start a real one-node SLURM from Debian's packages (scripts/slurm_cluster.sh); they are
# installed here when missing, where root and apt-get allow it, and those tests skip, saying why, elsewhere.
slurm:
	@bash scripts/slurm_cluster.sh install || echo "note: SLURM is not installed; the SLURM cluster tests will be skipped"

test: $(STAMP) slurm
	$(PY) -m pytest -q

# The GPU check (scripts/gpu_check.sh) on this CPU: tiny sizes, a fresh venv without pydantic, wheels
# fetched for this Python; keeps the check that a GPU machine runs once working. A few minutes.
rehearse: $(STAMP)
	bash scripts/gpu_check.sh --rehearse

clean:
	rm -rf $(VENV) .pytest_cache
