# imagenet-pipeline: `make demo` runs the whole pipeline on a built-in mini ILSVRC12;
# `make test` sets up .venv and runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test proto demo up down screenshots clean help

help:
	@echo "make install  create $(VENV) with the project, its 'imagenet' command and test tools"
	@echo "make test     install, then run the whole test suite"
	@echo "make demo     run the full pipeline on a mini ILSVRC12 built on the fly"
	@echo "make up       start a local Prefect server + worker and deploy prefect.yaml (make down stops them)"
	@echo "make screenshots  the README's UI pictures (docs/images/) from headless Chromium, after make up + mini-pipeline"
	@echo "make proto    regenerate data/proto/caffe_pb2.py from data/proto/caffe.proto"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

proto: $(STAMP)
	$(BIN)/python -m data.proto.generate

# The whole pipeline on a mini ILSVRC12 served from 127.0.0.1 (data under demo-data/, git-ignored);
# a second run reuses every finished stage.
demo: $(STAMP)
	$(BIN)/python -m flows.demo

# A local Prefect server (127.0.0.1:$(PREFECT_PORT)), the work pool, `prefect deploy --all` and a
# worker; PIDs and logs in .run/. It prints the next commands (the README's deployment section).
# Already up: says so, exits 1, touches nothing. `make down` cancels the runs in flight first.
PREFECT_PORT ?= 4200
up: $(STAMP)
	$(BIN)/python -m flows.services up --port $(PREFECT_PORT) --run-dir .run

down:
	$(BIN)/python -m flows.services down --run-dir .run

# The README's pictures of the UI (docs/images/*.png), from Debian's headless Chromium
# (apt-get install -y chromium), against `make up` after an imagenet/mini-pipeline run.
screenshots: $(STAMP)
	$(BIN)/python docs/screenshots.py --api http://127.0.0.1:$(PREFECT_PORT)/api

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
