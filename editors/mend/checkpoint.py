"""MEND checkpoints: ``mend.safetensors`` (network state) + ``mend.json`` (what it was trained for).

A checkpoint is a directory holding both files: the training job dir, and a cache entry
``<cache>/mend/<hash>/`` keyed by model identity, layers, network and training settings. The
editor takes an explicit path or looks the cache up by model identity (and layers); a
checkpoint trained for another model, or for projections of another shape, is refused.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from core.errors import CacheError, ConfigError, ModelError
from core.hashing import CacheEntry, corrupt_error, read_cached, repair_enabled
from core.io import atomic_save_tensors, atomic_write_json, load_tensors
from editors.config import NetworkConfig
from editors.mend.network import MendNetwork
from models.load import LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = "2"  # 2: the last layer clamps too, token-mean losses (the authors' network)
WEIGHTS, META = "mend.safetensors", "mend.json"
CACHE_KIND = "mend"


def layer_shapes(loaded: LoadedModel, layers: Sequence[int]) -> dict[int, tuple[int, int]]:
    """``{layer: (d_in, d_out)}`` of the MLP output projections (from the weights, not the config)."""
    shapes = {}
    for layer in layers:
        d_out, d_in = loaded.adapter.mlp_out_matrix(loaded.model, layer).shape
        shapes[layer] = (int(d_in), int(d_out))
    return shapes


def build_metadata(loaded: LoadedModel, network: MendNetwork, config: NetworkConfig, training: dict[str, Any],
                   summary: dict[str, Any]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "model": loaded.identity, "layers": network.layers,
            "shapes": {str(layer): list(shape) for layer, shape in network.shapes.items()},
            "network": asdict(config), "training": training, "summary": summary}


def save_checkpoint(directory: str | Path, network: MendNetwork, metadata: dict[str, Any]) -> Path:
    """Write the weights first and the json last (a directory with a json is complete)."""
    directory = Path(directory)
    atomic_save_tensors(directory / WEIGHTS, dict(network.state_dict()), metadata={"format_version": FORMAT_VERSION})
    atomic_write_json(directory / META, metadata)
    return directory


def cache_entry(cache_dir: str | Path, metadata: dict[str, Any]) -> CacheEntry:
    key = {k: metadata[k] for k in ("format_version", "model", "layers", "network", "training")}
    return CacheEntry(cache_dir, CACHE_KIND, key)


def save_to_cache(cache_dir: str | Path, network: MendNetwork, metadata: dict[str, Any]) -> Path:
    entry = cache_entry(cache_dir, metadata)
    with entry.lock():
        entry.clear()
        save_checkpoint(entry.dir, network, metadata)
        entry.mark_done()
    return entry.dir


def find_checkpoint(cache_dir: str | Path | None, identity: dict[str, Any], layers: Optional[Sequence[int]]) -> Path:
    """The newest cached checkpoint trained for this model (and these layers, when given)."""
    root = Path(cache_dir) / CACHE_KIND if cache_dir is not None else None
    found = []
    for marker in sorted(root.glob("*/key.json")) if root is not None and root.exists() else []:
        meta_path = marker.parent / META
        if not meta_path.exists():
            continue
        try:
            meta = read_cached(CACHE_KIND, meta_path)
            if repair_enabled():
                read_cached(CACHE_KIND, marker.parent / WEIGHTS, load_tensors)
        except CacheError as err:
            if not repair_enabled():
                raise
            log.warning("mend: removing corrupt cache entry %s (%s); retrain with stage=train_mend", marker.parent, err.problem)
            marker.unlink(missing_ok=True)
            shutil.rmtree(marker.parent, ignore_errors=True)
            continue
        if meta.get("model") == identity and (layers is None or sorted(meta.get("layers", [])) == sorted(layers)):
            found.append((marker.stat().st_mtime, marker.parent))
    if not found:
        raise ConfigError("editor.checkpoint", None, f"no trained MEND for {identity.get('name')} (layers {layers}) "
                          f"in {root}", "train one: python -m pipeline.run stage=train_mend model=<model>, "
                          "or set editor.checkpoint=/path/to/dir")
    found.sort()
    if len(found) > 1:
        log.info("mend: %d cached checkpoints match; using the newest, %s", len(found), found[-1][1])
    return found[-1][1]


def load_checkpoint(path: str | Path, loaded: LoadedModel, layers: Optional[Sequence[int]] = None) -> tuple[MendNetwork, dict]:
    """The network of a checkpoint dir (or its ``mend.safetensors``), checked against ``loaded``."""
    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    if not (directory / META).exists() or not (directory / WEIGHTS).exists():
        raise ConfigError("editor.checkpoint", str(path), f"no {WEIGHTS} + {META} there", "point at a train_mend job dir or its cache entry")
    meta = read_cached(CACHE_KIND, directory / META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError("editor.checkpoint", str(path), f"format {meta.get('format_version')}, expected {FORMAT_VERSION}",
                          "retrain with stage=train_mend")
    check_compatible(meta, loaded, str(path))
    trained_layers = [int(layer) for layer in meta["layers"]]
    if layers is not None and sorted(layers) != sorted(trained_layers):
        raise ConfigError("editor.layers", list(layers), f"the checkpoint edits layers {trained_layers}",
                          "set editor.layers to the checkpoint's layers or train for these")
    network = MendNetwork({int(k): tuple(v) for k, v in meta["shapes"].items()}, NetworkConfig(**meta["network"]))
    weights = read_cached(CACHE_KIND, directory / WEIGHTS, load_tensors)
    try:
        network.load_state_dict(weights)
    except RuntimeError as err:  # missing or misshapen tensors: written by something else
        raise corrupt_error(CACHE_KIND, directory / WEIGHTS, err, directory) from err
    network.to(loaded.device).eval()
    return network, meta


def check_compatible(meta: dict[str, Any], loaded: LoadedModel, where: str) -> None:
    """Refuse a checkpoint trained for another model or for projections of other shapes."""
    if meta.get("model") != loaded.identity:
        raise ModelError("editor.checkpoint", where, f"trained for {meta.get('model', {}).get('name')!r} "
                         f"({meta.get('model')}), not for {loaded.identity.get('name')!r} ({loaded.identity})",
                         "train MEND for this model: python -m pipeline.run stage=train_mend model=<model>")
    layers = [int(layer) for layer in meta["layers"]]
    bad = [layer for layer in layers if not 0 <= layer < loaded.adapter.n_layers]
    if bad:
        raise ModelError("editor.checkpoint", where, f"edits layers {bad}, out of range for this model", "retrain for this model")
    actual = layer_shapes(loaded, layers)
    for layer in layers:
        if tuple(meta["shapes"][str(layer)]) != actual[layer]:
            raise ModelError("editor.checkpoint", where, f"layer {layer} was {tuple(meta['shapes'][str(layer)])}, "
                             f"the model's is {actual[layer]}", "the checkpoint belongs to another architecture")
