"""Scores a broken model cannot fake: fluency of its generations and a collapse rule.

A binary metric such as reliability only asks whether o* beats o; a model whose weights an edit
has wrecked can pass it by accident (both NLLs explode, o* explodes a little less). Two scores
measure the model itself, before and after the edit:

- **Fluency** (ROME's ``n_gram_entropy``, ``experiments/py/eval_utils_counterfact.py``): for
  each generated text, the entropy in bits of its bigram and trigram frequency distributions,
  weighted 2/3 and 4/3 and averaged (``mean(w_n * H_n)``); then the mean over texts. A text
  that loops ("language of the language of the ...") has few distinct n-grams and low entropy.
- **General ability**: the mean per-token NLL on a fixed held-out text (computed in ``models``).

``is_collapsed`` turns both into one flag per edit. Everything here is a pure function.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from core.errors import ConfigError

# ROME's n-gram orders and weights (compute_n_gram_entropy defaults).
NGRAM_ORDERS: tuple[int, ...] = (2, 3)
NGRAM_WEIGHTS: tuple[float, ...] = (2 / 3, 4 / 3)

# Close to ROME's ``nltk.word_tokenize`` (Punkt sentences, then the Treebank word tokenizer):
# words (hyphenated and inner-apostrophe ones whole: "well-known", "O'Brien"), decimal numbers
# and dotted abbreviations ("3.5", "U.S.") whole, clitics split off ("do" "n't", "Paris" "'s"),
# "..." as one token, any other punctuation mark its own token (so a sentence's final period
# too), double quotes rewritten to `` (opening) and '' (closing). Difference: an abbreviation
# that ends a sentence keeps its period (Punkt decides that case by case). Entropy depends only
# on which n-grams are equal, so the scores of SmolLM2's generations equal NLTK's
# (tests/test_quality.py holds NLTK's values).
_WORD = re.compile(r"(?:[A-Za-z]\.){2,}|\d+(?:[.,]\d+)+|\w+(?:[-']\w+)*|\.\.\.|[^\w\s]")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)


def word_tokens(text: str) -> list[str]:
    """Word-level tokens of ``text`` (case kept, as ROME)."""
    tokens = []
    for match in _WORD.finditer(text):
        token = match.group()
        if token == '"':  # Treebank: an opening quote becomes ``, a closing one ''
            token = "``" if match.start() == 0 or text[match.start() - 1] in " \t\n([{<" else "''"
        clitic = _CLITIC.match(token)
        tokens += list(clitic.groups()) if clitic else [token]
    return tokens


def _entropy_bits(counts: Iterable[int]) -> float:
    counts = list(counts)
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts) if total else 0.0


def text_ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: ``mean_n(w_n * H_n)`` in bits.

    A text with no n-gram of some order (empty, or fewer words than n) contributes 0 bits for
    that order, as in ROME (an empty frequency distribution sums to 0).
    """
    if len(orders) != len(weights) or not orders:
        raise ValueError(f"one weight per n-gram order, got orders {orders} and weights {weights}")
    tokens = word_tokens(text)
    weighted = []
    for n, weight in zip(orders, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        weighted.append(weight * _entropy_bits(grams.values()))
    return sum(weighted) / len(weighted)


def ngram_entropy(texts: Sequence[str]) -> Optional[float]:
    """ROME's fluency of several generations: the arithmetic mean of ``text_ngram_entropy``.

    None for no text (nothing generated is "not measured", not 0 bits).
    """
    if not texts:
        return None
    return sum(text_ngram_entropy(text) for text in texts) / len(texts)


# -- collapse ---------------------------------------------------------------------------------------
@dataclass
class CollapseThresholds:
    """When an edit counts as having broken the model (either condition suffices).

    ``max_nll_increase`` (nats/token, absolute): 0.1 nats is a 10.5% rise of held-out perplexity
    (exp(0.1)). A single rank-one ROME edit changes WikiText perplexity by far less than 1%
    (ROME/MEMIT papers); a model that reads ordinary Wikipedia text 10% worse after one fact has
    been rewritten has been damaged beyond that fact. NLL is a log quantity, so an absolute rise
    means the same perplexity ratio for every model.

    ``max_fluency_drop`` (fraction of the pre-edit fluency): 0.2. In ROME's CounterFact table
    the most damaging single-edit method (KN) lowers mean fluency by ~9% (626 -> 570, in their
    units of 0.01 bit), while degenerate generations such as a phrase looping over and over
    score roughly half of a fluent text's entropy. A relative threshold does not depend on the
    generation length, which bounds the achievable entropy (log2 of the number of n-grams).

    A post-edit value that is NaN or infinite (while the pre-edit one is finite) is a collapse.
    """

    max_nll_increase: float = 0.1
    max_fluency_drop: float = 0.2

    def validate(self, prefix: str = "collapse") -> None:
        if not self.max_nll_increase > 0:
            raise ConfigError(f"{prefix}.max_nll_increase", self.max_nll_increase, "must be > 0", "e.g. 0.1 nats/token")
        if not 0 < self.max_fluency_drop <= 1:
            raise ConfigError(f"{prefix}.max_fluency_drop", self.max_fluency_drop, "must be in (0, 1]", "e.g. 0.2")


def _broke(pre: Optional[float], post: Optional[float]) -> bool:
    return pre is not None and post is not None and math.isfinite(pre) and not math.isfinite(post)


def is_collapsed(nll_pre: Optional[float], nll_post: Optional[float], fluency_pre: Optional[float],
                 fluency_post: Optional[float], thresholds: Optional[CollapseThresholds] = None) -> bool:
    """Whether an edit broke the model: held-out NLL rose, or fluency fell, past ``thresholds``.

    A score that was not measured (None) on either side cannot flag a collapse; the other one still can.
    ``thresholds`` None: the documented defaults of ``CollapseThresholds``.
    """
    thresholds = thresholds or CollapseThresholds()
    if _broke(nll_pre, nll_post) or _broke(fluency_pre, fluency_post):
        return True
    if None not in (nll_pre, nll_post) and math.isfinite(nll_pre) and nll_post - nll_pre > thresholds.max_nll_increase:
        return True
    if None not in (fluency_pre, fluency_post) and math.isfinite(fluency_pre) and fluency_pre > 0:
        return (fluency_pre - fluency_post) / fluency_pre > thresholds.max_fluency_drop
    return False


# -- guarded rates: a collapsed edit is never a success ------------------------------------------------
GUARDED_SUFFIX = "_guarded"


def guarded(metric: str) -> str:
    """``entity.reliability`` -> ``entity.reliability_guarded``."""
    return metric + GUARDED_SUFFIX


def guard_rows(rows: Sequence[Mapping[str, Any]], collapsed: Mapping[Any, bool], rates: Sequence[str]) -> list[dict[str, Any]]:
    """Rows plus ``<rate>_guarded`` copies where a collapsed case's measured rates become 0 (failure).

    Unmeasured values (None) stay None. Applied to pre-edit rows with nothing collapsed, the
    guarded rates equal the plain ones, so post - pre deltas stay paired.
    """
    out = []
    for row in rows:
        down = bool(collapsed.get(row["case_id"], False))
        extra = {guarded(rate): (None if row.get(rate) is None else 0.0 if down else row[rate]) for rate in rates}
        out.append({**row, **extra})
    return out
