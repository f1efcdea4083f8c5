# The two commands of the README: `make train` and `make test`.  Both install
# what is missing (a .venv in the repo root, pinned versions from setup.cfg).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
# Test processes: 2 overlaps one worker's XLA compiles with the other's runs
# (~25% faster on the 2-core CI machine); more workers need more memory.
TEST_WORKERS ?= 2

.PHONY: install train test bench lint clean check-install

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Main job on the bundled default (Hope tiny); extra flags via ARGS="...".
train: install
	$(PY) -m nl_jax train $(ARGS)

# --dist loadscope keeps a module's tests on one worker (module-scoped fixtures run once).
test: install
	$(PY) -m pytest tests -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope

bench: install
	mkdir -p runs/bench
	$(PY) -m nl_jax bench memory --json runs/bench/memory.json
	$(PY) -m nl_jax bench optimizers --json runs/bench/optimizers.json
	$(PY) -m nl_jax bench schedules --json runs/bench/schedules.json
	$(PY) -m nl_jax bench throughput --json runs/bench/throughput.json

# pip install . into a fresh venv and run `python -m nl_jax bench optimizers` from
# another folder (slow, downloads the pinned wheels; not part of `make test`).
check-install:
	bash tests/check_install.sh

lint: install
	$(PY) -m pip install --quiet --disable-pip-version-check ruff==0.17.6
	$(VENV)/bin/ruff check nl_jax kernels experiments tests

clean:
	rm -rf runs/token_cache .pytest_cache
