"""Show the automatic template -> relation-id matching next to the reviewed table, write the
derived object table, and report coverage.

    python -m facts.tables.build_templates [--data-dir DIR] [--write-objects] [--show-all]

Automatic matching: a template is matched against ParaRel patterns truncated before a final [Y]
and against known_1000 templates; ambiguous (several ids) and unmatched templates are listed
with their objects and the relations their locality prompts point to, for the reviewer.
``templates.yaml`` (reviewed) is the source of truth; ``objects.yaml`` is generated from it:
relation id -> objects (true and new) of the cases under single-relation templates, plus the
known_1000 attributes of that relation.
"""

from __future__ import annotations

import argparse
import collections
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from core.io import atomic_write_text
from facts.relations import TemplateTable, load_template_table, resolve_relation
from facts.sources import pararel_patterns, resolve
from facts.templates import match_prompt, pararel_template, template_of

log = logging.getLogger(__name__)

SPLITS = ("edit", "train", "val")


@dataclass
class Coverage:
    cases: int
    templates: int
    templates_mapped: int  # templates with at least one candidate
    templates_single: int
    cases_with_relation: int
    by_how: dict[str, int]


def mend_records(data_dir: Optional[Path]) -> list[dict]:
    records: list[dict] = []
    for split in SPLITS:
        records += resolve(f"counterfact_mend/{split}", data_dir=data_dir).json()
    return records


def automatic_matches(data_dir: Optional[Path]) -> dict[str, set[str]]:
    """template -> relation ids from ParaRel (truncated before a final [Y]) and known_1000."""
    auto: dict[str, set[str]] = collections.defaultdict(set)
    for rid, patterns in pararel_patterns(data_dir).items():
        for row in patterns:
            template = pararel_template(row["pattern"])
            if template:
                auto[template].add(rid)
    for row in resolve("known_1000", data_dir=data_dir).json():
        auto[row["template"]].add(row["relation_id"])
    return auto


def object_table(records: list[dict], table: TemplateTable, known: list[dict]) -> dict[str, list[str]]:
    objects: dict[str, set[str]] = collections.defaultdict(set)
    for row in records:
        candidates = table.candidates(template_of(row["prompt"], row["subject"])) or ()
        if len(candidates) == 1:
            objects[candidates[0]].update((row["ground_truth"], row["target_new"]))
    for row in known:
        objects[row["relation_id"]].add(row["attribute"])
    return {rid: sorted(items) for rid, items in sorted(objects.items())}


def coverage(records: list[dict], table: TemplateTable) -> Coverage:
    templates = {template_of(r["prompt"], r["subject"]) for r in records}
    how = collections.Counter(
        resolve_relation(table, template_of(r["prompt"], r["subject"]), r["locality_prompt"], r["ground_truth"], r["target_new"]).how
        for r in records
    )
    with_relation = sum(n for key, n in how.items() if key in ("template", "locality", "objects"))
    return Coverage(
        cases=len(records), templates=len(templates),
        templates_mapped=sum(1 for t in templates if table.candidates(t)),
        templates_single=sum(1 for t in templates if len(table.candidates(t) or ()) == 1),
        cases_with_relation=with_relation, by_how=dict(sorted(how.items())),
    )


def review_lines(records: list[dict], auto: dict[str, set[str]], table: TemplateTable, show_all: bool) -> list[str]:
    by_template: dict[str, list[dict]] = collections.defaultdict(list)
    for row in records:
        by_template[template_of(row["prompt"], row["subject"])].append(row)
    lines = []
    for template, rows in sorted(by_template.items(), key=lambda item: (-len(item[1]), item[0])):
        automatic = sorted(auto.get(template, ()))
        reviewed = list(table.candidates(template) or ())
        if len(automatic) == 1 and reviewed == automatic and not show_all:
            continue
        objects = collections.Counter(r["ground_truth"] for r in rows).most_common(8)
        local = collections.Counter()
        for r in rows:
            match = match_prompt(r["locality_prompt"], table.entries, strip_suffix=r["ground_truth"])
            local["/".join(table.entries[match.template]) if match else "-"] += 1
        lines.append(
            f"{len(rows):5d} {template!r:48} auto={automatic or '-'} reviewed={reviewed or 'null'}\n"
            f"        objects={objects}\n        locality relations={dict(local.most_common(5))}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--write-objects", action="store_true")
    parser.add_argument("--show-all", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = mend_records(args.data_dir)
    auto = automatic_matches(args.data_dir)
    templates = {template_of(r["prompt"], r["subject"]) for r in records}
    single = sum(1 for r in records if len(auto.get(template_of(r["prompt"], r["subject"]), ())) == 1)
    several = sum(1 for r in records if len(auto.get(template_of(r["prompt"], r["subject"]), ())) > 1)
    log.info("automatic matching: %d templates; cases with exactly one id %d, several %d, none %d",
             len(templates), single, several, len(records) - single - several)
    table = load_template_table(with_objects=False)
    if args.write_objects:
        known = resolve("known_1000", data_dir=args.data_dir).json()
        text = "# GENERATED by facts/tables/build_templates.py --write-objects from templates.yaml; do not edit.\n"
        text += yaml.safe_dump(object_table(records, table, known), allow_unicode=True, sort_keys=True, width=120)
        atomic_write_text(Path(__file__).with_name("objects.yaml"), text)
    for line in review_lines(records, auto, table, args.show_all):
        log.info(line)
    result = coverage(records, load_template_table())
    log.info("reviewed: %d/%d templates mapped (%d to one id); cases with a relation id %d/%d (%.2f%%); by evidence %s",
             result.templates_mapped, result.templates, result.templates_single, result.cases_with_relation,
             result.cases, 100 * result.cases_with_relation / result.cases, result.by_how)


if __name__ == "__main__":
    main()
