"""Rebuild ``facts/bundled/`` from a data folder: deterministic gzip -9 copies (mtime 0, no name).

Run ``python -m facts.bundle /work/shared/data``. Each copy is checked against the catalog's
sha256 before it is written, so the bundle can only ever hold the published bytes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
from pathlib import Path

from core.io import atomic_path
from facts.sources import CATALOG, PARAREL_BUNDLE, PARAREL_IDS, bundled_dir, verify_bytes

log = logging.getLogger(__name__)


def deterministic_gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(data)
    return buffer.getvalue()


def build_bundle(data_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, int]:
    """Write every bundled file; return {file name: compressed bytes}."""
    data_dir, out = Path(data_dir), Path(out_dir) if out_dir else bundled_dir()
    sizes: dict[str, int] = {}
    for spec in CATALOG.values():
        if spec.bundled is None or spec.bundled.startswith("pararel:"):
            continue
        data = (data_dir / spec.relative_path).read_bytes()
        verify_bytes(spec, data, str(data_dir / spec.relative_path))
        sizes[spec.bundled] = _write(out / spec.bundled, deterministic_gzip(data))
    texts = {}
    for rid in PARAREL_IDS:
        spec = CATALOG[f"pararel/{rid}"]
        data = (data_dir / spec.relative_path).read_bytes()
        verify_bytes(spec, data, str(data_dir / spec.relative_path))
        texts[rid] = data.decode("utf-8")
    payload = json.dumps(texts, sort_keys=True, ensure_ascii=False).encode("utf-8")
    sizes[PARAREL_BUNDLE] = _write(out / PARAREL_BUNDLE, deterministic_gzip(payload))
    return sizes


def _write(path: Path, blob: bytes) -> int:
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
        tmp.chmod(0o644)  # mkstemp creates 0600; package data must be world-readable
    return len(blob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sizes = build_bundle(args.data_dir)
    for name, size in sorted(sizes.items()):
        log.info("%-40s %9d bytes", name, size)
    log.info("total %d bytes", sum(sizes.values()))


if __name__ == "__main__":
    main()
