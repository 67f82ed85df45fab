"""Facts: data sources, loaders, reviewed relation tables, and entity/relation perspectives."""

from facts.config import DatasetConfig
from facts.load import load_facts
from facts.perspectives import (
    BUILDER_VERSION,
    EntityRequest,
    RelationRequest,
    RelationRequestSet,
    build_entity_request,
    build_relation_requests,
    corrupted_char_spans,
)
from facts.relations import RelationInfo, load_relation_table, load_template_table, resolve_relation
from facts.schema import Fact, FactSet, LoadReport
from facts.sources import pararel_patterns, resolve, wikitext

__all__ = [
    "BUILDER_VERSION", "DatasetConfig", "EntityRequest", "Fact", "FactSet", "LoadReport", "RelationInfo",
    "RelationRequest", "RelationRequestSet", "build_entity_request", "build_relation_requests", "corrupted_char_spans",
    "load_facts", "load_relation_table", "load_template_table", "pararel_patterns", "resolve", "resolve_relation",
    "wikitext",
]
