# The README's commands. Each sets up the pinned environment in .venv on first use
# (tools/setup_env.sh; a fresh machine compiles mmcv, ~15 min) and is instant afterwards.
PY := .venv/bin/python

.PHONY: setup demo test lint bench
setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports

test: lint
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) benchmarks/bench_engine.py $(ARGS)
