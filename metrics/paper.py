"""The paper's reported numbers and claims, as plain constants, so reports can print them next to ours.

Wei et al., "Does Knowledge Localization Hold True? Surprising Differences Between Entity and
Relation Perspectives in Language Models", CIKM 2024, arXiv 2409.00617.

Where the editing numbers come from: the paper's editing table could not be read from the stored
copies available to this project (only the title page and abstract of arXiv 2409.00617v1 were
reachable). The values below are the ones hard-coded by the authors in their code release,
github.com/weiyifan1023/RaKE (the repository GitHub describes as "Code and Data for CIKM 2024 Paper
..."), file ``experiments/summarize.py``, commit 7a1e6f7 (2023-11-16), the ``__main__`` block:
pairs printed as ``"<EDITOR> Efficacy "`` and ``"<EDITOR> Generalization "`` under the headings
"Entity Perspective" and "Relation Perspective". Each pair is ``[entity side, relation side]`` in %
(the same-perspective side is the one near 100: e.g. ROME entity edits 99.93 on the entity side,
MEND relation edits 100.0 on the relation side). In that script Efficacy is the rewrite-prompt
success rate (our reliability) and Generalization the paraphrase success rate (our generality).
The block does not name the model; the repository's default model (``--model_name``) is gpt2-xl,
so these are taken as GPT-2 XL. Not found anywhere reachable: locality / specificity per side,
and any GPT-J numbers, so none are given.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_MODEL = "gpt2-xl"
PAPER_SOURCE = "Wei et al. 2024 (arXiv 2409.00617); values from the authors' RaKE repository, experiments/summarize.py @7a1e6f7"

Key = tuple[str, str, str]  # (editor, perspective of the edit, side scored)

# Reliability (RaKE "Efficacy"), %, GPT-2 XL.
PAPER_RELIABILITY: dict[Key, float] = {
    ("ft", "entity", "entity"): 99.28, ("ft", "entity", "relation"): 97.19,
    ("kn", "entity", "entity"): 30.45, ("kn", "entity", "relation"): 83.42,
    ("mend", "entity", "entity"): 93.8, ("mend", "entity", "relation"): 97.91,
    ("rome", "entity", "entity"): 99.93, ("rome", "entity", "relation"): 96.12,
    ("memit", "entity", "entity"): 93.88, ("memit", "entity", "relation"): 97.28,
    ("ft", "relation", "entity"): 23.92, ("ft", "relation", "relation"): 98.79,
    ("kn", "relation", "entity"): 22.53, ("kn", "relation", "relation"): 97.52,
    ("mend", "relation", "entity"): 22.33, ("mend", "relation", "relation"): 100.0,
    ("rome", "relation", "entity"): 27.92, ("rome", "relation", "relation"): 99.99,
    ("memit", "relation", "entity"): 24.15, ("memit", "relation", "relation"): 91.36,
}

# Generality (RaKE "Generalization"), %, GPT-2 XL.
PAPER_GENERALITY: dict[Key, float] = {
    ("ft", "entity", "entity"): 48.21, ("ft", "entity", "relation"): 76.14,
    ("kn", "entity", "entity"): 28.8, ("kn", "entity", "relation"): 72.93,
    ("mend", "entity", "entity"): 58.0, ("mend", "entity", "relation"): 76.22,
    ("rome", "entity", "entity"): 96.6, ("rome", "entity", "relation"): 74.46,
    ("memit", "entity", "entity"): 79.6, ("memit", "entity", "relation"): 76.0,
    ("ft", "relation", "entity"): 25.44, ("ft", "relation", "relation"): 79.03,
    ("kn", "relation", "entity"): 24.61, ("kn", "relation", "relation"): 76.16,
    ("mend", "relation", "entity"): 24.63, ("mend", "relation", "relation"): 83.24,
    ("rome", "relation", "entity"): 28.12, ("rome", "relation", "relation"): 84.47,
    ("memit", "relation", "entity"): 24.63, ("memit", "relation", "relation"): 76.24,
}

# metric name (as in table_editing.csv) -> values; metrics absent here were not found.
PAPER_EDITING: dict[str, dict[Key, float]] = {"reliability": PAPER_RELIABILITY, "generality": PAPER_GENERALITY}


@dataclass(frozen=True)
class PaperClaim:
    """One localisation claim, with where its wording comes from (``verified``: read in the paper text)."""

    key: str
    text: str
    source: str
    verified: bool


# The abstract (arXiv 2409.00617v1) was read; the section-level wording was not reachable, so the
# per-band claims follow the project's summary of the paper (README, "What the demo figures show").
PAPER_CLAIMS: tuple[PaperClaim, ...] = (
    PaperClaim("prior_mlp", "Prior work localises factual knowledge in MLP weights of intermediate layers.",
               "abstract", True),
    PaperClaim("relation_attention", "Relational knowledge is also significantly encoded in attention modules, "
               "contrary to the view that knowledge is stored in MLP weights.", "abstract", True),
    PaperClaim("no_transfer", "Entity and relational knowledge cannot be directly transferred or mapped to each "
               "other: editing one perspective does not give the other.", "abstract", True),
    PaperClaim("entity_mlp", "Entity perspective: the MLP effect at the last subject token sits in lower/middle "
               "layers (ROME's picture).", "project summary of the causal-tracing section", False),
    PaperClaim("relation_mlp", "Relation perspective: the MLP effect sits in upper layers.",
               "project summary of the causal-tracing section", False),
    PaperClaim("relation_attn", "Relation perspective: attention has an effect in middle-to-upper layers.",
               "project summary of the causal-tracing section", False),
)
