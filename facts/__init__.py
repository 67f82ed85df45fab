"""Facts: data sources, loaders, reviewed relation tables, and entity/relation perspectives."""

from core.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "facts.config": ("DatasetConfig",),
    "facts.load": ("load_facts",),
    "facts.perspectives": ("BUILDER_VERSION", "EntityRequest", "RelationRequest", "RelationRequestSet",
                           "build_entity_request", "build_relation_requests", "corrupted_char_spans"),
    "facts.relations": ("RelationInfo", "load_relation_table", "load_template_table", "resolve_relation"),
    "facts.schema": ("Fact", "FactSet", "LoadReport"),
    "facts.sources": ("pararel_patterns", "resolve", "wikitext"),
})

__all__ = [
    "BUILDER_VERSION", "DatasetConfig", "EntityRequest", "Fact", "FactSet", "LoadReport", "RelationInfo",
    "RelationRequest", "RelationRequestSet", "build_entity_request", "build_relation_requests", "corrupted_char_spans",
    "load_facts", "load_relation_table", "load_template_table", "pararel_patterns", "resolve", "resolve_relation",
    "wikitext",
]
