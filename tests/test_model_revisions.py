"""Hub models load a pinned commit: every hub config has a revision (or says why not), and the
loader hands it to both ``from_pretrained`` calls. No downloads: ``from_pretrained`` is faked."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from core.conf import CONF_DIR
from models import load
from models.config import model_config_by_name

SHA = re.compile(r"[0-9a-f]{40}")
# An unpinned hub model must say why on the line itself: `revision: null  # <reason>`.
DOCUMENTED_NULL = re.compile(r"^revision:\s*null\s*#\s*\S", re.MULTILINE)
HUB_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if OmegaConf.load(p).get("source") == "hub")


def test_the_hub_models_are_the_expected_ones():
    assert HUB_MODELS == ["gpt2", "gpt2_xl", "gpt_j_6b"]


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_config_pins_a_commit_or_documents_why_not(name):
    text = (CONF_DIR / "model" / f"{name}.yaml").read_text()
    revision = model_config_by_name(name).revision
    if revision is None:
        assert DOCUMENTED_NULL.search(text), f"{name}: revision is null without a `# reason` on that line"
    else:
        assert SHA.fullmatch(revision), f"{name}: revision {revision!r} is not a 40-hex commit SHA"
        assert "https://" in text, f"{name}: cite where the pinned commit comes from"


class _Stop(Exception):
    """Raised by the fake model loader once both calls are recorded."""


class _FakeAuto:
    def __init__(self, calls: list, kind: str, stop: bool = False) -> None:
        self.calls, self.kind, self.stop = calls, kind, stop

    def from_pretrained(self, location, **kwargs):
        self.calls.append((self.kind, location, kwargs))
        if self.stop:
            raise _Stop
        return object()


@pytest.mark.parametrize("name", HUB_MODELS)
def test_loader_passes_the_revision_to_model_and_tokenizer(name, monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(load, "AutoTokenizer", _FakeAuto(calls, "tokenizer"))
    monkeypatch.setattr(load, "AutoModelForCausalLM", _FakeAuto(calls, "model", stop=True))
    cfg = model_config_by_name(name)
    with pytest.raises(_Stop):
        load.load_model(cfg, cache_dir=tmp_path)
    assert [(kind, location) for kind, location, _ in calls] == [("tokenizer", cfg.id), ("model", cfg.id)]
    assert all(kwargs.get("revision") == cfg.revision for _, _, kwargs in calls)
