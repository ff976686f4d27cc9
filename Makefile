# Strata: `make run` serves the example Django site; `make test` runs every test.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CARGO  ?= cargo

.PHONY: run test lint bench fuzz build venv clean

## run: build, prepare the example site, serve it on http://127.0.0.1:8000/ (admin on :9000),
## on a private PostgreSQL (var/postgres) through the pooler when the machine has one
run: venv build
	bash scripts/run-example.sh

## test: Rust unit tests, then end-to-end tests of the real binary against real applications
test: venv
	$(CARGO) build --locked
	$(CARGO) test --workspace --locked
	$(CARGO) test --locked -p strata-appserver --features loom --lib queue::model
	$(PY) -m pytest tests -q

## lint: formatting and clippy, warnings denied
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy --locked -p strata-appserver --features loom --tests -- -D warnings

## bench: each tier against the tool it replaces, side by side (installs them for the run)
bench: build
	bash benches/appserver.sh
	bash benches/deploy.sh
	bash benches/accelerator.sh
	bash benches/cache.sh
	bash benches/dbpool.sh
	bash benches/lb.sh
	bash benches/lb-instructions.sh
	bash benches/app-instructions.sh
	bash benches/dbpool-instructions.sh

## fuzz: every fuzz target for 30 s (FUZZ_SECONDS) on its committed corpus; needs nightly
fuzz:
	bash fuzz/run.sh

build:
	$(CARGO) build --release --locked

venv: $(VENV)/.installed

$(VENV)/.installed: tests/requirements.txt crates/appserver/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -e crates/appserver/python
	touch $@

clean:
	$(CARGO) clean
	rm -rf $(VENV) example/db.sqlite3 var
