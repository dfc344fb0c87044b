# loraswap: train QLoRA task adapters, serve them, test and benchmark.
# Every target runs inside .venv, which `make setup` builds (quick when already done).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
BASE ?= models/demo-base
DEMO_TASKS := sentiment count last json
ADAPTERS_DIR ?= adapters/store
export ADAPTERS_DIR

# Optional overrides for `make train`: NAME DATA BASE R ALPHA LR EPOCHS MAX_STEPS BATCH ACCUM
# MAX_LENGTH LAST_LAYERS EVAL_DATA CONFIG, and ARGS for any other flag of `python -m train --help`.
opt = $(if $($(1)),$(2) $($(1)))
TRAIN_FLAGS = --name $(NAME) --data $(DATA) --base $(BASE) \
	$(call opt,CONFIG,--config) $(call opt,R,--r) $(call opt,ALPHA,--alpha) $(call opt,LR,--lr) \
	$(call opt,EPOCHS,--epochs) $(call opt,MAX_STEPS,--max-steps) $(call opt,BATCH,--micro-batch-size) \
	$(call opt,ACCUM,--grad-accum) $(call opt,MAX_LENGTH,--max-length) $(call opt,LAST_LAYERS,--last-layers) \
	$(call opt,EVAL_DATA,--eval-data) $(ARGS)

.PHONY: FORCE setup base data demo-adapters train params-table test test-fast check-invariance demo verify bench-serve bench-train bench-train-serving bench-grammar bench-many bench-gpu serve serve-list serve-vllm screenshots sweep techniques eval clean-demo help

help:
	@echo "make demo            set up, build the demo base and adapters if missing or stale, start the server"
	@echo "make serve           the web UI and OpenAI-compatible API on 127.0.0.1:7860 (HOST= PORT= SERVE_ARGS=)"
	@echo "make test            run the test suite (CPU)"
	@echo "make test-fast       the suite without the tests marked slow (under a minute)"
	@echo "make check-invariance  1,000 concurrent requests each get their answer alone (URL= a running server)"
	@echo "make base            train the demo base model (models/demo-base)"
	@echo "make demo-adapters   train one adapter per demo task"
	@echo "make train NAME=... DATA=... [BASE= R= ALPHA= LR= EPOCHS= ...]"
	@echo "make params-table    the talk's trainable-parameter table, idealised and exact"
	@echo "make verify          reload every stored adapter with plain peft and recompute its metric"
	@echo "make serve-list      servable and rejected adapters (python -m serve list / chat)"
	@echo "make bench-serve     the engine vs one-at-a-time set_adapter serving (bench/results/serve.json)"
	@echo "make bench-many      100 adapters on one base: distinct adapters per batch, LRU churn, memory (bench/results/many-adapters-*.json)"
	@echo "make bench-grammar   xgrammar vs llguidance for JSON output on the CPU (bench/results/grammar.json)"
	@echo "make bench-train     our training loop vs Trainer (random, length-grouped) and TRL SFTTrainer (padding-free, packed) on the CPU (bench/results/train.json)"
	@echo "make bench-train-serving  batch-1 serving latency without and with a low-priority training run (bench/results/train-while-serving.json)"
	@echo "make bench-gpu       Llama-3.2-1B and 3.1-8B shapes on a GPU; SIZE=tiny runs it on the CPU; STAGES=serving|training; SKIP=\"experiments\" (SKIP=none: all); PROFILE=1 adds profiles"
	@echo "make serve-vllm      the vLLM multi-LoRA launch command for every servable adapter"
	@echo "make sweep NAME= DATA= [RANKS=\"1 2 4 8 16 64\" ALPHAS= LRS=]   one adapter per setting, report in reports/"
	@echo "make techniques NAME= DATA=   QLoRA, LoRA, last-N layers and full fine-tuning, with forgetting"
	@echo "make eval            every adapter and the base on every task: reports/eval.md"

# torch first, pinned: the CPU build on this machine's disk; an open range would pull CUDA.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m serve.kernels  # compile the fused CPU LoRA kernel (~30 s, once) here, not at the first server start
	touch $@

setup: $(VENV)/.installed

# Always asked: demo.base builds the base when missing, rebuilds a demo base trained on an older
# general mix, and otherwise leaves the folder as it is (a real model's folder is never touched).
$(BASE)/config.json: FORCE | setup
	$(PY) -m demo.base --out $(BASE)

FORCE:

base: $(BASE)/config.json

# The generators are seeded: rewriting the data after demo/tasks.py changes costs seconds.
data/%/train.jsonl: demo/tasks.py | setup
	$(PY) -m demo.tasks --out data

data: data/uppercase/train.jsonl

# A rebuilt base (a newer config.json) retrains the demo adapters; the store keeps the old version.
# A task's own recipe, configs/demo/TASK.yaml, holds what differs from configs/demo-adapter.yaml.
$(ADAPTERS_DIR)/%/card.json: $(BASE)/config.json | data/uppercase/train.jsonl
	$(PY) -m train --config configs/demo-adapter.yaml --name $* --base $(BASE) \
		$(if $(wildcard configs/demo/$*.yaml),--config configs/demo/$*.yaml) \
		--data data/$*/train.jsonl --eval-data data/$*/eval.jsonl --adapters $(ADAPTERS_DIR)

demo-adapters: $(foreach t,$(DEMO_TASKS),$(ADAPTERS_DIR)/$(t)/card.json)

train: setup
	@test -n "$(NAME)" -a -n "$(DATA)" || { echo "usage: make train NAME=name DATA=file.jsonl [BASE=... R=... ALPHA=... LR=... EPOCHS=...]"; exit 2; }
	$(PY) -m train $(TRAIN_FLAGS)

params-table: setup
	$(PY) -m experiments params-table $(if $(filter-out $(BASE),models/demo-base),--base $(BASE))

test: setup
	$(PY) -m pytest -q

# The inner loop: everything but the tests marked slow (end-to-end runs, benches, the browser).
# One worker per core (at most four), one intra-op thread each: the fast tier's tests are small
# models whose operators do not amortise a thread pool, so processes beat threads here.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS)

# Every request answered as it is alone, under 1,000 concurrent requests (bench/invariance.py):
# against URL= when given, else a server of each mode started on a free loopback port.
check-invariance: setup $(BASE)/config.json demo-adapters
	$(PY) -m bench.invariance $(if $(URL),--url $(URL),--serve default deterministic --base $(BASE) --adapters $(ADAPTERS_DIR))

bench-serve: setup $(BASE)/config.json demo-adapters
	$(PY) -m bench.serve --base $(BASE) --adapters $(ADAPTERS_DIR)

bench-train: setup $(BASE)/config.json data/uppercase/train.jsonl
	$(PY) -m bench.train --base $(BASE)

# Batch-1 serving latency alone and while a Train-tab run trains at low priority (about two minutes).
bench-train-serving: setup $(BASE)/config.json demo-adapters
	$(PY) -m bench.train_while_serving --base $(BASE) --adapters $(ADAPTERS_DIR)

# xgrammar against llguidance for response_format (bench/results/grammar.json)
# 100 adapters on the demo base: distinct adapters per batch vs the base, LRU churn, memory per adapter.
bench-many: setup $(BASE)/config.json demo-adapters
	$(PY) -m bench.many_adapters --base $(BASE) --adapters $(ADAPTERS_DIR)

bench-grammar: setup $(BASE)/config.json
	$(PY) -m bench.grammar --tokenizer $(BASE) --json bench/results/grammar.json

SIZE ?= 8b 1b
bench-gpu: setup
	$(PY) -m bench.gpu --sizes $(SIZE) $(if $(STAGES),--stages $(STAGES)) $(if $(SKIP),--skip $(SKIP)) $(if $(PROFILE),--profile)

serve-list: setup
	$(PY) -m serve --base $(BASE) --adapters $(ADAPTERS_DIR) list

VLLM_OUT ?= build/vllm
serve-vllm: setup
	$(PY) -m serve --base $(BASE) --adapters $(ADAPTERS_DIR) vllm --out $(VLLM_OUT)

# Evidence for choosing rank and technique (reports/): see the README's "Choosing rank and technique".
RANKS ?= 1 2 4 8 16 64
sweep: setup
	@test -n "$(NAME)" -a -n "$(DATA)" || { echo "usage: make sweep NAME=name DATA=file.jsonl [RANKS=\"1 2 4\" ALPHAS=... LRS=... EVAL_DATA= EPOCHS= MAX_STEPS= CONFIG=]"; exit 2; }
	$(PY) -m experiments sweep --ranks $(RANKS) $(if $(ALPHAS),--alphas $(ALPHAS)) $(if $(LRS),--lrs $(LRS)) $(TRAIN_FLAGS)

techniques: setup
	@test -n "$(NAME)" -a -n "$(DATA)" || { echo "usage: make techniques NAME=name DATA=file.jsonl [LAST_N=2 EVAL_DATA= EPOCHS= CONFIG=]"; exit 2; }
	$(PY) -m experiments techniques --last-n $(or $(LAST_N),2) $(TRAIN_FLAGS)

eval: setup
	$(PY) -m experiments eval --base $(BASE) --adapters $(ADAPTERS_DIR) --data-dir data

verify: setup
	$(PY) -m train.verify --adapters $(ADAPTERS_DIR)

demo: setup $(BASE)/config.json demo-adapters serve

HOST ?= 127.0.0.1
PORT ?= 7860
# SERVE_ARGS: any other flag of `python -m serve web --help` (--auth, --api-key, --max-queue ...).
serve: setup
	$(PY) -m serve --base $(BASE) --adapters $(ADAPTERS_DIR) web --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# The README's screenshots, from a running `make serve` (the demo base and adapters).
screenshots: setup
	$(PY) -m tests.ui_tour --url http://$(HOST):$(PORT) --out docs/screenshots

clean-demo:
	rm -rf $(BASE) data $(ADAPTERS_DIR) runs
