"""The edit stage's model-quality scores: fluency, held-out NLL, the collapse flag and examples.md.

Per case and per side (pre, post): greedy generations from the case's first
``n_generation_prompts`` prompts (the rewrite prompt, then its paraphrases: the bundled CounterFact
has no separate generation prompts), their fluency (``metrics.quality.ngram_entropy``), and the
mean NLL of the held-out WikiText slice (``facts.heldout``, ``models.scoring.stream_nll``). The
unedited model is the same for every case, so the pre-edit NLL is computed once per job; the
post-edit NLL once per edit (a MEMIT group shares it). Cost per case on a CPU:
``n_generation_prompts x max_new_tokens`` greedy steps per side and one pass over
``nll_tokens`` tokens per edit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor

from facts.heldout import heldout_tokens
from metrics.quality import CollapseThresholds, is_collapsed, ngram_entropy
from models.load import LoadedModel
from models.predict import greedy_continuations
from models.scoring import stream_nll
from pipeline.stages.config import QualitySettings

FLUENCY, NLL, COLLAPSED = "quality.fluency", "quality.nll", "quality.collapsed"
GENERATIONS = "generations"  # row key of the generated texts (cases.jsonl, examples.md; never aggregated)


def generation_prompts(case: Any, n: int) -> list[str]:
    """The first ``n`` of the case's rewrite prompt and paraphrase prompts (duplicates dropped)."""
    fact = case.fact
    return list(dict.fromkeys([fact.prompt, *fact.paraphrase_prompts]))[:n]


class QualityScorer:
    """Scores the model as it is now; holds the held-out tokens (tokenized once, cached on disk)."""

    def __init__(self, loaded: LoadedModel, settings: QualitySettings, cache_dir: str | Path | None = None,
                 data_dir: str | Path | None = None) -> None:
        self.loaded, self.settings = loaded, settings
        self.tokens: Tensor = heldout_tokens(loaded, settings.heldout(), cache_dir, data_dir)

    def nll(self) -> float:
        return stream_nll(self.loaded, self.tokens, window=self.settings.nll_window)

    def score(self, cases: Sequence[Any], nll: Optional[float] = None) -> list[dict[str, Any]]:
        """Per case ``{quality.fluency, quality.nll, generations}``; ``nll`` reuses a value of this same model."""
        nll = self.nll() if nll is None else nll
        prompts = [generation_prompts(case, self.settings.n_generation_prompts) for case in cases]
        flat = [prompt for group in prompts for prompt in group]
        texts = iter(greedy_continuations(self.loaded, flat, self.settings.max_new_tokens, batch_size=16, progress=False))
        rows = []
        for group in prompts:
            generated = [next(texts) for _ in group]
            rows.append({FLUENCY: ngram_entropy(generated), NLL: nll,
                         GENERATIONS: [{"prompt": p, "text": t} for p, t in zip(group, generated)]})
        return rows


def collapsed(pre: dict[str, Any], post: dict[str, Any], thresholds: CollapseThresholds) -> bool:
    """``metrics.quality.is_collapsed`` of one case's pre and post rows."""
    return is_collapsed(pre.get(NLL), post.get(NLL), pre.get(FLUENCY), post.get(FLUENCY), thresholds)


def _number(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render_examples(rows: Sequence[dict[str, Any]], facts: dict[Any, Any], n: int, title: str,
                    thresholds: CollapseThresholds) -> str:
    """``examples.md``: the first ``n`` cases' prompts with pre and post generations and their scores."""
    lines = [f"# Generations before and after: {title}", "",
             f"Greedy continuations (stage.quality.max_new_tokens). Fluency: ROME's n-gram entropy in bits; NLL: "
             f"nats/token on the held-out WikiText slice. Collapsed: NLL up by more than "
             f"{thresholds.max_nll_increase} nats/token or fluency down by more than "
             f"{thresholds.max_fluency_drop:.0%}.", ""]
    for row in rows[:n]:
        pre, post, fact = row["pre"], row["post"], facts.get(row["case_id"])
        head = f"## Case {row['case_id']}"
        if fact is not None:
            head += f": {fact.subject} — {fact.target_true} → {fact.target_new}"
        lines += [head, "", f"fluency {_number(pre.get(FLUENCY))} → {_number(post.get(FLUENCY))} bits; "
                  f"NLL {_number(pre.get(NLL))} → {_number(post.get(NLL))}; "
                  f"collapsed: **{'yes' if row.get('collapsed') else 'no'}**", ""]
        for before, after in zip(pre.get(GENERATIONS, []), post.get(GENERATIONS, [])):
            lines += [f"**Prompt:** {before['prompt']}", "",
                      f"- pre: …{_quote(before['text'])}", f"- post: …{_quote(after['text'])}", ""]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """One markdown line: newlines shown as ⏎, markdown emphasis characters escaped."""
    return text.replace("\n", " ⏎ ").replace("*", r"\*").replace("_", r"\_")
