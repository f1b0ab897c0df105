"""Index template, alias and write index for Prediction documents."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch, TransportError

from indexer.client import describe_es_error
from indexer.errors import IndexSetupError

DEFAULT_ALIAS = "inflow-predictions"
EMBEDDING_DIMS = 384  # the default model's width, and the packaged mappings' default
MAX_EMBEDDING_DIMS = 4096  # dense_vector's limit
EMBEDDING_FIELD = "embedding"
PASSAGES_FIELD = "passages"  # nested: start, end, embedding of each window of a long text
# processed_ts - event_ts in ms, derived when indexing (actions.latency_ms): no scripts needed.
LATENCY_FIELD = "latency_ms"
MAPPINGS_RESOURCE = "prediction_mappings.json"
# Above the built-in templates (priority 100 for logs-*-*, metrics-*-*, ...), so a
# configured alias that happens to overlap one of their patterns still gets ours.
TEMPLATE_PRIORITY = 500
TEMPLATE_VERSION = 3  # 2: latency_ms, 3: passages

# Leaves room for the "-000001" suffix within Elasticsearch's 255-byte name limit.
_ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")


def validate_alias(alias: str) -> str:
    """Return ``alias`` if Elasticsearch accepts it as an index/alias name, else raise."""
    if not _ALIAS_RE.fullmatch(alias) or alias in {".", ".."}:
        raise ValueError(
            f"invalid alias {alias!r}: lowercase letters, digits, '.', '_' and '-' only, "
            "not starting with '.', '_' or '-', at most 200 characters"
        )
    return alias


@cache
def _packaged_mappings() -> dict[str, Any]:
    # Next to this module rather than importlib.resources: an editable install made before
    # the package had an __init__ registers it as a namespace, which resources cannot read.
    text = Path(__file__).with_name(MAPPINGS_RESOURCE).read_text("utf-8")
    mappings: dict[str, Any] = json.loads(text)
    dims = mappings["properties"][EMBEDDING_FIELD]["dims"]
    if dims != EMBEDDING_DIMS:  # the JSON file and the constant must never drift apart
        raise RuntimeError(f"{MAPPINGS_RESOURCE}: embedding dims {dims} != {EMBEDDING_DIMS}")
    return mappings


def prediction_mappings(dims: int = EMBEDDING_DIMS) -> dict[str, Any]:
    """The mappings of a predictions index whose embeddings have ``dims`` numbers (a fresh
    copy the caller may change)."""
    if not 1 <= dims <= MAX_EMBEDDING_DIMS:
        raise ValueError(f"embedding dims must be within 1..{MAX_EMBEDDING_DIMS}, got {dims}")
    mappings = copy.deepcopy(_packaged_mappings())
    mappings["properties"][EMBEDDING_FIELD]["dims"] = dims
    mappings["properties"][PASSAGES_FIELD]["properties"][EMBEDDING_FIELD]["dims"] = dims
    return mappings


def index_pattern(alias: str) -> str:
    """The pattern of the concrete indices behind ``alias``."""
    return f"{validate_alias(alias)}-*"


def first_index_name(alias: str) -> str:
    """The first concrete index behind ``alias`` (rollover-style numbering)."""
    return f"{validate_alias(alias)}-000001"


def index_template(
    alias: str, *, shards: int = 1, replicas: int | None = None, dims: int = EMBEDDING_DIMS
) -> dict[str, Any]:
    """Keyword arguments for ``indices.put_index_template`` covering ``alias``'s indices."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if replicas is not None and replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    settings: dict[str, Any] = {"number_of_shards": shards}
    if replicas is not None:
        settings["number_of_replicas"] = replicas
    return {
        "name": validate_alias(alias),
        "index_patterns": [index_pattern(alias)],
        "priority": TEMPLATE_PRIORITY,
        "version": TEMPLATE_VERSION,
        "meta": {"managed_by": "inflow.indexer", "document": "Prediction"},
        "template": {"settings": {"index": settings}, "mappings": prediction_mappings(dims)},
    }


def _error_type(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("type", exc.message))
    return str(exc.message)


async def ensure_index(
    es: AsyncElasticsearch,
    alias: str = DEFAULT_ALIAS,
    *,
    shards: int = 1,
    replicas: int | None = None,
    dims: int | None = None,
) -> None:
    """Put the index template and, if ``alias`` is missing, its first write index.

    ``dims`` is the width of the embeddings that will be written (the engine's); None keeps
    an existing alias's width (384 for a new one). An alias whose indices hold another width
    is refused with a one-line IndexSetupError, before anything is changed: one alias never
    mixes widths.

    Idempotent, and safe when several workers start at once: losing the race to
    create the index is fine as long as the alias exists afterwards. An existing
    index keeps its mappings; a changed template only applies to later indices.
    """
    exists = await es.indices.exists_alias(name=alias)
    have = await alias_dims(es, alias) if exists else None
    if dims is not None and have is not None and have != dims:
        raise IndexSetupError(
            f"alias {alias!r} holds {have}-wide embeddings and this engine makes {dims}-wide "
            "ones: index this model under another alias (INFLOW_ES_ALIAS)"
        )
    width = dims or have or EMBEDDING_DIMS
    await es.indices.put_index_template(
        **index_template(alias, shards=shards, replicas=replicas, dims=width)
    )
    if exists:
        return
    if await es.indices.exists(index=alias):
        # Not an alias (checked above), so a concrete index or data stream holds the name,
        # typically from writes before the template existed. Real Elasticsearch would
        # refuse the alias below anyway; this says why (and some imitations do not refuse).
        raise IndexSetupError(f"{alias!r} is a concrete index or data stream, not an alias")
    index = first_index_name(alias)
    try:
        await es.indices.create(index=index, aliases={alias: {"is_write_index": True}})
    except ApiError as exc:
        if exc.meta.status == 429 or exc.meta.status >= 500:
            raise  # transient: the caller's retry loop handles it
        if _error_type(exc) != "resource_already_exists_exception":
            message = f"cannot create index {index!r} for alias {alias!r}: {exc}"
            raise IndexSetupError(message) from exc
    if not await es.indices.exists_alias(name=alias):
        # The index exists but the alias does not point at it (someone removed it):
        # writing through the alias would fail, and guessing a repair is not ours to do.
        raise IndexSetupError(f"index {index!r} exists but alias {alias!r} does not point at it")


async def alias_dims(es: AsyncElasticsearch, alias: str) -> int | None:
    """The embedding width of the indices behind ``alias`` (None when they map none)."""
    body = (await es.indices.get_mapping(index=alias)).body
    widths = {
        props[EMBEDDING_FIELD].get("dims")
        for index in body.values()
        if EMBEDDING_FIELD in (props := index.get("mappings", {}).get("properties", {}))
    }
    widths.discard(None)
    if len(widths) > 1:
        raise IndexSetupError(f"alias {alias!r} already mixes embedding widths {sorted(widths)}")
    return int(widths.pop()) if widths else None


async def index_problem(es: AsyncElasticsearch, alias: str = DEFAULT_ALIAS) -> str | None:
    """Why documents cannot be written through `alias` now, or None when they can.

    For readiness probes: one cheap request, never raises. Unreachable, refused credentials
    and a missing alias each get their own one-line reason.
    """
    try:
        if await es.indices.exists_alias(name=alias):
            return None
        return f"alias {alias!r} does not exist yet"
    except (ApiError, TransportError) as exc:
        return describe_es_error(exc)


# ------------------------------------------------------------------ one index per model
#
# The read alias (``alias``) points at exactly one model's index at a time, so a kNN query
# through it never compares two models' vectors. Documents are written through a write alias
# per model, ``<alias>.<space>``, where the space names the model whose embeddings they hold
# (`model_space`): a worker that swaps to another model writes to that model's index, which
# `inflow reindex` fills and then puts behind the read alias in one atomic alias update.

META_KEY = "inflow"
_ENGINE_VERSION_RE = re.compile(r"^v\d+-[a-z0-9]+-[a-z0-9]+-([0-9a-f]+)$")
_SPACE_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def model_space(version: str) -> str:
    """The embedding space of an engine version: its model hash (builds of one model at other
    precisions share it: the parity gate holds their vectors to one another)."""
    match = _ENGINE_VERSION_RE.fullmatch(version)
    if match:
        return match.group(1)
    return _SPACE_UNSAFE.sub("-", version.lower()).strip("-_")[:40] or "unknown"


def model_write_alias(alias: str, space: str) -> str:
    return f"{validate_alias(alias)}.{space}"


def model_index_name(alias: str, space: str) -> str:
    return f"{validate_alias(alias)}-{space}"


async def index_meta(es: AsyncElasticsearch, index: str) -> dict[str, Any]:
    """The ``_meta.inflow`` record of an index ({} when it has none)."""
    body = (await es.indices.get_mapping(index=index)).body
    meta = body.get(index, {}).get("mappings", {}).get("_meta", {})
    record = meta.get(META_KEY, {}) if isinstance(meta, dict) else {}
    return dict(record) if isinstance(record, dict) else {}


async def set_index_meta(es: AsyncElasticsearch, index: str, record: dict[str, Any]) -> None:
    await es.indices.put_mapping(index=index, meta={META_KEY: record})


async def alias_indices(es: AsyncElasticsearch, alias: str) -> list[str]:
    """The concrete indices ``alias`` points at (none when it does not exist)."""
    if not await es.indices.exists_alias(name=alias):
        return []
    return sorted((await es.indices.get_alias(name=alias)).body)


async def ensure_model_index(
    es: AsyncElasticsearch, alias: str, space: str, *, dims: int, version: str
) -> str:
    """The write alias of model ``space``'s index behind ``alias``, created when missing.

    The read alias's only index, when it records no model yet (an index made before indices
    per model), is adopted as this model's. Otherwise a new index ``<alias>-<space>`` is made;
    it goes behind the read alias only when that alias does not exist yet.
    """
    write_alias = model_write_alias(alias, space)
    if await es.indices.exists_alias(name=write_alias):
        return write_alias
    behind = await alias_indices(es, alias)
    for index in behind:
        record = await index_meta(es, index)
        if record.get("space") == space or (not record and len(behind) == 1):
            if not record:
                await set_index_meta(es, index, {"space": space, "version": version})
            await es.indices.put_alias(index=index, name=write_alias, is_write_index=True)
            return write_alias
    index = model_index_name(alias, space)
    mappings = prediction_mappings(dims)
    mappings["_meta"] = {META_KEY: {"space": space, "version": version}}
    aliases: dict[str, Any] = {write_alias: {"is_write_index": True}}
    if not behind:
        aliases[alias] = {"is_write_index": True}
    try:
        await es.indices.create(index=index, mappings=mappings, aliases=aliases)
    except ApiError as exc:
        if exc.meta.status == 429 or exc.meta.status >= 500:
            raise
        if _error_type(exc) != "resource_already_exists_exception":
            message = f"cannot create index {index!r} for model {space}: {exc}"
            raise IndexSetupError(message) from exc
        await es.indices.put_alias(index=index, name=write_alias, is_write_index=True)
    return write_alias


async def switch_alias(es: AsyncElasticsearch, alias: str, index: str) -> list[str]:
    """Point ``alias`` at ``index`` alone, in one atomic alias update; returns the indices it
    pointed at before (a reader sees either the old set or the new index, never both)."""
    before = await alias_indices(es, alias)
    actions: list[dict[str, Any]] = [
        {"remove": {"index": old, "alias": alias}} for old in before if old != index
    ]
    actions.append({"add": {"index": index, "alias": alias, "is_write_index": True}})
    await es.indices.update_aliases(actions=actions)
    return before


class ModelIndices:
    """Routes each Prediction document to its model's write alias (a `BulkWriter` route)."""

    def __init__(self, es: AsyncElasticsearch, alias: str) -> None:
        self._es = es
        self._alias = validate_alias(alias)
        self._targets: dict[str, str] = {}

    async def target(self, doc: Any) -> str:
        model = doc.get("model") if isinstance(doc, dict) else None
        version = model.get("version") if isinstance(model, dict) else None
        if not isinstance(version, str) or not version:
            return self._alias  # not a Prediction: the alias refuses or takes it, as before
        space = model_space(version)
        found = self._targets.get(space)
        if found is None:
            dims = doc.get("embedding_dim") or len(doc.get("embedding") or ()) or EMBEDDING_DIMS
            found = await ensure_model_index(
                self._es, self._alias, space, dims=int(dims), version=version
            )
            self._targets[space] = found
        return found
