"""Typed schemas of the ``editor`` config group (registered by the pipeline as ``editor/<name>_schema``)
and the settings they hand to the editors' helpers.

Torch-free, so that registering the schemas (``python -m pipeline.run --cfg job``, ``--help``) does
not import torch: the editor modules import their configs from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from omegaconf import MISSING

from core.checks import check_choice, check_layer_list, check_layers
from core.errors import ConfigError


CORPORA = ("wikitext2", "wikitext103", "wikipedia", "files")


@dataclass
class StatsConfig:
    """Which corpus and how much of it; ``n_samples`` counts texts (articles or paragraphs)."""

    corpus: str = "wikitext2"
    n_samples: int = 100000
    max_tokens: int = 1024  # each sample is truncated to this many tokens (ROME: the model's context)
    batch_size: int = 8
    path: Optional[str] = None  # wikitext2: a dir holding the WikiText-2 files; files: a file or dir of .txt/.raw

    def validate(self) -> None:
        check_choice("stats.corpus", self.corpus, CORPORA, "unknown corpus")
        if self.n_samples < 1 or self.max_tokens < 2 or self.batch_size < 1:
            raise ConfigError("stats", asdict(self), "n_samples, batch_size >= 1 and max_tokens >= 2", "")
        if self.corpus == "files" and not self.path:
            raise ConfigError("stats.path", self.path, "corpus=files needs a path", "a text file or a directory of them")


@dataclass(frozen=True)
class ValueSettings:
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    early_stop_loss: float = 0.05
    relation_removal: str = "spaced"  # see LocateEditConfig.relation_removal


RELATION_REMOVALS = ("spaced", "authors")


@dataclass
class LocateEditConfig:
    """ROME/MEMIT hyperparameters (names follow the authors' hparams files)."""

    name: str = MISSING
    layers: list[int] = MISSING
    # value optimisation (compute_v / compute_z); the loss is read at the final layer
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    early_stop_loss: float = 0.05
    # The relation edit's removal target "None" (the (s, o) rewrite). spaced: trained as " None",
    # as the evaluation scores it, each row's NLL averaged over its own target tokens. authors: as
    # RaKE's compute_v_rel (tests/test_rome_fixtures.py test_relation_*; their MEMIT compute_z reads
    # the same): tok("None") without the leading space, and its rows divided by the relation
    # phrase's token count. Entity edits: no effect. The paper models' editor_model files use authors.
    # MEMIT with authors also takes RaKE's removal contexts: compute_z_rel's context_templates[:5]
    # slices MEMIT's template *groups*, i.e. every template ("{}" + the 5 generated); spaced keeps
    # five templates as in ROME (tests/test_memit_fixtures.py test_relation_z_and_deltas).
    relation_removal: str = "spaced"
    # context templates: [length, count] pairs; generation starts at these prompts ([] = start-of-text)
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_prompts: list[str] = field(default_factory=list)
    context_seed: int = 0
    # second-moment statistics of the rewritten layers' keys
    stats: StatsConfig = field(default_factory=StatsConfig)

    def value_settings(self) -> ValueSettings:
        return ValueSettings(self.v_num_grad_steps, self.v_lr, self.v_weight_decay, self.clamp_norm_factor,
                             self.kl_factor, tuple(self.kl_prompts), self.early_stop_loss, self.relation_removal)

    def __post_init__(self) -> None:
        check_layer_list("editor.layers", self.layers)  # required: a RomeConfig() without layers is refused here
        check_choice("editor.relation_removal", self.relation_removal, RELATION_REMOVALS)

    def validate(self, n_layers: int) -> None:
        check_layers("editor.layers", self.layers, n_layers)
        check_choice("editor.relation_removal", self.relation_removal, RELATION_REMOVALS)
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise ConfigError("editor", self.name, "v_num_grad_steps >= 1, v_lr > 0 and clamp_norm_factor > 0", "")
        self.stats.validate()


CONSTRAINT_KEYS = ("prompt", "mean")
# Named editors that are ROME with some fields fixed: name -> {field: required value}. Their yamls
# compose conf/editor/rome.yaml and set the name (and the fields), so their schema is RomeConfig.
ROME_VARIANTS: dict[str, dict[str, object]] = {
    "r_rome": {"constraint_key": "mean"},  # r-ROME: k* in the constraint too (conf/editor/r_rome.yaml)
    "rome_attn": {},  # the attention output projection (editors/rome_attn.py)
}


@dataclass
class RomeConfig(LocateEditConfig):
    name: str = "rome"
    mom2_adjustment: bool = True
    constraint_key: str = "prompt"

    # (check_editor_config: a RomeConfig may carry these names besides its own)
    variants = tuple(ROME_VARIANTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check()

    def validate(self, n_layers: int) -> None:
        super().validate(n_layers)
        self._check()

    def _check(self) -> None:
        check_choice("editor.constraint_key", self.constraint_key, CONSTRAINT_KEYS)
        for key, value in ROME_VARIANTS.get(self.name, {}).items():
            if getattr(self, key) != value:
                raise ConfigError(f"editor.{key}", getattr(self, key), f"{self.name} is ROME with {key}={value}",
                                  f"use editor=rome for {key}={getattr(self, key)}")


@dataclass
class MemitConfig(LocateEditConfig):
    name: str = "memit"
    clamp_norm_factor: float = 0.75  # |z - z_init| <= this x |z_init|, z_init the residual at the last layer
    # lambda in (lambda C + K^T K)^-1 with C = E[k k^T] the per-token mean, as kmeng01/memit's layer_stats
    # (they round C to float32 before the float64 solve; ours stays float64: tests/fixtures/memit/README.md)
    mom2_update_weight: float = 20000.0
    # the key averages per run of templates ("{}", then each [length, count]) and then over runs,
    # as the authors' compute_ks (the paper writes a flat mean); z's rows use every template once
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    context_prompts: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    value_batch_size: int = 16  # requests whose z are optimised together (independent rows)

    def validate(self, n_layers: int) -> None:
        super().validate(n_layers)
        if self.mom2_update_weight <= 0 or self.value_batch_size < 1:
            raise ConfigError("editor", self.name, "mom2_update_weight > 0 and value_batch_size >= 1", "")


@dataclass
class AlphaEditConfig(LocateEditConfig):
    """AlphaEdit (Fang et al., 2025): MEMIT's z and keys, the update projected on the preserved keys' null space.

    Values (conf/editor/alphaedit.yaml) are the authors' GPT-2 XL hparams; their ``mom2_update_weight``
    is in the hparams files but unused by AlphaEdit's update, so it is not a field here.
    """

    name: str = "alphaedit"
    clamp_norm_factor: float = 0.75
    # P projects on the eigenvectors of C = E[k k^T] whose eigenvalue is < this (absolute, as the authors)
    nullspace_threshold: float = 2e-2
    l2: float = 10.0  # the authors' "L2": weight of the identity in (P (K K^T + K_p K_p^T) + l2 I)
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    context_prompts: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    value_batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check()

    def validate(self, n_layers: int) -> None:
        super().validate(n_layers)
        self._check()

    def _check(self) -> None:
        if not self.nullspace_threshold > 0:
            raise ConfigError("editor.nullspace_threshold", self.nullspace_threshold, "must be > 0",
                              "the authors use 2e-2 (an absolute eigenvalue of the key second moment)")
        if not self.l2 > 0:
            raise ConfigError("editor.l2", self.l2, "must be > 0 (P (K K^T + K_p K_p^T) alone is singular)", "the authors use 10")
        if self.value_batch_size < 1:
            raise ConfigError("editor.value_batch_size", self.value_batch_size, "must be >= 1", "")


REWRITE_CHOICES = ("main", "all")
# Where a target's tokens are predicted. teacher_forced: token j after prompt + target[:j] (as the
# evaluation scores it). prompt_last: every target token from the prompt's last position, one
# bag of tokens (ROME's / RaKE's ft_main and knowledge-neurons; tests/fixtures/{ft,kn}/README.md).
# The same for one-token targets.
TARGET_POSITIONS = ("teacher_forced", "prompt_last")


# ------------------------------------------------------------------------------------------ FT
@dataclass
class FtConfig:
    """FT-L hyperparameters (ROME/EasyEdit names); the layer is per model (``editor_model/``)."""

    name: str = "ft"
    layers: list[int] = field(default_factory=lambda: [0])
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    # L-inf bound on each weight's change (null: unconstrained fine-tuning)
    norm_constraint: Optional[float] = 5e-4
    early_stop_loss: float = 1e-2
    rewrites: str = "main"
    # teacher_forced (ours) or prompt_last (the authors' ft_main: all target tokens read at the
    # prompt's last position); see TARGET_POSITIONS and tests/fixtures/ft/README.md
    target_positions: str = "teacher_forced"
    # also train the projection's bias: the authors' ft_main picks parameters by module-name
    # substring, so GPT-2's c_proj.bias is trained with the weight; no bias (Llama): no effect
    train_bias: bool = False

    def validate(self, n_layers: int) -> None:
        check_layers("editor.layers", self.layers, n_layers)
        check_choice("editor.rewrites", self.rewrites, REWRITE_CHOICES)
        check_choice("editor.target_positions", self.target_positions, TARGET_POSITIONS)
        if self.num_steps < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("editor", self.name, "num_steps >= 1, lr > 0 and weight_decay >= 0 are required", "")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ConfigError("editor.norm_constraint", self.norm_constraint, "must be > 0", "use null for no constraint")


OLD_TARGETS = ("request", "prediction")
KN_ACTIVATIONS = ("post", "pre")
IG_POINTS = ("midpoint", "linspace")
TARGET_SPACES = ("spaced", "bare")
KN_EDIT_RULES = ("symmetric", "authors")


@dataclass
class KnConfig:
    name: str = "kn"
    layers: Optional[list[int]] = None  # attributed layers (null: all)
    steps: int = 20
    adaptive_threshold: float = 0.2
    share_threshold: float = 0.4  # p: a neuron must be coarse in more than p x the prompts
    n_prompts: int = 5  # the bare prompt and the first n_prompts - 1 context templates
    edit_scale: float = 2.0
    old_target: str = "request"
    max_rows: int = 512  # (layer, step) rows per staircase batch
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[10, 4]])
    context_prompts: list[str] = field(default_factory=list)
    context_seed: int = 0
    # The authors' knowledge-neurons (ROME/RaKE baselines/kn) differ in five ways, each an option
    # here (tests/fixtures/kn/README.md; their runs: all five non-default, n_prompts=1):
    # post: attribute mlp.hook_post (the neuron's activation); pre: the output of the MLP's first
    # linear (GPT-2 c_fc before GELU, as their patch; Llama up_proj, numerically the same as post)
    activation: str = "post"
    # midpoint: alpha = (k + 1/2) / steps; linspace: alpha = linspace(0, 1, steps), both ends (theirs)
    ig_points: str = "midpoint"
    # teacher_forced or prompt_last: every old-target token attributed at the prompt's last position
    # (theirs: the retokenisation they meant is skipped for model_type "gpt2"); see TARGET_POSITIONS
    target_positions: str = "teacher_forced"
    # spaced: targets tokenized as " " + target (as evaluated); bare: without the space (theirs)
    target_space: str = "spaced"
    # symmetric: edit_scale x (mean new - mean old unembedding); authors: + each new-target token's
    # embedding once, - edit_scale x the unedited model's greedy next token's (knowledge-neurons'
    # modify_weights "edit" on GPT-2)
    edit_rule: str = "symmetric"

    def validate(self, n_layers: int) -> None:
        if self.layers is not None:
            check_layers("editor.layers", self.layers, n_layers, hint="use null for all layers")
        check_choice("editor.old_target", self.old_target, OLD_TARGETS)
        check_choice("editor.activation", self.activation, KN_ACTIVATIONS)
        check_choice("editor.ig_points", self.ig_points, IG_POINTS)
        check_choice("editor.target_positions", self.target_positions, TARGET_POSITIONS)
        check_choice("editor.target_space", self.target_space, TARGET_SPACES)
        check_choice("editor.edit_rule", self.edit_rule, KN_EDIT_RULES)
        if self.steps < 1 or self.n_prompts < 1 or self.max_rows < 1:
            raise ConfigError("editor", self.name, "steps, n_prompts and max_rows must be >= 1", "")
        if not 0 <= self.adaptive_threshold < 1 or not 0 <= self.share_threshold < 1:
            raise ConfigError("editor", self.name, "adaptive_threshold and share_threshold must be in [0, 1)", "e.g. 0.2 and 0.4")

    def attributed_layers(self, n_layers: int) -> list[int]:
        return sorted(set(self.layers)) if self.layers is not None else list(range(n_layers))


@dataclass
class NetworkConfig:
    """The hypernetwork's shape (MEND's defaults: rank 1920, one hidden layer, shared per shape)."""

    rank: int = 1920
    n_hidden: int = 1
    # initial per-layer step size (learned). Ours subtracts it (W - lr * grad~: the paper's update, so
    # an untrained network is gradient descent); the authors' code (kmeng01/rome baselines/mend) adds
    # lr * grad~, so their trained edit_lrs are ours negated (tests/test_mend_fixtures.py our_network).
    edit_lr: float = 1e-4
    shared: bool = True  # one MLP per layer shape, with per-layer scale/shift
    # normalise u and delta by running statistics of the training factors. The editor uses the trained
    # statistics (eval mode). The authors' MendRewriteExecutor leaves MEND in training mode after
    # loading, so its first edit replaces them by that request's own token statistics and later edits
    # accumulate (test_their_executor_is_training_mode_with_fresh_statistics). Deliberately not reproduced.
    norm: bool = True


@dataclass
class MendConfig:
    name: str = "mend"
    # edited MLP output projections (null: the checkpoint's); train_mend trains these. The authors'
    # published MEND also edits the MLP input projections (c_fc / fc_in) of the same layers; ours
    # edits the output projections only (deliberate: the matrices ROME and MEMIT edit).
    layers: Optional[list[int]] = None
    # a train_mend job dir / cache entry (or its mend.safetensors); null: newest cached one for the model
    checkpoint: Optional[str] = None
    rewrites: str = "main"
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def validate(self, n_layers: int) -> None:
        check_choice("editor.rewrites", self.rewrites, REWRITE_CHOICES)
        if self.layers is not None:
            check_layers("editor.layers", self.layers, n_layers, hint="use null for the checkpoint's layers")
        if self.network.rank < 1 or self.network.n_hidden < 0 or self.network.edit_lr <= 0:
            raise ConfigError("editor.network", self.network, "rank >= 1, n_hidden >= 0 and edit_lr > 0 are required", "")


@dataclass
class MendTrainConfig:
    """MEND's training hyperparameters (Mitchell et al.: lr 1e-6, lr_lr 1e-4, cedit 0.1, cloc 1)."""

    steps: int = 10000
    n_edits: int = 1  # edits per step, applied together
    lr: float = 1e-6
    lr_lr: float = 1e-4  # lr of the learned per-layer edit step sizes
    cedit: float = 0.1
    cloc: float = 1.0
    grad_clip: float = 100.0
    val_every: int = 500
    n_val: int = 50
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "n_edits", "val_every", "n_val", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stage.{key}", getattr(self, key), "must be >= 1")
        if self.lr <= 0 or self.lr_lr < 0 or self.cedit < 0 or self.cloc < 0 or self.grad_clip <= 0:
            raise ConfigError("stage", asdict(self), "lr, grad_clip > 0 and lr_lr, cedit, cloc >= 0 are required")

