# Two commands: `make demo` (set up, run the offline demo sweep, print its report) and `make test`;
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

demo: $(STAMP)
	$(VENV)/bin/depthbench sweep configs/demo.yaml
	$(VENV)/bin/depthbench report runs/demo

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
