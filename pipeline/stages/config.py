"""Typed schemas of the ``stage`` config group (registered by the pipeline as ``stage/<name>_schema``).

Torch-free, so that registering the schemas (``python -m pipeline.run --cfg job``, ``--help``) does
not import torch: each stage module imports its settings from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from core.checks import check_choice
from core.errors import ConfigError
from editors.config import MendTrainConfig
from editors.requests import LOOKUPS
from facts.config import DatasetConfig, HeldoutSlice
from metrics.quality import CollapseThresholds
from pipeline.distributed import FabricConfig
from tracing.settings import TraceSettings


@dataclass
class ScoringSettings:
    # (prompt, candidate) rows per forward pass (halved automatically on GPU out-of-memory).
    batch_size: int = 256
    # Cap on the extra entity-side paraphrases drawn from the relation's templates (null: all).
    max_template_paraphrases: Optional[int] = None
    n_resamples: int = 1000
    confidence: float = 0.95
    progress: bool = True
    # Shard the cases over several devices (one model replica each); devices=1 scores in-process.
    fabric: FabricConfig = field(default_factory=FabricConfig)

    def validate(self, prefix: str = "stage") -> None:
        for key in ("batch_size", "n_resamples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "must be >= 1")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"{prefix}.confidence", self.confidence, "must be in (0, 1)", hint="e.g. 0.95")
        if self.max_template_paraphrases is not None and self.max_template_paraphrases < 0:
            raise ConfigError(f"{prefix}.max_template_paraphrases", self.max_template_paraphrases, "must be >= 0",
                              hint="use null for all templates")
        self.fabric.validate()


@dataclass
class QualitySettings:
    """``stage.quality``: what the fluency / general-ability scores cost and when an edit collapsed."""

    enabled: bool = True
    # Greedy tokens per generation. ROME generates 100; 32 (~25 words, enough for a loop to show in
    # the entropy) keeps the extra cost of a 3-case SmolLM2 demo near 20 s on 2 shared CPU cores.
    max_new_tokens: int = 32
    # Prompts per case to generate from: the rewrite prompt, then paraphrases (ROME: ~10 generation prompts).
    n_generation_prompts: int = 2
    # Held-out WikiText tokens for the NLL (first N of the WikiText-2 test split), scored in windows.
    # One pass per edit (~1.7 s for 512 tokens on SmolLM2, 1 CPU thread). Pre and post read the same
    # tokens, so the paired difference is not sampling noise; raise it (e.g. 4096) on a GPU.
    nll_tokens: int = 512
    nll_window: int = 512
    # Cases shown in examples.md (pre/post generations side by side).
    n_examples: int = 3
    collapse: CollapseThresholds = field(default_factory=CollapseThresholds)

    def validate(self, prefix: str = "stage.quality") -> None:
        for key in ("max_new_tokens", "n_generation_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "must be >= 1")
        if self.nll_window < 2:
            raise ConfigError(f"{prefix}.nll_window", self.nll_window, "must be >= 2", "e.g. 512")
        if self.n_examples < 0:
            raise ConfigError(f"{prefix}.n_examples", self.n_examples, "must be >= 0")
        self.heldout().validate(prefix)
        self.collapse.validate(f"{prefix}.collapse")

    def heldout(self) -> HeldoutSlice:
        return HeldoutSlice(n_tokens=self.nll_tokens)


@dataclass
class KnownStageConfig:
    name: str = "known"
    batch_size: int = 64


@dataclass
class EvaluateStageConfig(ScoringSettings):
    name: str = "evaluate"
    # First N cases of the dataset (after the known filter); fewer if the dataset is smaller.
    n_cases: int = 200
    # Keep only facts whose object the model predicts greedily (facts.knowledge, cached).
    known_only: bool = False

    def validate(self, prefix: str = "stage") -> None:
        if self.n_cases < 1:
            raise ConfigError(f"{prefix}.n_cases", self.n_cases, "must be >= 1")
        super().validate(prefix)


@dataclass
class EditStageConfig(ScoringSettings):
    name: str = "edit"
    # First N cases of the dataset (after the known filter and, for relation edits, those with a relation).
    n_cases: int = 100
    known_only: bool = False
    # Cases per edit: null = the editor's default (ROME 1: one edit, scored, restored; MEMIT 100).
    edit_batch_size: Optional[int] = None
    # Relation perspective: key/lookup token of relation edits (subject_last as the authors; or prompt_last).
    relation_lookup: str = "subject_last"
    # Fluency, held-out NLL and the collapse flag, pre and post (pipeline.stages.quality).
    quality: QualitySettings = field(default_factory=QualitySettings)

    def validate(self, prefix: str = "stage") -> None:
        if self.n_cases < 1:
            raise ConfigError(f"{prefix}.n_cases", self.n_cases, "must be >= 1")
        if self.edit_batch_size is not None and self.edit_batch_size < 1:
            raise ConfigError(f"{prefix}.edit_batch_size", self.edit_batch_size, "must be >= 1 or null")
        if self.relation_lookup not in LOOKUPS:
            raise ConfigError(f"{prefix}.relation_lookup", self.relation_lookup, "unknown lookup", f"use one of {', '.join(LOOKUPS)}")
        self.quality.validate(f"{prefix}.quality")
        super().validate(prefix)


@dataclass
class TraceStageConfig:
    """``stage=trace``: causal tracing (ROME) of the known facts from the configured perspective.

    What a trace computes (window, samples, noise) defaults to ``tracing.TraceSettings``, its one place.
    """

    name: str = "trace"
    # First N known facts (null: all).
    n_facts: Optional[int] = 100
    kinds: list[str] = field(default_factory=lambda: list(TraceSettings.kinds))
    # Also hidden-state traces with later MLP / attention outputs frozen.
    severed: bool = True
    # MLP / attention restore this many layers centred on the layer.
    window: int = TraceSettings.window
    # Noise samples per restoration.
    samples: int = TraceSettings.samples
    # gaussian | uniform
    noise: str = TraceSettings.noise
    # Noise scale = factor x std of subject-token embeddings over the dataset ...
    noise_factor: float = TraceSettings.noise_factor
    # ... or a fixed absolute scale.
    noise_scale: Optional[float] = TraceSettings.noise_scale
    # predicted (the model's greedy token, as ROME) | true (first token of the object)
    answer: str = "predicted"
    # Restored rows per batch (null: from free memory).
    max_rows: Optional[int] = None
    n_bootstrap: int = 1000
    confidence: float = 0.95
    # Per-fact heatmaps for the first N traced facts.
    plot_facts: int = 5
    knowledge_batch_size: int = 64
    progress: bool = True
    # Shard the facts over several devices (one model replica each); devices=1 traces in-process.
    fabric: FabricConfig = field(default_factory=FabricConfig)
    # Trace a seeded random sample of this many known facts (null: the known facts in dataset order),
    # then the first n_facts of it. The draw depends only on the known facts, the size and sample_seed, so
    # every perspective's job traces the same facts (paired); each job stores it in sample.json.
    sample: Optional[int] = None
    sample_seed: int = 0

    def trace_settings(self, seed: int, prefix: str = "stage") -> TraceSettings:
        if self.answer not in ("predicted", "true"):
            raise ConfigError(f"{prefix}.answer", self.answer, "unknown answer choice", hint="use predicted or true")
        if self.n_facts is not None and self.n_facts < 1:
            raise ConfigError(f"{prefix}.n_facts", self.n_facts, "must be >= 1 or null", hint="null traces every known fact")
        if self.sample is not None and self.sample < 1:
            raise ConfigError(f"{prefix}.sample", self.sample, "must be >= 1 or null", hint="null: no random sample")
        if not 0 <= self.sample_seed < 2**32:
            raise ConfigError(f"{prefix}.sample_seed", self.sample_seed, "must be in [0, 2**32)", hint="e.g. 0")
        self.fabric.validate()
        if not 0 < self.confidence < 1:
            raise ConfigError(f"{prefix}.confidence", self.confidence, "must be in (0, 1)", hint="e.g. 0.95")
        return TraceSettings(kinds=tuple(self.kinds), severed=("mlp", "attn") if self.severed else (),
                             window=self.window, samples=self.samples, noise=self.noise,
                             noise_scale=self.noise_scale, noise_factor=self.noise_factor, seed=seed)


@dataclass
class SummarizeStageConfig:
    name: str = "summarize"
    sweep_dir: str = MISSING
    # Metrics for the markdown table (all metrics go to the csv / parquet).
    metrics: list[str] = field(default_factory=lambda: [
        "entity.reliability", "entity.generality", "entity.locality", "entity.score",
        "relation.reliability", "relation.generality", "relation.locality", "relation.removal", "relation.score",
        "entity.reliability_guarded", "entity.score_guarded", "relation.reliability_guarded", "relation.score_guarded",
        "quality.fluency", "quality.nll", "quality.collapsed"])


EXAMPLES = ("entity", "relation", "both")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class TrainMendStageConfig(MendTrainConfig):
    name: str = "train_mend"
    # Which edits to train on: entity (prompt -> o*, as MEND), relation (add prompt -> phrase) or both.
    examples: str = "entity"
    # CounterFact training cases (null: the whole train split) and validation cases (val split).
    train_limit: Optional[int] = None
    precision: str = "32-true"
    progress: bool = True

    def validate(self) -> None:
        super().validate()
        check_choice("stage.examples", self.examples, EXAMPLES)
        check_choice("stage.precision", self.precision, PRECISIONS, "unknown precision")
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError("stage.train_limit", self.train_limit, "must be >= 1 or null")


CALIBRATION_SPLITS = ("train", "val")  # never the edit split the edit stage evaluates
UNCALIBRATED_EDITORS = {"mend": "MEND's knobs are trained, not set: sweep its training jobs instead",
                        "none": "there is no edit to calibrate"}


@dataclass
class CalibrateStageConfig(EditStageConfig):
    """``stage=calibrate``: a grid search of the editor's own knobs on training cases (``pipeline.stages.calibrate``).

    The edit settings (``n_cases``, ``edit_batch_size``, ``quality``, scoring) are the edit stage's and mean
    the same; the values below are set in ``conf/stage/calibrate.yaml`` (their one place).
    """

    name: str = "calibrate"
    # The facts: edits use the first n_cases (editable ones), the trace the first trace.n_facts known ones.
    dataset: DatasetConfig = MISSING
    # editor name -> {editor config key: list of values, or "auto" for layers}; the grid is their product.
    search: dict[str, dict[str, Any]] = MISSING
    # "auto" layers: at most this many, evenly strided (30 layers, 15 points: every 2nd layer).
    auto_points: int = MISSING
    # editor -> window: its "auto" layers are windows of this many consecutive layers ending at each auto
    # layer (MEMIT spreads an edit over a window); 1 for editors not listed.
    auto_window: dict[str, int] = MISSING
    # A point is eligible only if its mean fluency falls by at most this fraction of the unedited
    # model's and at most this fraction of its edits collapsed (stage.quality.collapse).
    max_fluency_drop: float = MISSING
    max_collapse_rate: float = MISSING
    # MLP AIE by layer for the figure: a finished trace job dir (its aie.safetensors), or null to trace
    # stage.trace.n_facts known facts of the same dataset here (cached per fact).
    trace_dir: Optional[str] = MISSING
    aie_role: str = MISSING
    trace: TraceStageConfig = field(default_factory=TraceStageConfig)

    def validate(self, prefix: str = "stage") -> None:
        super().validate(prefix)
        if self.dataset.name.startswith("counterfact"):  # a user file has no splits: its cases are the user's choice
            check_choice(f"{prefix}.dataset.split", self.dataset.split, CALIBRATION_SPLITS,
                         "calibration must not see the cases the edit stage evaluates")
        if not self.quality.enabled:
            raise ConfigError(f"{prefix}.quality.enabled", False, "the fluency floor needs the fluency scores",
                              "keep stage.quality.enabled=true")
        if self.auto_points < 1:
            raise ConfigError(f"{prefix}.auto_points", self.auto_points, "must be >= 1")
        for editor, window in self.auto_window.items():
            if window < 1:
                raise ConfigError(f"{prefix}.auto_window.{editor}", window, "must be >= 1")
        for key in ("max_fluency_drop", "max_collapse_rate"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "must be in [0, 1]", "e.g. 0.05")
        from tracing.spans import ROLES

        check_choice(f"{prefix}.aie_role", self.aie_role, ROLES, "unknown token role")

    def edit_settings(self) -> EditStageConfig:
        """The edit stage's settings these hold (``compute_edits`` scores every point with them)."""
        from dataclasses import fields

        return EditStageConfig(**{f.name: getattr(self, f.name) for f in fields(EditStageConfig) if f.name != "name"})


def _known_dataset() -> DatasetConfig:
    return DatasetConfig(name="known")


@dataclass
class FullStageConfig:
    name: str = "full"
    # Facts traced (the model's known ones among them); the paper traces ROME's known facts.
    trace_dataset: DatasetConfig = field(default_factory=_known_dataset)
    trace: TraceStageConfig = field(default_factory=TraceStageConfig)
    edit: EditStageConfig = field(default_factory=EditStageConfig)
    # Skip a step entirely (e.g. tracing only, or editing with a trace computed elsewhere).
    run_trace: bool = True
    run_edit: bool = True
