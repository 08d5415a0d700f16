# The two commands of the README. Both set up everything on a fresh machine (a virtual environment with
# the CPU build of PyTorch and this package) and are cheap to repeat once it exists.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/sharpness demo

# Two workers with one thread each: the suite's many small models are faster that way than one worker
# with two threads, and nothing oversubscribes the two cores.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) runs .pytest_cache
