"""core.memory: out-of-memory halving keeps results and order, and stops with a named error at one item."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch

from core.errors import ConfigError, ToolkitError
from core.memory import OOM_HINT, halving_map, is_oom
from facts.relations import load_relation_table
from facts.schema import Fact
from metrics.evaluation import evaluate_cases, evaluation_rows, relation_candidates
from models.scoring import candidate_nll, target_nll


def limited(limit: int, error=lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)")):
    """A batched square function that fails above ``limit`` items; records every attempted size."""
    attempts: list[int] = []

    def fn(chunk: list[int]) -> list[int]:
        attempts.append(len(chunk))
        if len(chunk) > limit:
            raise error()
        return [x * x for x in chunk]

    return fn, attempts


@pytest.mark.parametrize("err, expected", [
    (torch.OutOfMemoryError("anything"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (MemoryError("out of memory"), False),  # host allocation in Python: not something a smaller batch fixes here
    (ValueError("out of memory"), False),
])
def test_is_oom(err, expected):
    assert is_oom(err) is expected


def test_chunks_without_oom():
    fn, attempts = limited(100)
    assert halving_map(fn, list(range(21)), 16) == [x * x for x in range(21)]
    assert attempts == [16, 5]
    assert halving_map(fn, [], 4) == [] and attempts == [16, 5]


@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
])
def test_halves_until_it_fits_and_keeps_the_smaller_size(error, caplog):
    fn, attempts = limited(3, error)
    items = tuple(range(21))  # any Sequence
    with caplog.at_level(logging.WARNING, logger="core.memory"):
        assert halving_map(fn, items, 16) == [x * x for x in range(21)]
    assert attempts[:4] == [16, 8, 4, 2]
    assert attempts[3:] == [2] * 10 + [1]  # the halved size is kept for the rest; the tail is what is left
    warnings = [r for r in caplog.records if r.name == "core.memory" and r.levelno == logging.WARNING]
    assert len(warnings) == 3 and "retrying with 2" in warnings[-1].getMessage()


def test_a_short_tail_chunk_is_halved_from_its_own_length():
    attempts: list[int] = []

    def fn(chunk: list[int]) -> list[int]:  # items >= 8 are "long": they only fit one at a time
        attempts.append(len(chunk))
        if len(chunk) > 1 and max(chunk) >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [-x for x in chunk]

    assert halving_map(fn, list(range(11)), 8) == [-x for x in range(11)]
    assert attempts == [8, 3, 1, 1, 1]


def test_other_errors_propagate_untouched():
    fn, attempts = limited(3, lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        halving_map(fn, list(range(8)), 8)
    assert attempts == [8]
    fn, attempts = limited(3, lambda: KeyError("x"))
    with pytest.raises(KeyError):
        halving_map(fn, list(range(8)), 8)
    assert attempts == [8]


def test_single_item_oom_names_key_value_and_hint():
    fn, attempts = limited(0)
    with pytest.raises(ToolkitError) as info:
        halving_map(fn, list(range(5)), 4, what="prompt_batch")
    err = info.value
    assert attempts == [4, 2, 1]
    assert (err.key, err.value, err.hint) == ("prompt_batch_size", 1, OOM_HINT)
    assert "device_map=auto" in err.hint and "dtype" in err.hint and "shorter prompts" in err.hint
    assert isinstance(err.__cause__, torch.OutOfMemoryError)
    assert err.render().startswith("prompt_batch_size=1: out of memory")
    with pytest.raises(ToolkitError, match="batch_size=1"):
        halving_map(limited(0)[0], [7], 1)


def test_bad_batch_size_and_wrong_result_count():
    fn, _ = limited(10)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ConfigError) as info:
            halving_map(fn, [1, 2], bad, what="rows")
        assert info.value.key == "rows_size"
    with pytest.raises(ToolkitError, match="returned 1 results for 2 items"):
        halving_map(lambda chunk: chunk[:1], [1, 2, 3], 2)
    with pytest.raises(ToolkitError, match="returned a Tensor, not a list"):
        halving_map(lambda chunk: torch.tensor(chunk), [1, 2, 3], 2)


# -- scoring on a tiny model ------------------------------------------------------------------------
@contextmanager
def oom_above(loaded, limit: int):
    """Every forward of the scoring body with more than ``limit`` rows raises a CUDA-style OOM."""
    sizes: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        sizes.append(ids.shape[0])
        if ids.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, {ids.shape[0]} rows)")

    handle = loaded.model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is", "Hi",
           "In Rome, the official language is", "The Eiffel Tower is located in the city of", "Python is a", "Water boils at"]
CANDIDATES = ["Paris", "London town", "French", "native language of the state"]


def test_scoring_under_oom_matches_unconstrained(tiny_model):
    targets = [CANDIDATES[i % len(CANDIDATES)] for i in range(len(PROMPTS))]
    options = [CANDIDATES] * len(PROMPTS)
    free = {
        "target": target_nll(tiny_model, PROMPTS, targets, batch_size=64),
        "concat": candidate_nll(tiny_model, PROMPTS, options, batch_size=64, method="concat"),
        "cache": candidate_nll(tiny_model, PROMPTS, options, batch_size=64, method="cache"),
    }
    # The cache path runs one prompt's K candidates together, so it needs K rows to fit.
    limits = {"target": 2, "concat": 2, "cache": len(CANDIDATES)}
    for name, limit in limits.items():
        with oom_above(tiny_model, limit) as sizes:
            if name == "target":
                got = target_nll(tiny_model, PROMPTS, targets, batch_size=64)
            else:
                got = candidate_nll(tiny_model, PROMPTS, options, batch_size=64, method=name)
        assert max(sizes) > limit, name  # it did run out of memory ...
        assert sizes[-1] <= limit, name  # ... and finished below the limit
        torch.testing.assert_close(got, free[name], rtol=0, atol=1e-5, msg=name)


def test_scoring_oom_at_one_item_is_a_named_error(tiny_gpt2):
    with oom_above(tiny_gpt2, 0), pytest.raises(ToolkitError) as info:
        target_nll(tiny_gpt2, PROMPTS[:3], ["Paris"] * 3, batch_size=4)
    assert (info.value.key, info.value.value) == ("batch_size", 1)


def test_evaluate_cases_under_oom_gives_the_same_rows(tiny_gpt2):
    relations = load_relation_table()
    fact = Fact(case_id=0, subject="Danielle Darrieux", relation_id="P103", template="The mother tongue of {} is",
                prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
                paraphrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
                neighborhood_prompts=("Michel Rocard is a native speaker of",), neighborhood_target="French",
                source="test")
    free = evaluation_rows(evaluate_cases(tiny_gpt2, [fact], relations, progress=False))
    k = len(relation_candidates(relations))  # every phrase and "None": one relation prompt's rows
    with oom_above(tiny_gpt2, k) as sizes:
        got = evaluation_rows(evaluate_cases(tiny_gpt2, [fact], relations, progress=False))
    assert max(sizes) > k
    assert got[0].keys() == free[0].keys()
    for key, value in free[0].items():
        if isinstance(value, float):
            assert got[0][key] == pytest.approx(value, abs=1e-5), key
        else:
            assert got[0][key] == value, key
