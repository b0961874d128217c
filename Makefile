# scdm — two commands on a fresh machine: `make demo` and `make test`.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORE  ?= store/demo.zarr
OUT    ?= results/demo
JOBS   ?= 2

.PHONY: install demo demo-all test bench lint clean

install: $(VENV)/.installed

# torch first, pinned to the CPU build (an unpinned torch pulls several GB of CUDA wheels)
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install  ## embed the real PC9 cells (pca, hvg, MiniLM) and score them: pooled 10-fold
	$(BIN)/scdm-embed extract gse149214_pc9 --dataset pc9 --model pca --store $(STORE)
	$(BIN)/scdm-embed extract gse149214_pc9 --dataset pc9 --model hvg --store $(STORE)
	$(BIN)/scdm-embed extract gse149214_pc9 --dataset pc9 --model lm --checkpoint minilm --store $(STORE) --option n_genes=48
	$(BIN)/scdm-embed inspect $(STORE)
	$(BIN)/scdm-eval run --store $(STORE) --scheme pooled --by all --folds 10 --classifier mlp --classifier xgboost --classifier logreg --out $(OUT)

test: install
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(JOBS) --dist loadfile

bench: install
	$(BIN)/python bench/run_all.py

demo-all: install  ## every model (fixture / official-layout checkpoints) on the real PC9 cells, one results table
	OMP_NUM_THREADS=2 $(BIN)/python bench/extract_all.py

lint: install
	$(BIN)/ruff check scdm_embed scdm_eval tests bench

clean:
	rm -rf $(STORE) $(OUT) bench/_out
