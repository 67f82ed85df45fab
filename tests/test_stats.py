"""Second-moment statistics and context templates: values, caching, partial entries, corpora."""

from __future__ import annotations

import pytest
import torch

from editors import stats as stats_module
from editors.config import StatsConfig
from editors.stats import accumulate_second_moments, corpus_texts, second_moments
from editors.templates import context_templates
from models.hooks import run_with_cache

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France and a large city.", "One two three four five six seven."]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


def test_second_moment_matches_a_direct_computation(tiny_model):
    moments, count = accumulate_second_moments(tiny_model, [0, 2], TEXTS, max_tokens=8, batch_size=2, progress=False)
    rows = {0: [], 2: []}
    for text in TEXTS:  # one unpadded sequence at a time, truncated like the batched path
        ids = tiny_model.tokenizer(text, return_tensors="pt", truncation=True, max_length=8)
        _, cache = run_with_cache(tiny_model.model, tiny_model.adapter, ["blocks.0.mlp.hook_post", "blocks.2.mlp.hook_post"], **ids)
        for layer in rows:
            rows[layer].append(cache[f"blocks.{layer}.mlp.hook_post"][0].double())
    for layer, chunks in rows.items():
        keys = torch.cat(chunks)  # [token d_mlp]
        assert count == keys.shape[0]
        torch.testing.assert_close(moments[layer], keys.T @ keys / keys.shape[0])
        assert moments[layer].dtype == torch.float64


def test_cache_computes_only_missing_layers_and_ignores_half_written_entries(tiny_gpt2, tmp_path, monkeypatch):
    config = StatsConfig(corpus="files", path=str(tmp_path / "corpus.txt"), n_samples=3, max_tokens=16)
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS))
    calls: list[list[int]] = []
    real = stats_module.accumulate_second_moments

    def counting(loaded, layers, texts, *args, **kwargs):
        calls.append(list(layers))
        return real(loaded, layers, texts, *args, **kwargs)

    monkeypatch.setattr(stats_module, "accumulate_second_moments", counting)
    first = second_moments(tiny_gpt2, [1], config, cache_dir=tmp_path)
    both = second_moments(tiny_gpt2, [1, 3], config, cache_dir=tmp_path)
    assert calls == [[1], [3]]
    torch.testing.assert_close(first[1], both[1])
    # a payload without its key.json (a killed run) is never read: the layer is recomputed
    entry = stats_module.CacheEntry(tmp_path, "second_moments", stats_module.cache_key(tiny_gpt2, 3, config))
    (entry.dir / "key.json").unlink()
    (entry.dir / "mom2.safetensors").unlink()
    (entry.dir / "mom2.safetensors").write_bytes(b"garbage")
    again = second_moments(tiny_gpt2, [1, 3], config, cache_dir=tmp_path)
    assert calls == [[1], [3], [3]]
    torch.testing.assert_close(again[3], both[3])
    # a different sample count is a different entry
    second_moments(tiny_gpt2, [1], StatsConfig(corpus="files", path=config.path, n_samples=2, max_tokens=16), cache_dir=tmp_path)
    assert calls[-1] == [1]


def test_wikitext2_corpus_is_clean_paragraphs():
    texts = corpus_texts(StatsConfig(corpus="wikitext2", n_samples=50))
    assert len(texts) == 50
    assert not any(t.startswith("=") or "@-@" in t or "<unk>" in t for t in texts)


def test_bad_stats_config_names_the_key():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="stats.corpus"):
        StatsConfig(corpus="nope").validate()
    with pytest.raises(ConfigError, match="stats.path"):
        StatsConfig(corpus="files").validate()


def test_hub_corpus_without_datasets_names_the_extra(monkeypatch):
    """``datasets`` is an extra (``.[corpora]``): without it a hub corpus is a named error, not an ImportError."""
    import sys

    from core.errors import DataError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"stats.corpus.*\.\[corpora\]"):
        corpus_texts(StatsConfig(corpus="wikitext103", n_samples=5))


def test_context_templates_are_seeded_and_cached(tiny_gpt2, tmp_path):
    first = context_templates(tiny_gpt2, [[4, 3]], seed=3, cache_dir=tmp_path)
    assert first[0] == "{}" and len(first) == 4 and all(t.endswith(". {}") for t in first[1:])
    assert context_templates(tiny_gpt2, [[4, 3]], seed=3, cache_dir=None) == first  # same seed, same texts
    other = context_templates(tiny_gpt2, [[4, 3]], seed=4, cache_dir=tmp_path)
    assert other != first
    prompted = context_templates(tiny_gpt2, [[3, 2]], prompts=["The", "Because"], cache_dir=tmp_path)
    assert prompted[1].startswith("Because") and prompted[2].startswith("The")  # prompts stay in the text
    assert len(list((tmp_path / "context_templates").glob("*/templates.json"))) == 3
