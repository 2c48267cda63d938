# surveypipe: two commands do all the set-up on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SP := $(VENV)/bin/surveypipe
DEMO ?= data/demo
DEMO_OUT ?= out/demo
WORKERS ?=
PYTEST_ARGS ?=
BENCH_OUT ?= out/bench

.PHONY: install install-dev system-packages run test test-fast bench models clean help

help:
	@echo "make run     install and run the main job on a small mock release (LocalCluster)"
	@echo "make test    install everything and run the test suite (starts a local SLURM as root)"
	@echo "make bench   science and performance benchmarks (prints figures and ratios)"
	@echo "make models  retrain every shipped ONNX model (writes stages/models/*)"

$(VENV)/.stamp-runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[sim]'
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-runtime
	$(PY) -m pip install -q -e '.[sim,train,dev,hats]'
	touch $@

install: $(VENV)/.stamp-runtime

install-dev: $(VENV)/.stamp-dev system-packages

# Debian packages the tests and benchmarks use (real SLURM, fitsverify, SExtractor); root only.
system-packages:
	@bash deploy/system-packages.sh

run: install
	@if [ ! -f $(DEMO)/manifest.yaml ]; then \
	  $(SP) simulate --out $(DEMO) --tiles 4 --size 1024 --bands ugrizy --seed 42 --artefacts; fi
	$(SP) run $(DEMO)/manifest.yaml --out $(DEMO_OUT) $(if $(WORKERS),--workers $(WORKERS))
	$(SP) status $(DEMO_OUT)
	$(SP) export $(DEMO_OUT) --format parquet --to $(DEMO_OUT)/catalog.parquet
	$(SP) export $(DEMO_OUT) --format fits --to $(DEMO_OUT)/catalog.fits

test: install-dev
	@if [ "$$(id -u)" = "0" ]; then bash deploy/slurm/local-cluster.sh start || echo "local SLURM did not start: SLURM tests will say why they skip"; fi
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ "$$(id -u)" = "0" ]; then bash deploy/slurm/local-cluster.sh stop >/dev/null 2>&1 || true; fi; exit $$rc

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow and not slurm and not training" $(PYTEST_ARGS)

# Two lanes side by side (every ratio a bench prints is measured inside its own lane:
# ours vs SExtractor, ONNX Runtime vs PyTorch), then the performance bench alone, since it times
# 1 and 2 workers. Each lane's report is printed when the lanes are done; logs in $(BENCH_OUT)/*.log.
bench: install-dev
	mkdir -p $(BENCH_OUT)
	@start=$$(date +%s); \
	( $(SP) bench science --out $(BENCH_OUT)/science && \
	  $(SP) bench science --artefacts --out $(BENCH_OUT)/science_artefacts && \
	  $(SP) bench artefacts --out $(BENCH_OUT)/artefacts && \
	  $(SP) bench deeplearning --jobs 1 --out $(BENCH_OUT)/deeplearning ) > $(BENCH_OUT)/lane1.log 2>&1 & l1=$$!; \
	( $(SP) bench photoz --workdir $(BENCH_OUT)/photoz_mock --out $(BENCH_OUT)/photoz ) \
	  > $(BENCH_OUT)/lane2.log 2>&1 & l2=$$!; \
	wait $$l1; r1=$$?; wait $$l2; r2=$$?; cat $(BENCH_OUT)/lane1.log $(BENCH_OUT)/lane2.log; \
	$(SP) bench performance --out $(BENCH_OUT)/performance; r3=$$?; \
	echo "make bench: $$(( $$(date +%s) - start )) s wall"; exit $$(( r1 || r2 || r3 ))

models: install-dev
	A=out/train/artefacts; $(SP) train artefacts --out $$A/m2 --steps 5500 && \
	  $(SP) train artefacts --out $$A/m3 --init $$A/m2/model.pt --init-card $$A/m2/card.json --steps 0 && \
	  $(SP) train artefacts --out $$A/m4 --init $$A/m3/model.pt --init-card $$A/m3/card.json --steps 3000 --lr 1e-3 && \
	  $(SP) train artefacts --out stages/models/artefacts --init $$A/m4/model.pt --init-card $$A/m4/card.json --steps 0 --finetune-steps 3000
	$(SP) train photoz --mock --workdir out/photoz_mock_v7 --out stages/models/photoz
	$(SP) train morphology --out stages/models/morphology
	L=out/train/lenses; T="--train-scale 2 --epochs 12 --lr 1e-3 --val-negatives 30000 --threads 1 --workdir $$L/ts2_cache"; \
	  $(SP) train lenses --out $$L/ts2_e36 --train-scale 2 --epochs 36 --threads 1 --val-negatives 30000 --workdir $$L/ts2_cache && \
	  $(SP) train lenses --out $$L/ts2_hn1 --init $$L/ts2_e36 --hard-negatives 3000 --mine-pool 100000 --mine-random 15000 \
	    --mine-seed 1300 $$T && \
	  $(SP) train lenses --out $$L/ts2_hn2 --init $$L/ts2_hn1 --hard-negatives 5000 --mine-pool 100000 --mine-random 10000 \
	    --mine-seed 1310 $$T && \
	  $(SP) train lenses --out $$L/ts2_hn3 --init $$L/ts2_hn2 --hard-negatives 5000 --mine-pool 200000 --mine-random 20000 \
	    --mine-seed 1320 $$T && \
	  $(SP) train lenses --out $$L/ts2_hn4 --init $$L/ts2_hn3 --hard-negatives 5000 --mine-pool 200000 --mine-random 20000 \
	    --mine-seed 1340 $$T && \
	  cp $$L/ts2_hn4/model.onnx $$L/ts2_hn4/model.pt $$L/ts2_hn4/screen.onnx $$L/ts2_hn4/card.json $$L/ts2_hn4/README.md \
	    stages/models/lenses/

clean:
	rm -rf out data/demo .pytest_cache
