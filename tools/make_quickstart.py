"""Write notebooks/quickstart.ipynb (no outputs) from the cells below: edit here, rerun, commit both."""

from __future__ import annotations

from pathlib import Path

import nbformat

CELLS = [
    ("md", """# Quickstart: trace and edit one fact from both perspectives

On the embedded SmolLM2-135M, on a CPU, in a few minutes: load the model, trace one CounterFact fact
from the **entity** perspective (corrupt the subject) and the **relation** perspective (corrupt the
relation tokens), edit it with ROME from both perspectives, score both sides before and after, look at
greedy generations before and after, and check that the model is restored bit for bit.

Every setting comes from `conf/` through `pipeline.api` (as `python -m pipeline.run` composes it);
keyword arguments override it. Caches (the converted model, statistics, templates) go to one
user-level directory (`$KLOC_CACHE_DIR`, else `~/.cache/knowledge-localization`), shared by every folder."""),
    ("code", """import matplotlib.pyplot as plt
import pandas as pd
import torch

from editors import build_editor, entity_request
from facts import load_facts
from models import load_model
from models.predict import greedy_continuations
from pipeline.api import dataset_config, edit_and_evaluate, editor_config, paths_config, trace_settings
from tracing import trace_fact
from tracing.plots import plot_trace

MODEL = "smollm2_135m"
loaded = load_model(MODEL)  # converted once into the cache dir
print(paths_config()["cache_dir"])"""),
    ("md", "## One CounterFact fact with a known relation (needed by relation edits)"),
    ("code", """facts = [fact for fact in load_facts(dataset_config("counterfact", limit=20)) if fact.relation_id]
fact = facts[0]
fact"""),
    ("md", """## Causal trace from both perspectives

Few noise samples and hidden states only, to stay fast; `trace_settings()` without overrides is the
trace stage's configuration (10 samples, hidden/MLP/attention, severed traces)."""),
    ("code", """settings = trace_settings(model=MODEL, samples=2, kinds=["hidden"], severed=False)
traces = {perspective: trace_fact(loaded, fact, perspective, settings=settings) for perspective in ("entity", "relation")}
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, (perspective, result) in zip(axes, traces.items()):
    plot_trace(result, "hidden", ax=ax)
    ax.set_title(f"{perspective}: p={result.p_clean:.2f} clean, {result.p_corrupted:.2f} corrupted")
fig.tight_layout()"""),
    ("md", """## ROME from both perspectives, both sides scored before and after

`editor_config` adds SmolLM2's layer and statistics size (`conf/editor_model/rome_smollm2_135m.yaml`);
a small statistics sample keeps the first run short (it is cached afterwards). The entity edit
rewrites (s, r) -> o*; the relation edit rewrites the relation's phrase (the authors' RaKE requests)."""),
    ("code", """rome = editor_config("rome", model=MODEL, **{"stats.n_samples": 200, "stats.max_tokens": 128})
outcomes = {perspective: edit_and_evaluate(loaded, [fact], editor=rome, perspective=perspective,
                                           n_resamples=100, quality={"enabled": False})
            for perspective in ("entity", "relation")}
print(outcomes["entity"].markdown())"""),
    ("code", """tidy = pd.concat([pd.DataFrame(outcome.tidy()).assign(perspective=perspective)
                  for perspective, outcome in outcomes.items()])
tidy.pivot_table(index="metric", columns=["perspective", "when"], values="value")"""),
    ("md", "## Generations before and after the entity edit, and the restore"),
    ("code", """prompts = [fact.prompt, f"{fact.subject} speaks"]
before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
editor = build_editor(rome, cache_dir=paths_config()["cache_dir"])
generations = {"before": greedy_continuations(loaded, prompts, 12, progress=False)}
with editor.apply(loaded, [entity_request(fact)]):  # the edit is in force inside the block only
    generations["after"] = greedy_continuations(loaded, prompts, 12, progress=False)
pd.DataFrame(generations, index=prompts)"""),
    ("code", """restored = all(torch.equal(p, before[name]) for name, p in loaded.model.named_parameters())
print("restored bit for bit:", restored)
assert restored"""),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
                      for kind, text in CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
    nbformat.write(build(), path)
    print(path)
