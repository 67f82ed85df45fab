"""LICENSE matches the licence pyproject.toml declares; CITATION.cff is valid YAML with CFF's required keys."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_is_the_declared_licence():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_citation_cff_has_the_required_keys_and_cites_the_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert {"cff-version", "message", "title", "authors"} <= set(citation)
    assert citation["cff-version"] == "1.2.0" and citation["authors"]
    assert citation["license"] == "MIT"
    (paper,) = citation["references"]
    assert paper["year"] == 2024 and "2409.00617" in paper["url"]
    assert [a["family-names"] for a in paper["authors"]][0] == "Wei"
