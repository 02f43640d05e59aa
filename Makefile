# Two commands do all the set-up (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU/CUDA wheels pip finds for these pins; keep torch within the range pyproject allows.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# No wheel cache: torch's CUDA wheels are several GB, and a second copy in ~/.cache/pip has filled a CI disk.
PIP_FLAGS ?= --no-cache-dir

.PHONY: demo test browser install lint bench bench-scale clean

$(BIN)/vlmindex: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install --quiet $(PIP_FLAGS) $(TORCH)
	$(BIN)/pip install --quiet $(PIP_FLAGS) '.[test,ocr,serve,explore]'
	@touch $@

install: $(BIN)/vlmindex

demo: install
	$(BIN)/vlmindex demo

# The browser tests need Debian's chromium: installed when possible, else a one-line stop, before anything else.
browser:
	@./scripts/ensure-chromium

test: browser install
	$(BIN)/pip install --quiet $(PIP_FLAGS) --no-deps --force-reinstall .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_embed.py
	$(BIN)/python benchmarks/bench_index.py
	$(BIN)/python benchmarks/bench_serve.py

# analyze at 25k/50k/100k x 512 against the floor of exact ranking: builds its workspaces (minutes), then ~15 min.
bench-scale: install
	$(BIN)/python benchmarks/bench_analyze_scale.py --keep .bench-scale

clean:
	rm -rf $(VENV) build dist vlmindex-workspace .bench-scale
