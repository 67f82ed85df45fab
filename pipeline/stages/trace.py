"""Stage ``trace``: causal tracing of the known facts from one perspective, aggregated by token role.

A thin wrapper over ``tracing`` (a notebook calls the same functions): pick the first ``n_facts``
facts the model knows, trace each (cached per model, perspective, fact and settings), aggregate
AIE by token role with bootstrap intervals, draw the figures, and log tensors, table and images.
With kind ``knockout`` the aggregate ``knockout`` holds the mean relative drop in p(answer) per
source set (its ``role``: subject / relation / last) and layer window, with intervals over facts.

With ``stage.sample=N`` the facts are a seeded random sample of the known facts instead of the
first ones (``seeded_sample``): drawn once, stored in ``sample.json``, and the same for every
perspective, so traces of one fact from both perspectives can be paired.

Resuming: each fact's trace is cached as soon as it finishes (``tracing.api.trace``, a content-
addressed entry keyed by model, prompt, corrupted spans, answer and settings, written atomically,
its marker last), so a killed job rerun with the same config recomputes only the facts it had not
finished.

Job dir: ``traces/case_<id>.{safetensors,json}``, ``aie.safetensors``, ``aie.jsonl``,
``per_fact.{safetensors,json}`` (each fact's AIE by layer at the last corrupted token, per score
name: what paired statistics need), ``sample.json`` (with ``stage.sample``), ``figures/*.{png,pdf}``.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.errors import DataError
from core.hashing import repair_enabled, repairing
from core.io import atomic_save_tensors, atomic_write_json, atomic_write_jsonl, read_json
from facts.knowledge import known_facts
from facts.validate import check_unique_case_ids
from facts.relations import load_relation_table
from models.load import LoadedModel, load_model
from pipeline.distributed import map_sharded
from pipeline.stages.common import load_configured_facts, load_configured_model, with_load_summary
from pipeline.stages.config import TraceStageConfig
from pipeline.stages.scoring import replica_config
from tracing import TraceSettings, embedding_std, severed_key, trace_fact
from tracing.aggregate import KNOCKOUT, aggregate_aie, aggregate_knockout, fact_aie
from tracing.plots import plot_aie_curves, plot_knockout, plot_role_heatmaps, plot_severed, plot_trace_grid
from tracing.spans import check_subject_tokens

log = logging.getLogger(__name__)

SAMPLE_FILE = "sample.json"
PER_FACT = "per_fact"  # per_fact.safetensors ([fact layer] per score name) + per_fact.json (case ids, role)
PER_FACT_ROLE = "last_corrupted"


def run(cfg: DictConfig, job_dir: Path, logger) -> dict:
    stage: TraceStageConfig = OmegaConf.to_object(cfg.stage)
    stage.trace_settings(int(cfg.seed))  # bad settings fail before the facts and the model load
    facts = load_configured_facts(cfg)  # before the model: a bad file fails in a second, not after a load
    loaded = load_configured_model(cfg)
    return with_load_summary(trace_known_facts(cfg, stage, loaded, list(facts), cfg.dataset.name, job_dir, logger), facts)


def trace_known_facts(cfg: DictConfig, stage: TraceStageConfig, loaded: LoadedModel, facts: list, dataset: str,
                      job_dir: Path, logger) -> dict:
    """Trace the first ``stage.n_facts`` of ``facts`` the model knows; AIE tables and figures into ``job_dir``."""
    settings = stage.trace_settings(int(cfg.seed))
    check_unique_case_ids(facts, f"the facts of {dataset}")  # one trace file per case id
    perspective, relation_span = cfg.perspective.name, cfg.perspective.relation_span
    cache_dir = cfg.paths.cache_dir
    started = time.time()
    refused = _refused(loaded, facts)
    if facts and len(refused) == len(facts):
        raise DataError("subject", refused[0]["subject"], f"all {len(facts)} facts of {dataset} have a subject that starts "
                        "or ends inside a token", hint=refused[0]["error"], case_id=refused[0]["case_id"])
    # The known filter runs on every fact, so its cache entry is the one stage=known makes for this dataset.
    refused_ids = {row["case_id"] for row in refused}
    known = [fact for fact in known_facts(loaded, facts, cache_dir, stage.knowledge_batch_size) if fact.case_id not in refused_ids]
    pool = known if stage.sample is None else stored_sample(job_dir, known, stage.sample, stage.sample_seed)
    chosen = pool if stage.n_facts is None else pool[: stage.n_facts]
    if not chosen:
        raise DataError("dataset", dataset, f"the model knows none of the {len(facts)} facts",
                        hint="check the model, or use another dataset")
    if settings.noise_scale is None:
        std = embedding_std(loaded, [fact.subject for fact in facts], cache_dir)
        settings = settings.with_scale(settings.noise_factor * std)

    traced = time.time()
    options = dict(perspective=perspective, relation_span=relation_span, answer=stage.answer, settings=settings,
                   cache_dir=str(cache_dir), max_rows=stage.max_rows)
    if stage.fabric.devices == 1:
        outcomes = trace_facts(loaded, chosen, progress=stage.progress, **options)
    else:
        # spawned ranks start with a fresh context: hand them this stage's cache-repair switch
        task = functools.partial(_trace_shard, model=OmegaConf.to_object(cfg.model), repair=repair_enabled(), **options)
        outcomes = map_sharded(task, chosen, stage.fabric)
    trace_seconds = time.time() - traced
    results, skipped, paths = [], [], []
    for fact, outcome in zip(chosen, outcomes):
        if isinstance(outcome, str):
            log.warning("skipping case %s: %s", fact.case_id, outcome)
            skipped.append({"case_id": fact.case_id, "error": outcome})
            continue
        results.append(outcome)
        paths += outcome.save(job_dir / "traces", stem=f"case_{fact.case_id}")
    if not results:
        raise DataError("facts", len(chosen), "every fact failed to trace", hint=skipped[0]["error"] if skipped else "")

    aggregates = {name: aggregate_aie(results, name, stage.n_bootstrap, stage.confidence, int(cfg.seed))
                  for name in settings.table_names}
    if settings.knockout_names:
        aggregates[KNOCKOUT] = aggregate_knockout(results, stage.n_bootstrap, stage.confidence, int(cfg.seed))
    rows = [row for agg in aggregates.values() for row in agg.rows()]
    aie_path = atomic_save_tensors(job_dir / "aie.safetensors", {k: v for agg in aggregates.values() for k, v in agg.tensors().items()})
    atomic_write_jsonl(job_dir / "aie.jsonl", rows)
    paths += save_per_fact(job_dir, results, settings.score_names)
    figures = _figures(results, aggregates, settings, job_dir / "figures", stage.plot_facts, loaded.identity["name"])

    logger.log_artifact(f"trace-{perspective}", paths + [aie_path], "traces")
    logger.log_table(f"trace/{perspective}/aie", rows)
    for figure in figures:
        logger.log_image(f"trace/{perspective}/{figure.stem}", figure)
    summary = {
        "model": loaded.identity["name"], "dataset": dataset, "perspective": perspective, "relation_span": relation_span,
        "n_layers": loaded.adapter.n_layers,
        "n_facts": len(facts), "n_known": len(known), "n_traced": len(results), "skipped": skipped,
        "sample": None if stage.sample is None else {"size": len(pool), "seed": stage.sample_seed, "file": SAMPLE_FILE},
        "refused": refused, "n_skipped": len(refused),
        "skip_reasons": {"subject: starts or ends inside a token": len(refused)} if refused else {},
        "n_from_cache": sum(result.from_cache for result in results), "devices": stage.fabric.devices,
        "noise_scale": settings.noise_scale, "settings": settings.key(),
        "p_clean": sum(r.p_clean for r in results) / len(results),
        "p_corrupted": sum(r.p_corrupted for r in results) / len(results),
        "seconds": round(time.time() - started, 2), "seconds_per_fact": round(trace_seconds / len(results), 2),
        "peaks": {name: _peaks(agg) for name, agg in aggregates.items()},
    }
    logger.log_scalars({f"trace/{perspective}/p_clean": summary["p_clean"],
                        f"trace/{perspective}/p_corrupted": summary["p_corrupted"],
                        f"trace/{perspective}/n_traced": len(results)})
    return summary


def seeded_sample(facts: list, size: int, seed: int) -> list:
    """``size`` of ``facts`` drawn without replacement under ``seed``, in their original order (all if fewer)."""
    if size >= len(facts):
        if size > len(facts):
            log.warning("stage.sample=%d but only %d known facts: tracing all of them", size, len(facts))
        return list(facts)
    picked = np.sort(np.random.default_rng(seed).choice(len(facts), size=size, replace=False))
    return [facts[i] for i in picked]


def stored_sample(job_dir: Path, known: list, size: int, seed: int) -> list:
    """The job's sample: read from ``sample.json`` when it was drawn with the same size and seed, else
    drawn (``seeded_sample``) and stored there, so a resumed job traces exactly the facts it began with."""
    path = job_dir / SAMPLE_FILE
    by_id = {fact.case_id: fact for fact in known}
    if path.exists():
        stored = read_json(path)
        if stored.get("size") == size and stored.get("seed") == seed:
            lost = [case_id for case_id in stored["case_ids"] if case_id not in by_id]
            if lost:
                raise DataError("stage.sample", size, f"{len(lost)} facts of the stored sample ({path}) are no longer "
                                "known to the model", hint="force=true draws a new sample", case_id=lost[0])
            return [by_id[case_id] for case_id in stored["case_ids"]]
    sample = seeded_sample(known, size, seed)
    atomic_write_json(path, {"size": size, "seed": seed, "n_known": len(known),
                             "case_ids": [fact.case_id for fact in sample]})
    return sample


def save_per_fact(job_dir: Path, results: list, names) -> list[Path]:
    """``per_fact.safetensors``: each fact's AIE by layer at the last corrupted token, per score name
    ([fact layer]; a knockout name: the fact's relative drop of p by layer), with ``p_clean`` / ``p_corrupted`` [fact]; ``per_fact.json``: case ids (row order)."""
    tensors = {name: fact_aie(results, name, PER_FACT_ROLE) for name in names}
    tensors["p_clean"] = torch.tensor([r.p_clean for r in results], dtype=torch.float32)
    tensors["p_corrupted"] = torch.tensor([r.p_corrupted for r in results], dtype=torch.float32)
    return [atomic_save_tensors(job_dir / f"{PER_FACT}.safetensors", tensors),
            atomic_write_json(job_dir / f"{PER_FACT}.json", {"role": PER_FACT_ROLE, "names": list(names),
                                                             "case_ids": [r.case_id for r in results]})]


def _refused(loaded: LoadedModel, facts: list) -> list[dict]:
    """Facts whose subject is not whole tokens (``check_subject_tokens``), with the reason for each.

    Checked before any tracing, so the first ``n_facts`` known facts are all traceable and a refused
    fact is counted in ``n_skipped`` instead of silently tracing a widened span.
    """
    refused = []
    for fact in facts:
        try:
            check_subject_tokens(loaded.tokenizer, fact.prompt, fact.subject_char_span(), fact.subject, fact.case_id)
        except DataError as err:
            refused.append({"case_id": fact.case_id, "subject": fact.subject, "error": str(err)})
    if refused:
        log.warning("refused %d of %d facts whose subject starts or ends inside a token (first: %s)",
                    len(refused), len(facts), refused[0]["error"])
    return refused


def trace_facts(loaded: LoadedModel, facts: list, *, progress: bool = False, **options) -> list:
    """Each fact's ``TraceResult`` (cached per fact), or the message of the DataError that ruled it out."""
    relations = load_relation_table()
    outcomes: list = []
    for fact in tqdm(facts, desc=f"trace {options['perspective']}", disable=not progress):
        try:
            outcomes.append(trace_fact(loaded, fact, relation=relations.get(fact.relation_id or ""), **options))
        except DataError as err:
            outcomes.append(str(err))
    return outcomes


def _trace_shard(facts: list, device, *, model, cache_dir: str, repair: bool = False, **options) -> list:
    """One rank's share: a model replica on ``device``; the per-fact cache is shared by all ranks."""
    with repairing(repair):
        loaded = load_model(replica_config(model, device), cache_dir=cache_dir)
        return trace_facts(loaded, facts, cache_dir=cache_dir, **options)


def _peaks(agg) -> dict:
    """Largest AIE per role and the layer where it occurs (a compact summary for results.json);
    for the knockout, the largest drop per source set."""
    out = {}
    for r, role in enumerate(agg.roles):
        if int(agg.tokens[r]) == 0:
            continue
        if agg.name == KNOCKOUT:
            layer = int(agg.mean[r].argmin())
            out[role] = {"layer": layer, "drop": round(float(agg.mean[r, layer]), 5)}
        else:
            layer = int(agg.mean[r].argmax())
            out[role] = {"layer": layer, "aie": round(float(agg.mean[r, layer]), 5)}
    return out


def _figures(results, aggregates, settings: TraceSettings, directory: Path, plot_facts: int, model: str) -> list[Path]:
    figures = []
    for result in results[:plot_facts]:
        plot_trace_grid(result, directory / f"case_{result.case_id}")
        figures.append(directory / f"case_{result.case_id}.png")
    kinds = [aggregates[k] for k in settings.restored]
    if kinds:
        plot_role_heatmaps(kinds, directory / "aie_roles", model=model)
        plot_aie_curves(kinds, directory / "aie_curves", model=model)
        figures += [directory / "aie_roles.png", directory / "aie_curves.png"]
    if settings.severed:
        plot_severed({n: aggregates[n] for n in ("hidden", *map(severed_key, settings.severed)) if n in aggregates},
                     path=directory / "severed", model=model)
        figures.append(directory / "severed.png")
    if KNOCKOUT in aggregates:
        plot_knockout([aggregates[KNOCKOUT]], settings.window, directory / "knockout", model=model)
        figures.append(directory / "knockout.png")
    return figures
