"""Every bad input we know of, each with the named error it must get before work starts.

A case is (id, action, error class, key): ``action(ctx)`` must raise ``error``, and the error must
name ``key`` (``ToolkitError.key``; for errors Hydra raises at compose time, the key must appear in
the message). The number of cases is the number of bad inputs covered, so it only ever grows:
add a case here with every fix. Sections follow the code that owns the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from hydra.errors import ConfigCompositionException

from core.errors import CacheError, ConfigError, ToolkitError
from pipeline.jobs import run_job


@dataclass
class BadInputContext:
    """What an action gets: a scratch dir, the compose helper and an in-process job runner."""

    tmp_path: Path
    compose: Callable[..., Any]

    def job(self, *overrides: str, job_dir: Path | None = None) -> dict:
        """Compose with tiny, fast defaults (overridable) and run the job in-process."""
        cfg = self.compose("model=tiny_gpt2", "logger=none", f"paths.cache_dir={self.tmp_path / 'cache'}", *overrides)
        return run_job(cfg, job_dir or self.tmp_path / "job")


@dataclass(frozen=True)
class BadInput:
    id: str
    action: Callable[[BadInputContext], Any]
    error: type[BaseException]
    key: str


# --- top-level keys and the job wrapper (pipeline/run.py, pipeline/jobs.py, pipeline/config.py) ---
def _cli(*args: str) -> None:
    """The entry point's check of top-level overrides, before Hydra makes any job dir."""
    from pipeline.config import check_cli_overrides

    check_cli_overrides(["-m", *args])


def _finished_then(c: BadInputContext, *overrides: str, damage: Callable[[Path], Any] | None = None) -> dict:
    """Run a tiny known job, optionally damage its dir, then rerun it with ``overrides``."""
    c.job("stage=known", "dataset=known", "dataset.limit=3")
    if damage is not None:
        damage(c.tmp_path / "job")
    return c.job("stage=known", "dataset=known", "dataset.limit=3", *overrides)


JOB_CASES: list[BadInput] = [
    BadInput("model.dtype=float8", lambda c: c.job("stage=known", "dataset=known", "model.dtype=float8"),
             ConfigError, "model.dtype"),
    BadInput("force=maybe (compose time)", lambda c: c.compose("force=maybe"), ConfigCompositionException, "force"),
    BadInput("seed=abc (compose time)", lambda c: c.compose("seed=abc"), ConfigCompositionException, "seed"),
    BadInput("seed=abc (command line)", lambda c: _cli("seed=abc"), ConfigError, "seed"),
    BadInput("seed=-1 (command line)", lambda c: _cli("seed=-1"), ConfigError, "seed"),
    BadInput("seed=0,-1 (one value of a sweep)", lambda c: _cli("seed=0,-1"), ConfigError, "seed"),
    BadInput("seed=-1 (job)", lambda c: c.job("stage=known", "dataset=known", "seed=-1"), ConfigError, "seed"),
    BadInput("seed=2**32 (job)", lambda c: c.job("stage=known", "dataset=known", f"seed={2**32}"), ConfigError, "seed"),
    BadInput("sweep_name=../../x (command line)", lambda c: _cli("sweep_name=../../x"), ConfigError, "sweep_name"),
    BadInput("sweep_name=../../x (job)", lambda c: c.job("stage=known", "sweep_name=../../x"), ConfigError, "sweep_name"),
    BadInput("sweep_name of 300 characters", lambda c: _cli("sweep_name=" + "s" * 300), ConfigError, "sweep_name"),
    BadInput("sweep_name=a/b", lambda c: _cli("sweep_name=a/b"), ConfigError, "sweep_name"),
    BadInput("editor=rome_schema (command line)", lambda c: _cli("editor=rome_schema"), ConfigError, "editor"),
    BadInput("rerun of a finished job under a changed config", lambda c: _finished_then(c, "dataset.limit=2"),
             ConfigError, "config"),
    BadInput("finished job whose results.json was truncated",
             lambda c: _finished_then(c, damage=lambda job: (job / "results.json").write_text('{"stage": "kn')),
             CacheError, "results.json"),
    BadInput("cache.repair=perhaps (compose time)", lambda c: c.compose("cache.repair=perhaps"),
             ConfigCompositionException, "cache.repair"),
]

# --- caches: corrupt, truncated or unreadable entries (core/hashing.py and every cache user) ---
import cache_kinds  # noqa: E402  (one real entry of each kind, and how to damage it)


def _reread_damaged(kind: cache_kinds.CacheKind) -> Callable[[BadInputContext], Any]:
    def action(c: BadInputContext) -> Any:
        loaded = cache_kinds.tiny_gpt2()
        cache_kinds.fill_and_damage(kind, loaded, c.tmp_path)
        return kind.fill(loaded, c.tmp_path)
    return action


def _unwritable_cache(c: BadInputContext) -> Any:
    (c.tmp_path / "file").write_text("a file where the cache dir should be")
    return cache_kinds.KINDS[0].fill(cache_kinds.tiny_gpt2(), c.tmp_path / "file")


CACHE_CASES: list[BadInput] = [
    *[BadInput(f"cache.{cache_kinds.case_id(kind)} truncated", _reread_damaged(kind), CacheError, f"cache.{kind.kind}")
      for kind in cache_kinds.KINDS],
    BadInput("paths.cache_dir not writable, entry missing", _unwritable_cache, CacheError, "paths.cache_dir"),
]

# --- models, data files and stage inputs (models/, facts/, editors/, pipeline/stages/) ---
from core.errors import DataError, ModelError  # noqa: E402 (this section's own imports)
from facts import DatasetConfig, load_facts  # noqa: E402


def _choices(ctx: BadInputContext, *overrides: str) -> None:
    """The entry point's check of Hydra's recorded group choices (pipeline.config.check_group_choices)."""
    from pipeline.config import check_group_choices

    check_group_choices(dict(ctx.compose(*overrides, return_hydra_config=True).hydra.runtime.choices))


def _dir(ctx: BadInputContext, name: str, files: tuple[str, ...] = ()) -> Path:
    """A scratch directory holding empty ``files``."""
    directory = ctx.tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        (directory / file).write_text("{}")
    return directory


def _file(ctx: BadInputContext, name: str, text: str = "") -> Path:
    path = ctx.tmp_path / name
    path.write_text(text)
    return path


def _user_rows(*case_ids: int) -> str:
    """A user jsonl with one valid record per case id."""
    import json

    return "".join(json.dumps({"case_id": case_id, "subject": "Lyon", "relation_id": "P190", "template": "The twin city of {} is",
                               "object": "Beirut", "new_object": "Manila"}) + "\n" for case_id in case_ids)


def _trace_duplicates(ctx: BadInputContext) -> dict:
    """The trace stage's own function, given a list with a repeated case id (as a notebook might)."""
    from facts.schema import Fact
    from pipeline.stages.config import TraceStageConfig
    from pipeline.stages.trace import trace_known_facts

    fact = Fact(case_id=4, subject="Lyon", relation_id="P190", template="The twin city of {} is",
                prompt="The twin city of Lyon is", target_true="Beirut")
    cfg = ctx.compose("stage=trace", "model=tiny_gpt2", "logger=none")
    return trace_known_facts(cfg, TraceStageConfig(), None, [fact, fact], "user", ctx.tmp_path / "job", None)


def _trace_split_subject(perspective: str):
    """'Ital' in 'Italy': no token span is exactly the subject."""
    from facts.schema import Fact
    from models import load_model
    from tracing import trace_fact

    fact = Fact(case_id=0, subject="Ital", relation_id=None, template="The capital of {}y is",
                prompt="The capital of Italy is", target_true="Rome")
    return trace_fact(load_model("tiny_gpt2"), fact, perspective)


def _knockout_without_subject() -> Any:
    from models import load_model
    from tracing import trace

    return trace(load_model("tiny_gpt2"), "The capital of Italy is", char_spans=[(15, 20)], kinds="knockout", noise_std=0.1)


def _knockout_without_sources() -> Any:
    from models import load_model
    from tracing.inputs import make_inputs
    from tracing.engine import engine_scores
    from tracing.settings import TraceSettings

    settings = TraceSettings(kinds=("knockout",), noise_scale=0.1)
    loaded = load_model("tiny_gpt2")
    return engine_scores(loaded, make_inputs([1, 2, 3], [0], None, settings, loaded.adapter.d_model, "p"), settings)


def _knockout_figure_without_jobs(ctx: BadInputContext) -> Any:
    from pipeline import figures

    (ctx.tmp_path / "sweep").mkdir()
    return figures.main(["knockout", "--sweep-dir", str(ctx.tmp_path / "sweep"), "--out", str(ctx.tmp_path / "figures")])


def _alphaedit_tiny(ctx: BadInputContext, threshold: float):
    """AlphaEdit on tiny_gpt2 with a threshold no eigenvalue of the keys' second moment is below (known at compute)."""
    from editors import EditRequest, Rewrite, build_editor
    from editors.config import AlphaEditConfig, StatsConfig
    from models import load_model

    config = AlphaEditConfig(layers=[1], nullspace_threshold=threshold, stats=StatsConfig(n_samples=20, max_tokens=32))
    request = EditRequest(0, "Lyon", (Rewrite("The twin city of {} is", "Manila"),), "The twin city of {} is")
    return build_editor(config, cache_dir=ctx.tmp_path / "cache").apply(load_model("tiny_gpt2"), [request])


def _local_model(ctx: BadInputContext, path: Path) -> dict:
    return ctx.job("stage=known", "dataset=known", "model.source=local", f"model.id={path}")


INPUT_CASES: list[BadInput] = [
    BadInput("editor=rome_schema", lambda c: _choices(c, "editor=rome_schema"), ConfigError, "editor"),
    BadInput("editor.name=memit on rome", lambda c: c.job("stage=edit", "editor=rome", "editor.name=memit"),
             ConfigError, "editor.name"),
    BadInput("editor.name=memit on rome (full)", lambda c: c.job("editor=rome", "editor.name=memit"),
             ConfigError, "editor.name"),
    BadInput("editor.nullspace_threshold=0 (alphaedit)",
             lambda c: c.job("stage=edit", "editor=alphaedit", "stage.n_cases=1", "editor.nullspace_threshold=0"),
             ConfigError, "editor.nullspace_threshold"),
    BadInput("editor.nullspace_threshold below every eigenvalue (alphaedit)", lambda c: _alphaedit_tiny(c, 1e-30),
             ConfigError, "editor.nullspace_threshold"),
    BadInput("editor.l2=0 (alphaedit)", lambda c: c.job("stage=edit", "editor=alphaedit", "stage.n_cases=1", "editor.l2=0"),
             ConfigError, "editor.l2"),
    BadInput("editor=r_rome editor.constraint_key=prompt",
             lambda c: c.job("stage=edit", "editor=r_rome", "stage.n_cases=1", "editor.constraint_key=prompt"),
             ConfigError, "editor.constraint_key"),
    BadInput("editor.name=alphaedit on memit", lambda c: c.job("stage=edit", "editor=memit", "editor.name=alphaedit"),
             ConfigError, "editor.name"),
    BadInput("local model: empty dir", lambda c: _local_model(c, _dir(c, "empty")), ModelError, "model.id"),
    BadInput("local model: config.json, no weights",
             lambda c: _local_model(c, _dir(c, "no_weights", ("config.json", "tokenizer.json"))), ModelError, "model.id"),
    BadInput("local model: a file", lambda c: _local_model(c, _file(c, "model.safetensors")), ModelError, "model.id"),
    BadInput("hub id that is an empty local dir",
             lambda c: c.job("stage=known", "dataset=known", "model.source=hub", f"model.id={_dir(c, 'hub_empty')}"),
             ModelError, "model.id"),
    BadInput("paths.cache_dir is a file", lambda c: c.job("stage=known", "dataset=known",
                                                          f"paths.cache_dir={_file(c, 'cache_file')}"),
             ConfigError, "paths.cache_dir"),
    BadInput("paths.cache_dir under a file", lambda c: c.job("stage=known", "dataset=known",
                                                             f"paths.cache_dir={_file(c, 'cache_file')}/sub"),
             ConfigError, "paths.cache_dir"),
    BadInput("paths.data_dir is a file", lambda c: c.job("stage=known", "dataset=known",
                                                         f"paths.data_dir={_file(c, 'data_file')}"),
             ConfigError, "paths.data_dir"),
    BadInput("paths.output_dir is a file", lambda c: c.job("stage=known", "dataset=known",
                                                           f"paths.output_dir={_file(c, 'out_file')}"),
             ConfigError, "paths.output_dir"),
    BadInput("paths.data_dir is a file (load_facts)",
             lambda c: load_facts(DatasetConfig(name="known"), data_dir=_file(c, "data_file")), ConfigError, "paths.data_dir"),
    BadInput("dataset.path is a dir (user)", lambda c: c.job("stage=known", "dataset=user", f"dataset.path={_dir(c, 'd')}"),
             DataError, "dataset.path"),
    BadInput("dataset.path is a dir (known)", lambda c: c.job("stage=known", "dataset=known", f"dataset.path={_dir(c, 'd')}"),
             DataError, "dataset.path"),
    BadInput("empty user file", lambda c: c.job("stage=known", "dataset=user", f"dataset.path={_file(c, 'e.jsonl', chr(10))}"),
             DataError, "dataset.path"),
    BadInput("entirely skipped user file",
             lambda c: c.job("stage=edit", "dataset=user", f"dataset.path={_file(c, 'bad.jsonl', '{}' + chr(10) + '[1]')}"),
             DataError, "dataset.path"),
    BadInput("stage=trace with duplicate case ids",
             lambda c: c.job("stage=trace", "dataset=user", f"dataset.path={_file(c, 'dups.jsonl', _user_rows(0, 0))}"),
             DataError, "case_id"),
    BadInput("trace_known_facts with duplicate case ids (API)", lambda c: _trace_duplicates(c), DataError, "case_id"),
    BadInput("subject splits a token (relation perspective)", lambda c: _trace_split_subject("relation"), DataError, "subject"),
    BadInput("subject splits a token (entity perspective)", lambda c: _trace_split_subject("entity"), DataError, "subject"),
    BadInput("stage.kinds=[knockoff]", lambda c: c.job("stage=trace", "dataset=known", "stage.kinds=[knockoff]"),
             ConfigError, "trace.kinds"),
    BadInput("knockout without a subject (API)", lambda c: _knockout_without_subject(), ConfigError, "subject"),
    BadInput("knockout without its source sets (engine)", lambda c: _knockout_without_sources(), ConfigError, "trace.kinds"),
    BadInput("pipeline.figures knockout on a sweep without knockout jobs", _knockout_figure_without_jobs,
             DataError, "sweep_dir"),
    BadInput("dataset.path is a dir (load_facts)",
             lambda c: load_facts(DatasetConfig(name="counterfact", path=str(_dir(c, "d")))), DataError, "dataset.path"),
]

# --- stage=calibrate: search spaces and settings, refused before the model loads (pipeline/stages/grid.py) ---
def _calibrate(c: BadInputContext, *overrides: str) -> dict:
    return c.job("stage=calibrate", "editor=rome", *overrides)


def _install(c: BadInputContext) -> Any:
    from pipeline.calibrate_install import install

    return install(_dir(c, "unfinished_job"), _dir(c, "conf"))


CALIBRATE_CASES: list[BadInput] = [
    BadInput("calibrate: a typo'd knob", lambda c: _calibrate(c, "+stage.search.rome.layerz=[[1]]"),
             ConfigError, "stage.search.rome.layerz"),
    BadInput("calibrate: a typo'd knob (command line, compose time)",
             lambda c: c.compose("stage=calibrate", "stage.search.rome.layerz=[[1]]"), ConfigCompositionException,
             "stage.search.rome.layerz"),
    BadInput("calibrate: auto for a knob other than layers",
             lambda c: _calibrate(c, "stage.search.rome.clamp_norm_factor=auto"), ConfigError, "stage.search.rome.clamp_norm_factor"),
    BadInput("calibrate: a knob given one value, not a list", lambda c: _calibrate(c, "+stage.search.rome.v_lr=0.5"),
             ConfigError, "stage.search.rome.v_lr"),
    BadInput("calibrate: no search space for the editor", lambda c: _calibrate(c, "~stage.search.rome"),
             ConfigError, "stage.search"),
    BadInput("calibrate: editor=mend", lambda c: c.job("stage=calibrate", "editor=mend"), ConfigError, "editor"),
    BadInput("calibrate: the evaluation split", lambda c: _calibrate(c, "stage.dataset.split=edit"),
             ConfigError, "stage.dataset.split"),
    BadInput("calibrate: relation perspective", lambda c: _calibrate(c, "perspective=relation"), ConfigError, "perspective"),
    BadInput("calibrate: quality off (no fluency floor)", lambda c: _calibrate(c, "stage.quality.enabled=false"),
             ConfigError, "stage.quality.enabled"),
    BadInput("calibrate: max_fluency_drop=2", lambda c: _calibrate(c, "stage.max_fluency_drop=2"),
             ConfigError, "stage.max_fluency_drop"),
    BadInput("calibrate: trace_dir without aie.safetensors",
             lambda c: _calibrate(c, f"stage.trace_dir={_dir(c, 'not_a_trace')}"), ConfigError, "stage.trace_dir"),
    BadInput("calibrate_install: an unfinished job dir", _install, DataError, "job_dir"),
]


# --- make study: the sample option, the stored sample, per-fact files, the report (pipeline/paired.py) ---
def _stale_sample(c: BadInputContext) -> list:
    """A stored sample naming a fact the model no longer knows (a resumed job must not trace other facts)."""
    from pipeline.stages.trace import stored_sample

    (c.tmp_path / "sample.json").write_text('{"size": 1, "seed": 0, "case_ids": [5]}')
    return stored_sample(c.tmp_path, [], 1, 0)


def _torn_per_fact(c: BadInputContext):
    """Per-fact tensors with fewer rows than the case ids beside them."""
    import torch

    from core.io import atomic_save_tensors
    from pipeline.paired import load_per_fact

    atomic_save_tensors(c.tmp_path / "trace_entity_per_fact.safetensors", {"mlp": torch.zeros(2, 4)})
    (c.tmp_path / "trace_entity_per_fact.json").write_text('{"names": ["mlp"], "case_ids": [1, 2, 3]}')
    return load_per_fact(c.tmp_path, "trace_entity")


def _report(*args: str):
    from pipeline.report import main

    return main(["--figures-dir", ".", "--out", "/nonexistent/report.md", *args])


STUDY_CASES: list[BadInput] = [
    BadInput("stage.sample=0", lambda c: c.job("stage=trace", "dataset=known", "stage.sample=0"), ConfigError, "stage.sample"),
    BadInput("stage.sample=abc (compose time)", lambda c: c.compose("stage=trace", "stage.sample=abc"),
             ConfigCompositionException, "stage.sample"),
    BadInput("stage.sample_seed=-1", lambda c: c.job("experiment=study", "stage.sample_seed=-1"), ConfigError,
             "stage.sample_seed"),
    BadInput("stored sample names facts no longer known", _stale_sample, DataError, "stage.sample"),
    BadInput("per-fact tensors and case ids disagree", _torn_per_fact, DataError, "per_fact"),
    BadInput("report --n-resamples 0", lambda c: _report("--n-resamples", "0"), ConfigError, "--n-resamples"),
    BadInput("report --seed -1", lambda c: _report("--seed", "-1"), ConfigError, "--seed"),
]

CASES = JOB_CASES + CACHE_CASES + INPUT_CASES + CALIBRATE_CASES + STUDY_CASES


@pytest.fixture()
def ctx(tmp_path, compose_config) -> BadInputContext:
    return BadInputContext(tmp_path=tmp_path, compose=compose_config)


def named_key(err: BaseException) -> str | None:
    return err.key if isinstance(err, ToolkitError) else None


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_gets_a_named_error(case: BadInput, ctx: BadInputContext) -> None:
    with pytest.raises(case.error) as info:
        case.action(ctx)
    key = named_key(info.value)
    if key is not None:
        assert key == case.key, str(info.value)
    else:
        assert case.key in str(info.value), str(info.value)
