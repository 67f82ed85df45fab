"""Training MEND's hypernetwork with Lightning Fabric (device, precision, checkpoint/resume).

Each step takes ``n_edits`` CounterFact training cases (disjoint from the evaluation cases) and,
as MEND does:

1. the gradient factors of the target NLL on the *edit* prompt (prompt -> o*), unedited model;
2. Delta W = network(factors), applied functionally (the graph reaches the network);
3. edit loss: the target NLL after the edit on the *equivalent* prompt (a paraphrase -> o*),
   averaged over the batch's target tokens as the inner loss (``factors.token_mean_nll``);
   locality loss: KL(p_before || p_after) over the tokens of an unrelated prompt (the case's
   neighbourhood prompt and its answer);
4. loss = cedit * edit + cloc * locality; Adam on the network (``lr``) and on the per-layer step
   sizes (``lr_lr``), gradient norm clipped at ``grad_clip``.

Relation-perspective training examples (add prompt -> relation phrase, paraphrase, neighbour
prompt) come from ``facts.perspectives`` requests, as the relation edits MEND is asked to make.
Fabric saves ``resume.ckpt`` (network, optimizer, step, history) every ``checkpoint_every``
steps in the work dir; a rerun there continues from it. Data order is a seeded permutation
indexed by the step, so a resumed run sees the same cases as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from core.errors import ConfigError, DataError
from editors.config import MendTrainConfig, NetworkConfig
from editors.ft import target_batch
from editors.mend.checkpoint import layer_shapes
from editors.mend.factors import edited_forward, gradient_factors, projection_names, token_mean_nll
from editors.mend.network import MendNetwork
from models.load import LoadedModel

log = logging.getLogger(__name__)

RESUME = "resume.ckpt"


@dataclass(frozen=True)
class MendExample:
    """One training edit: edit prompt -> target, an equivalent prompt, an unrelated prompt -> its answer."""

    prompt: str
    target: str
    equivalent_prompt: str
    locality_prompt: str
    locality_target: str


def examples_from_facts(facts: Sequence[Any]) -> list[MendExample]:
    """Entity edits from ``facts.schema.Fact`` cases with a new object and a neighbourhood prompt."""
    out = []
    for fact in facts:
        if not fact.target_new or not fact.neighborhood_prompts:
            continue
        equivalent = fact.paraphrase_prompts[0] if fact.paraphrase_prompts else fact.prompt
        out.append(MendExample(fact.prompt, fact.target_new, equivalent, fact.neighborhood_prompts[0],
                               fact.neighborhood_target or fact.target_true))
    return out


def examples_from_relation_requests(requests: Sequence[Any]) -> list[MendExample]:
    """Relation edits from ``facts.perspectives.RelationRequest`` cases (add prompt -> relation phrase)."""
    out = []
    for request in requests:
        if not request.neighborhood_prompts:
            continue
        equivalent = request.paraphrase_prompts[0] if request.paraphrase_prompts else request.add_prompt
        out.append(MendExample(request.add_prompt, request.target_add, equivalent, request.neighborhood_prompts[0],
                               request.neighborhood_target))
    return out


@dataclass
class TrainResult:
    network: MendNetwork
    history: list[dict[str, float]]
    validation: list[dict[str, float]]
    steps: int
    seconds: float
    resumed_from: int


def _kl_rows(base_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of KL(p_base || p_post).  logits: [batch pos vocab], mask: [batch pos]"""
    base = base_logits.float().log_softmax(-1)
    post = post_logits.float().log_softmax(-1)
    kl = F.kl_div(post, base, log_target=True, reduction="none").sum(-1)  # [batch pos]
    return (kl * mask).sum() / mask.sum()


def edit_losses(loaded: LoadedModel, network: torch.nn.Module, layers: list[int], names: dict[int, str],
                examples: Sequence[MendExample]) -> dict[str, Tensor]:
    """Edit and locality losses of one batch of edits (differentiable w.r.t. the network)."""
    inner = target_batch(loaded, [e.prompt for e in examples], [e.target for e in examples])
    factors, inner_loss = gradient_factors(loaded, inner, layers)
    updates = network(factors)
    outer = target_batch(loaded, [e.equivalent_prompt for e in examples], [e.target for e in examples])
    post_outer = edited_forward(loaded, names, updates, outer.inputs()).logits
    local = target_batch(loaded, [e.locality_prompt for e in examples], [e.locality_target for e in examples])
    with torch.no_grad():
        base_local = loaded.model(**local.inputs()).logits
    post_local = edited_forward(loaded, names, updates, local.inputs()).logits
    locality = _kl_rows(base_local, post_local, local.attention_mask)
    with torch.no_grad():
        picked = post_outer[outer.token_rows, outer.token_cols].argmax(-1) == outer.token_ids
        hits = torch.zeros(outer.n_rows, device=picked.device).index_add(0, outer.token_rows, (~picked).float()) == 0
    return {"edit": token_mean_nll(post_outer, outer), "locality": locality, "inner": torch.tensor(inner_loss),
            "edit_accuracy": hits.float().mean()}


def _order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _batch(examples: Sequence[MendExample], step: int, n_edits: int, seed: int) -> list[MendExample]:
    """The step's cases: consecutive slices of a seeded permutation per epoch (a pure function of the step)."""
    per_epoch = max(1, len(examples) // n_edits)
    epoch, index = divmod(step, per_epoch)
    order = _order(len(examples), seed, epoch)
    return [examples[int(i)] for i in order[index * n_edits:(index + 1) * n_edits]]


def validate(loaded: LoadedModel, network: torch.nn.Module, layers: list[int], names: dict[int, str],
             examples: Sequence[MendExample], n_edits: int) -> dict[str, float]:
    """Mean losses and edit accuracy over validation edits (network in eval mode)."""
    was_training = network.training
    network.eval()
    totals: dict[str, float] = {}
    batches = [examples[i:i + n_edits] for i in range(0, len(examples), n_edits)]
    for batch in batches:
        with torch.no_grad():  # the inner gradient enables grad for itself
            losses = edit_losses(loaded, network, layers, names, batch)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(batches)
    network.train(was_training)
    return totals


def fabric_for(loaded: LoadedModel, precision: str):
    """A single-device Fabric on the model's device."""
    from lightning_fabric import Fabric

    device = loaded.device
    if device.type == "cuda":
        return Fabric(accelerator="cuda", devices=[device.index or 0], precision=precision)
    return Fabric(accelerator="cpu", devices=1, precision=precision)


def train_mend(loaded: LoadedModel, train: Sequence[MendExample], val: Sequence[MendExample], layers: Sequence[int],
               network_config: NetworkConfig, config: MendTrainConfig, work_dir: str | Path, precision: str = "32-true",
               progress: bool = True, on_log: Optional[Callable[[dict[str, float]], None]] = None) -> TrainResult:
    """Train (or resume training) a MEND network for ``layers`` of ``loaded``; see the module docstring."""
    config.validate()
    if not train:
        raise DataError("train", 0, "no training edits", "use CounterFact cases with new objects and neighbourhood prompts")
    layers = sorted(set(layers))
    work_dir = Path(work_dir)
    fabric = fabric_for(loaded, precision)
    torch.manual_seed(config.seed)
    network = MendNetwork(layer_shapes(loaded, layers), network_config)
    weights = [p for n, p in network.named_parameters() if n != "edit_lrs"]
    optimizer = torch.optim.Adam([{"params": weights, "lr": config.lr},
                                  {"params": [network.edit_lrs], "lr": config.lr_lr}])
    network, optimizer = fabric.setup(network, optimizer)
    names = projection_names(loaded, layers)
    history: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []
    start = 0
    resume = work_dir / RESUME
    if resume.exists():
        state = {"network": network, "optimizer": optimizer, "step": 0, "history": [], "validation": []}
        fabric.load(resume, state, weights_only=True)
        start, history, validation = int(state["step"]), list(state["history"]), list(state["validation"])
        log.info("mend: resuming from step %d (%s)", start, resume)

    def save_resume(step: int) -> None:
        tmp = resume.with_name(RESUME + ".partial")
        fabric.save(tmp, {"network": network, "optimizer": optimizer, "step": step, "history": history, "validation": validation})
        tmp.replace(resume)

    started = time.time()
    network.train()
    window: dict[str, float] = {}
    bar = tqdm(range(start, config.steps), desc="train mend", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        with fabric.autocast():
            losses = edit_losses(loaded, network, layers, names, _batch(train, step, config.n_edits, config.seed))
        loss = config.cedit * losses["edit"] + config.cloc * losses["locality"]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError("stage.lr", config.lr, f"training diverged at step {step} (loss {value})", "lower lr or edit_lr")
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(network, optimizer, max_norm=config.grad_clip)
        optimizer.step()
        for key, number in {"loss": value, **{k: float(v.detach()) for k, v in losses.items()}}.items():
            window[key] = window.get(key, 0.0) + number
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            count = config.log_every if done % config.log_every == 0 else done % config.log_every
            row = {"step": done, **{k: v / count for k, v in window.items()}, "edit_lr_mean": float(network.edit_lrs.detach().mean())}
            history.append(row)
            window = {}
            bar.set_postfix(loss=f"{row['loss']:.3f}", edit=f"{row['edit']:.2f}", loc=f"{row['locality']:.3f}")
            if on_log is not None:
                on_log(row)
        if val and (done % config.val_every == 0 or done == config.steps):
            validation.append({"step": done, **validate(loaded, network, layers, names, val, config.n_edits)})
            log.info("mend step %d validation: %s", done, {k: round(v, 4) for k, v in validation[-1].items()})
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_resume(done)
    module = network.module if hasattr(network, "module") else network
    module.eval()
    return TrainResult(module, history, validation, config.steps, time.time() - started, start)
