# Two commands do everything from a fresh clone:
#   make demo   set up .venv (torch pinned, overridable) and run the digits demo
#   make test   set up .venv and run the whole test suite (browser tests included)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint browser-deps bench-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[notebook,dev,text,hf]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tda-explorer demo --out tda_output

browser-deps:
	@test -x /usr/bin/chromium || { echo "installing chromium from Debian's packages"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: browser tests will be skipped"; }

# One torch thread per process in the test run: the suite runs pytest, notebook kernels, JupyterLab and
# Chromium side by side on few cores, where torch's own thread pool oversubscribes them badly.
test: setup browser-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench-deps: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pip install --quiet --no-deps "dattri==0.3.0"
	$(PY) -m pip install --quiet --no-deps "kronfluence==1.0.1" "accelerate==1.15.0" "einconv==0.1.0"
	$(PY) -m pip install --quiet --no-deps "dattri-llm==0.1.0"

bench: bench-deps
	$(PY) benchmarks/bench_accuracy.py --json benchmarks/results/accuracy_cpu.json
	$(PY) benchmarks/bench_speed.py --json benchmarks/results/speed_cpu.json
	$(PY) benchmarks/bench_influence.py --json benchmarks/results/influence_cpu.json
	$(PY) benchmarks/bench_removal.py --json benchmarks/results/removal_cpu.json
	$(PY) benchmarks/bench_scale.py --json benchmarks/results/scale_cpu.json
	$(PY) benchmarks/bench_trajectory.py --json benchmarks/results/trajectory_cpu.json
	$(PY) benchmarks/bench_inrun.py --json benchmarks/results/inrun_cpu.json
	$(PY) benchmarks/bench_access.py --json benchmarks/results/access_cpu.json
	$(PY) benchmarks/bench_valuation.py --json benchmarks/results/valuation_cpu.json
	$(PY) benchmarks/peer_less.py --live --json benchmarks/results/less_peer_cpu.json

lint: setup
	$(VENV)/bin/ruff check tda_explorer tests benchmarks notebooks

clean:
	rm -rf $(VENV) tda_output .pytest_cache
