"""Elasticsearch side of Inflow: index template, bulk writer, search.

Knows nothing of Faust or the model: documents come in as plain mappings
(the Prediction contract), query vectors as plain float sequences.
"""

from indexer.actions import ItemOutcome, ItemStatus, build_action, chunk_actions
from indexer.bulk import BulkOutcome, BulkWriter, Rejected, RetryPolicy
from indexer.client import EsSettings
from indexer.errors import (
    IndexerError,
    IndexRequestError,
    IndexSetupError,
    IndexUnavailable,
    LifecycleError,
)
from indexer.mapping import (
    DEFAULT_ALIAS,
    EMBEDDING_DIMS,
    ModelIndices,
    alias_dims,
    alias_indices,
    ensure_index,
    ensure_model_index,
    index_meta,
    index_problem,
    model_index_name,
    model_space,
    model_write_alias,
    set_index_meta,
    switch_alias,
)
from indexer.search import Hit, Searcher, SearchResult

__all__ = [
    "DEFAULT_ALIAS",
    "EMBEDDING_DIMS",
    "BulkOutcome",
    "BulkWriter",
    "EsSettings",
    "Hit",
    "IndexRequestError",
    "IndexSetupError",
    "IndexUnavailable",
    "IndexerError",
    "ItemOutcome",
    "ItemStatus",
    "LifecycleError",
    "ModelIndices",
    "Rejected",
    "RetryPolicy",
    "SearchResult",
    "Searcher",
    "alias_dims",
    "alias_indices",
    "build_action",
    "chunk_actions",
    "ensure_index",
    "ensure_model_index",
    "index_meta",
    "index_problem",
    "model_index_name",
    "model_space",
    "model_write_alias",
    "set_index_meta",
    "switch_alias",
]
