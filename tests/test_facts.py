"""Tests for facts/: sources and checksums, loaders, validation, reviewed tables, perspectives.

Fast (no model). The shared data folder is optional: tests that compare against it skip without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from core.errors import CacheError, ConfigError, DataError
from facts import counterfact, sources
from facts.config import DatasetConfig
from facts.load import load_facts
from facts.perspectives import (
    BUILDER_VERSION,
    build_entity_request,
    build_relation_request,
    build_relation_requests,
    corrupted_char_spans,
)
from facts.relations import load_relation_table, load_template_table
from facts.schema import Fact
from facts.sources import CATALOG, DataFile, Resolved
from facts.tables import build_templates
from facts.templates import template_of

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="no shared data folder")

CASES = 21_919
COVERAGE_FLOOR = 21_200  # measured 21,268 (97.03%) with templates.yaml + objects.yaml


@pytest.fixture(scope="module")
def relations():
    return load_relation_table()


@pytest.fixture(scope="module")
def all_cf():
    return load_facts(DatasetConfig(name="counterfact", split="all"))


@pytest.fixture(scope="module")
def mend_records():
    return build_templates.mend_records(None)


# ---------------------------------------------------------------- sources, bundle, checksums

@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, s in CATALOG.items() if s.bundled))
def test_bundled_copy_is_byte_identical_to_shared(name):
    bundled = sources.resolve(name)
    shared = sources.resolve(name, data_dir=SHARED)
    assert bundled.origin == "bundled" and shared.origin == "data_dir"
    assert bundled.data == shared.data


@needs_shared
@pytest.mark.parametrize("name,split", [("known", "edit"), ("counterfact", "val"), ("counterfact", "edit")])
def test_loaders_give_identical_records_from_bundle_and_shared(name, split):
    a = load_facts(DatasetConfig(name=name, split=split))
    b = load_facts(DatasetConfig(name=name, split=split), data_dir=SHARED)
    assert a.report.origin.startswith("bundled") and b.report.origin.startswith("data_dir")
    assert a.facts == b.facts and len(a) > 0


def test_bundle_is_small_and_deterministic(tmp_path):
    bundled = sources.bundled_dir()
    total = sum(p.stat().st_size for p in bundled.iterdir())
    assert total < 4_500_000, total
    assert (bundled / "NOTICE.md").read_text().count("CC BY-SA 3.0") >= 1
    if SHARED.exists():
        from facts.bundle import build_bundle
        sizes = build_bundle(SHARED, tmp_path)
        for name in sizes:
            assert (tmp_path / name).read_bytes() == (bundled / name).read_bytes(), name


def test_sha_mismatch_in_data_dir_raises(tmp_path):
    data = sources.resolve("known_1000").data
    (tmp_path / "known_1000.json").write_bytes(data.replace(b"Vinson Massif", b"Vinson Massiv", 1))
    with pytest.raises(DataError) as info:
        sources.resolve("known_1000", data_dir=tmp_path)
    assert "sha256" in str(info.value) and info.value.hint
    (tmp_path / "known_1000.json").write_bytes(data)
    assert sources.resolve("known_1000", data_dir=tmp_path).origin == "data_dir"


def test_explicit_path_must_be_a_published_file(tmp_path):
    bad = tmp_path / "known.json"
    bad.write_text("[]")
    with pytest.raises(DataError) as info:
        load_facts(DatasetConfig(name="known", path=str(bad)))
    assert info.value.key == "dataset.path" and "dataset=user" in info.value.hint


def test_missing_rome_counterfact_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_facts(DatasetConfig(name="counterfact", format="rome"), cache_dir=tmp_path)
    assert "dataset.download=true" in info.value.hint and "dataset.path" in info.value.hint


def test_download_checksum_failure_writes_nothing(tmp_path):
    served = tmp_path / "served.json"
    served.write_bytes(b'[{"not": "counterfact"}]')
    cache = tmp_path / "cache"
    with pytest.raises(CacheError):
        sources.resolve("counterfact_rome", cache_dir=cache, download=True, fetch=lambda url: served.read_bytes())
    with pytest.raises(CacheError):  # the real urllib path, on a file:// URL
        sources._from_cache_or_download(
            DataFile("counterfact_rome", "counterfact.json", CATALOG["counterfact_rome"].sha256, 1, None, served.as_uri()),
            cache, True, None)
    assert not (cache / "data" / "counterfact.json").exists()


def test_download_success_is_atomic_and_then_cached(tmp_path, monkeypatch):
    payload = json.dumps([_rome_record(0)]).encode()
    served = tmp_path / "served.json"
    served.write_bytes(payload)
    spec = DataFile("counterfact_rome", "counterfact.json", hashlib.sha256(payload).hexdigest(), len(payload), None, served.as_uri())
    monkeypatch.setitem(CATALOG, "counterfact_rome", spec)
    cache = tmp_path / "cache"
    first = sources.resolve("counterfact_rome", cache_dir=cache, download=True)
    assert first.origin == "download" and (cache / "data" / "counterfact.json").read_bytes() == payload
    assert not list((cache / "data").glob(".tmp-*"))
    assert sources.resolve("counterfact_rome", cache_dir=cache).origin == "cache"
    facts = load_facts(DatasetConfig(name="counterfact", format="rome", split="all"), cache_dir=cache)
    assert [f.case_id for f in facts] == [0] and facts[0].relation_id == "P103"


def test_wikitext_and_pararel_accessors():
    raw = sources.wikitext("wikitext-2-raw/wiki.test.raw")
    assert raw.count("\r\n") == 2891 and "<unk>" not in raw
    assert "<unk>" in sources.wikitext("wikitext-2/valid.txt")
    with pytest.raises(ConfigError):
        sources.wikitext("wikitext-103/train.txt")
    patterns = sources.pararel_patterns()
    assert len(patterns) == 39 and sum(len(v) for v in patterns.values()) == 329
    assert patterns["P103"][1]["pattern"] == "The mother tongue of [X] is [Y]."


# ---------------------------------------------------------------- loaders and validation

def test_known_facts(relations):
    facts = load_facts(DatasetConfig(name="known"))
    assert len(facts) == 1209 and facts.report.skipped == 0
    assert len(facts.report.relation_counts) == 33 and set(facts.report.relation_counts) <= set(relations)
    first = facts[0]
    assert (first.subject, first.target_true, first.relation_id) == ("Vinson Massif", "Antarctica", "P30")
    assert first.prompt == "Vinson Massif is located in the continent of"
    assert first.template == "{} is located in the continent of"
    for fact in facts:
        start, end = fact.subject_char_span()
        assert fact.prompt[start:end] == fact.subject and fact.template.replace("{}", fact.subject, 1) == fact.prompt


def test_counterfact_splits_and_case_0(all_cf):
    assert len(all_cf) == CASES and sorted(f.case_id for f in all_cf) == list(range(CASES))
    edit = load_facts(DatasetConfig(name="counterfact", split="edit", limit=5))
    assert len(edit) == 5 and edit.report.read == 5
    case0 = all_cf.by_case_id()[0]
    assert case0.prompt == "The mother tongue of Danielle Darrieux is" and case0.template == "The mother tongue of {} is"
    assert (case0.target_true, case0.target_new, case0.relation_id) == ("French", "English", "P103")
    assert case0.neighborhood_prompts == ("Michel Rocard is a native speaker of",) and case0.neighborhood_target == "French"
    assert case0.subject_char_span() == (21, 38)


def _mend(case_id=7, **overrides):
    row = {"case_id": case_id, "prompt": "The twin city of Lyon is", "subject": "Lyon", "target_new": "Manila",
           "ground_truth": "Beirut", "rephrase_prompt": "Lyon's twin city is", "locality_prompt": "The twin city of Trieste is",
           "locality_ground_truth": "Beirut"}
    row.update(overrides)
    return {k: v for k, v in row.items() if v is not ...}


def _rome_record(case_id):
    return {"case_id": case_id, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"], "neighborhood_prompts": ["Michel Rocard is a native speaker of"]}


MALFORMED = [
    (_mend(11, subject=...), "subject"),
    (_mend(12, prompt="The twin city of Paris is"), "prompt"),
    (_mend(13, ground_truth="  "), "target_true"),
    (_mend(14, target_new=""), "target_new"),
]


@pytest.fixture
def fake_mend(monkeypatch):
    """Serve hand-written MEND records as the edit split."""
    def install(rows):
        data = json.dumps(rows).encode()
        monkeypatch.setattr("facts.load.resolve", lambda name, **kw: Resolved(name, "path", "<test>", data))
    return install


@pytest.mark.parametrize("row,key", MALFORMED)
def test_malformed_record_strict_raises_with_case_id(fake_mend, row, key):
    fake_mend([_mend(1), row])
    with pytest.raises(DataError) as info:
        load_facts(DatasetConfig(name="counterfact", strict=True))
    assert info.value.case_id == row["case_id"] and info.value.key == key
    assert f"case {row['case_id']}" in str(info.value)


def test_malformed_records_non_strict_are_counted(fake_mend, caplog):
    fake_mend([_mend(1)] + [row for row, _ in MALFORMED] + ["not a dict"])
    facts = load_facts(DatasetConfig(name="counterfact"))
    assert [f.case_id for f in facts] == [1] and facts[0].relation_id == "P190"
    assert facts.report.read == 6 and facts.report.skipped == 5
    assert [e["case_id"] for e in facts.report.errors] == [11, 12, 13, 14, 5]
    assert "skipped 5 of 6" in caplog.text


def test_unknown_relation_id_is_a_data_error(relations):
    with pytest.raises(DataError) as info:
        counterfact.parse_rome({**_rome_record(3), "requested_rewrite": {**_rome_record(3)["requested_rewrite"], "relation_id": "P9999"}},
                               relations, "test")
    assert info.value.key == "relation_id" and info.value.case_id == 3


def test_rome_format_split_filter(monkeypatch, relations):
    rows = [_rome_record(0), _rome_record(2), {"case_id": 9}]
    data = json.dumps(rows).encode()
    real = sources.resolve
    monkeypatch.setattr("facts.load.resolve",
                        lambda name, **kw: Resolved(name, "path", "<t>", data) if name == "counterfact_rome" else real(name, **kw))
    facts = load_facts(DatasetConfig(name="counterfact", format="rome", split="edit"))
    assert [f.case_id for f in facts] == [0]  # case 2 is in the train split, not edit
    everything = load_facts(DatasetConfig(name="counterfact", format="rome", split="all"))
    assert everything.report.skipped == 1 and everything.report.errors[0]["key"] == "requested_rewrite"
    assert everything[0].paraphrase_prompts == ("Danielle Darrieux spoke the language",)


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"subject": "Lyon", "relation_id": "P190", "template": "The twin city of {} is", "object": " Beirut", "new_object": "Manila"},
        {"subject": "Paris", "relation_id": "P36", "template": "The capital of France is", "object": "Paris"},
        {"subject": "Rome", "relation_id": "P9999", "template": "{} is in", "object": "Italy"},
        {"subject": "Oslo", "relation_id": None, "template": "{} lies in", "object": ""},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    facts = load_facts(DatasetConfig(name="user", path=str(path)))
    assert len(facts) == 1 and facts[0].target_true == "Beirut" and facts[0].prompt == "The twin city of Lyon is"
    assert [(e["case_id"], e["key"]) for e in facts.report.errors] == [(1, "template"), (2, "relation_id"), (3, "target_true"), (4, "line")]
    with pytest.raises(DataError) as info:
        load_facts(DatasetConfig(name="user", path=str(path), strict=True))
    assert info.value.case_id == 1


def test_config_validation():
    with pytest.raises(ConfigError) as info:
        DatasetConfig(name="counterfakt")
    assert "counterfact_relation" in info.value.hint
    with pytest.raises(ConfigError):
        DatasetConfig(name="counterfact", split="test")
    with pytest.raises(ConfigError):
        DatasetConfig(name="user")
    with pytest.raises(ConfigError):
        load_facts(DatasetConfig(name="known", format="rome"))


# ---------------------------------------------------------------- reviewed tables

def test_relation_table_covers_every_relation_in_the_data(relations, all_cf):
    known = {f.relation_id for f in load_facts(DatasetConfig(name="known"))}
    mapped = {rid for candidates in load_template_table().entries.values() for rid in candidates}
    assert len(known) == 33 and len(mapped) == 34
    assert not (known | mapped | set(all_cf.report.relation_counts)) - set(relations)
    for rid, info in relations.items():
        assert info.phrase.startswith(" ") and not info.phrase.startswith("  "), rid
        assert 2 <= len(info.alternatives) <= 4 and info.label and info.templates, rid
        assert all(t.count("{}") == 1 and not t.rstrip().endswith("{}") for t in info.templates), rid
    assert relations["P103"].phrase == " native language" and relations["P190"].phrase == " twin city"
    assert relations["P36"].phrase == " capital" and relations["P17"].phrase == " country"
    assert "{} professionally plays the sport" in relations["P641"].templates


def test_template_table_covers_all_218_templates_and_coverage(mend_records):
    table = load_template_table()
    templates = {template_of(r["prompt"], r["subject"]) for r in mend_records}
    assert len(mend_records) == CASES and len(templates) == 218 and templates == set(table.entries)
    assert all(table.entries[t] for t in templates)  # no template left null
    reviewed = {"{}, the": ("P413", "P1303", "P641"), "What is the twin city of {}? It is": ("P190",),
                "{} speaks the language": ("P1412",), "{} spoke the language": ("P103",),
                "Where is {}? It is located in": ("P276",), "{} is from": ("P127",)}
    for template, expected in reviewed.items():
        assert table.entries[template] == expected
    result = build_templates.coverage(mend_records, table)
    assert result.templates_mapped == 218 and result.cases_with_relation >= COVERAGE_FLOOR


def test_objects_table_is_up_to_date(mend_records):
    import yaml
    checked_in = yaml.safe_load((Path(build_templates.__file__).with_name("objects.yaml")).read_text())
    known = sources.resolve("known_1000").json()
    assert build_templates.object_table(mend_records, load_template_table(with_objects=False), known) == checked_in


def test_per_case_resolution_examples(all_cf):
    by_id = all_cf.by_case_id()
    # "{}, the" with a position object resolves to P413, with an instrument to P1303
    the = [f for f in all_cf if f.template == "{}, the" and f.relation_id]
    assert {f.relation_id for f in the if f.target_true == "midfielder"} == {"P413"}
    assert {f.relation_id for f in the if f.target_true == "piano"} == {"P1303"}
    assert by_id[4].relation_id == "P190" and by_id[1].relation_id == "P140"


# ---------------------------------------------------------------- perspectives

def _fact(template, subject="Lyon", relation_id="P190"):
    return Fact(case_id=0, subject=subject, relation_id=relation_id, template=template,
                prompt=template.replace("{}", subject), target_true="Beirut", target_new="Manila")


def _texts(fact, spans):
    return [fact.prompt[a:b] for a, b in spans]


def test_corrupted_spans_entity_and_template_mode():
    fact = _fact("What is the twin city of {}? It is")
    assert _texts(fact, corrupted_char_spans(fact, "entity")) == ["Lyon"]
    assert corrupted_char_spans(fact, "entity") == [(25, 29)]
    assert _texts(fact, corrupted_char_spans(fact, "relation")) == ["What is the twin city of", "It is"]
    poss = _fact("{}'s capital city,", "France", "P36")
    assert _texts(poss, corrupted_char_spans(poss, "relation", "template")) == ["'s capital city"]
    assert _texts(_fact("{}, in", "Paris", "P17"), corrupted_char_spans(_fact("{}, in", "Paris", "P17"), "relation")) == ["in"]


def test_corrupted_spans_phrase_mode(relations):
    mother = _fact("The mother tongue of {} is", "Danielle Darrieux", "P103")
    assert _texts(mother, corrupted_char_spans(mother, "relation", "phrase")) == ["mother tongue"]
    assert _texts(mother, corrupted_char_spans(mother, "relation", "phrase", relations["P103"])) == ["mother tongue"]
    country = _fact("{} is located in the country of", "Kraków", "P17")
    assert _texts(country, corrupted_char_spans(country, "relation", "phrase")) == ["located in the country"]
    # the longest table match wins: the alternative " located in the country" over the phrase " country"
    assert _texts(country, corrupted_char_spans(country, "relation", "phrase", relations["P17"])) == ["located in the country"]
    city = _fact("{} worked in the city of", "Ada Lovelace", "P937")
    assert _texts(city, corrupted_char_spans(city, "relation", "phrase", relations["P937"])) == ["worked in"]
    twin = _fact("What is the twin city of {}? It is")
    assert _texts(twin, corrupted_char_spans(twin, "relation", "phrase", relations["P190"])) == ["twin city"]
    plays = _fact("{} plays", "Miles Davis", "P1303")
    assert _texts(plays, corrupted_char_spans(plays, "relation", "phrase")) == ["plays"]
    bare = _fact("{}, in", "Paris", "P17")  # nothing but function words: falls back to the template
    assert _texts(bare, corrupted_char_spans(bare, "relation", "phrase")) == ["in"]
    with pytest.raises(ConfigError):
        corrupted_char_spans(mother, "object")


def test_build_entity_request(all_cf):
    request = build_entity_request(all_cf.by_case_id()[4])
    assert (request.prompt, request.subject, request.target_new, request.target_true) == (
        "What is the twin city of Lyon? It is", "Lyon", "Manila", "Beirut")
    with pytest.raises(DataError):
        build_entity_request(load_facts(DatasetConfig(name="known", limit=1))[0])


def test_relation_requests_hand_checked(all_cf, relations):
    by_id = all_cf.by_case_id()
    r0 = build_relation_request(by_id[0], relations["P103"])
    assert r0.add_prompt == "The relation between Danielle Darrieux and English is"
    assert r0.add_template == "The relation between {} and English is"
    assert r0.remove_prompt == "The relation between Danielle Darrieux and French is"
    assert (r0.target_add, r0.target_remove, r0.relation_phrase) == ("native language", "None", "native language")
    assert r0.add_prompt[slice(*r0.add_subject_span)] == "Danielle Darrieux" and r0.add_subject_span == (21, 38)
    assert r0.add_prompt[slice(*r0.add_object_span)] == "English" and r0.add_object_span == (43, 50)
    assert r0.remove_prompt[slice(*r0.remove_object_span)] == "French"
    assert r0.neighborhood_subject == "Michel Rocard" and r0.neighborhood_object == "French"
    assert r0.neighborhood_prompts[0] == "The relation between Michel Rocard and French is"
    assert 3 <= len(r0.paraphrase_prompts) <= 5 and all("Danielle Darrieux" in p and "English" in p for p in r0.paraphrase_prompts)
    r4 = build_relation_request(by_id[4], relations["P190"])
    assert r4.add_prompt == "The relation between Lyon and Manila is" and r4.target_add == "twin city"
    assert r4.add_subject_span == (21, 25) and r4.add_object_span == (30, 36)
    assert r4.remove_prompt == "The relation between Lyon and Beirut is" and r4.neighborhood_subject == "Trieste"
    assert r4.authors_fields()["requested_rewrite"] == {
        "relation": {"strs": ["twin city"]}, "add_rel_prompt": "The relation between {} and Manila is",
        "rm_rel_prompt": "The relation between {} and Beirut is"}


def test_relation_requests_deterministic_cached_and_counted(all_cf, relations, tmp_path):
    first = build_relation_requests(all_cf.facts, relations, cache_dir=tmp_path)
    report = first.report
    assert report.cases == CASES and report.built == CASES - report.skipped_unknown_relation
    assert report.built >= COVERAGE_FLOOR and report.neighbor_recovered >= COVERAGE_FLOOR and not report.from_cache
    again = build_relation_requests(all_cf.facts, relations, cache_dir=tmp_path)
    assert again.report.from_cache and again.requests == first.requests
    assert build_relation_requests(all_cf.facts[:50], relations).requests == first.requests[: len(build_relation_requests(all_cf.facts[:50], relations).requests)]
    entries = list((tmp_path / "relation_requests").iterdir())
    assert any((e / "key.json").exists() and json.loads((e / "key.json").read_text())["builder_version"] == BUILDER_VERSION for e in entries)
    for request in first.requests[:2000]:
        assert request.add_prompt[slice(*request.add_subject_span)] == request.subject
        assert request.add_prompt[slice(*request.add_object_span)] == request.object_new
        assert request.remove_prompt[slice(*request.remove_object_span)] == request.object_true
        fact = all_cf.by_case_id()[request.case_id]
        if request.neighborhood_subject:
            assert request.neighborhood_subject in fact.neighborhood_prompts[0]


def test_data_dir_that_is_a_file_is_refused_not_silently_replaced_by_the_bundle(tmp_path):
    from core.errors import ConfigError
    from facts import DatasetConfig, load_facts

    (tmp_path / "data").write_text("")
    with pytest.raises(ConfigError, match="paths.data_dir"):
        load_facts(DatasetConfig(name="known"), data_dir=tmp_path / "data")


@pytest.mark.parametrize("name", ["known", "counterfact", "user"])
def test_dataset_path_that_is_a_directory_is_named(tmp_path, name):
    from core.errors import DataError
    from facts import DatasetConfig, load_facts

    with pytest.raises(DataError, match="is a directory") as info:
        load_facts(DatasetConfig(name=name, path=str(tmp_path)))
    assert info.value.key == "dataset.path"


GOOD_USER_ROW = {"subject": "Lyon", "relation_id": "P190", "template": "The twin city of {} is", "object": "Beirut",
                 "new_object": "Manila"}


def test_empty_user_file_says_so_not_use_counterfact(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no records") as info:
        load_facts(DatasetConfig(name="user", path=str(path)))
    assert info.value.key == "dataset.path" and "counterfact" not in str(info.value)


def test_entirely_skipped_user_file_counts_the_records_and_reasons(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{**GOOD_USER_ROW, "object": ""}, {**GOOD_USER_ROW, "object": " "}, {**GOOD_USER_ROW, "relation_id": "P9999"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as info:
        load_facts(DatasetConfig(name="user", path=str(path)))
    message = str(info.value)
    assert info.value.key == "dataset.path" and "all 3 records were skipped" in message
    assert "2 x target_true: must be a non-empty string" in message and "1 x relation_id: unknown relation id" in message
    assert "counterfact" not in message


def test_load_summary_counts_skips_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GOOD_USER_ROW, {**GOOD_USER_ROW, "object": ""}]) + "\n{broken\n")
    summary = load_facts(DatasetConfig(name="user", path=str(path))).report.summary()
    assert summary["n_read"] == 3 and summary["n_loaded"] == 1 and summary["n_skipped"] == 2
    assert summary["skip_reasons"] == {"target_true: must be a non-empty string": 1, "line: invalid JSON (Expecting property name enclosed in double quotes)": 1}


def test_duplicate_case_ids_are_refused_with_every_duplicated_id(tmp_path):
    path = tmp_path / "dups.jsonl"
    rows = [{**GOOD_USER_ROW, "case_id": 7}, {**GOOD_USER_ROW, "case_id": 7}, {**GOOD_USER_ROW, "case_id": 1},
            GOOD_USER_ROW, {**GOOD_USER_ROW, "case_id": 9}]  # the 4th has no case_id: its line number, 3
    rows.append({**GOOD_USER_ROW, "case_id": 3})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as info:
        load_facts(DatasetConfig(name="user", path=str(path)))
    assert info.value.key == "case_id" and info.value.value == [3, 7]
    assert "2 case ids occur more than once" in str(info.value)
