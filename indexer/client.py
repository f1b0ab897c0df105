"""Connection settings and the client's ownership, shared by the writer and the searcher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from elasticsearch import AsyncElasticsearch

from indexer.errors import LifecycleError


@dataclass(frozen=True, slots=True)
class EsSettings:
    """How to reach Elasticsearch. Secrets come from the caller and stay out of ``repr``."""

    url: str = "http://localhost:9200"
    api_key: str | None = field(default=None, repr=False)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    verify_certs: bool = True
    ca_certs: str | None = None
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"es url must be http(s)://host[:port], got {self.url!r}")
        if self.api_key is not None and self.basic_auth is not None:
            raise ValueError("give api_key or basic_auth, not both")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")

    def make_client(self) -> AsyncElasticsearch:
        """A new client. Its own retries are off: callers retry with backoff, the
        transport would retry at once and multiply the attempts."""
        kwargs: dict[str, Any] = {
            "request_timeout": self.request_timeout,
            "max_retries": 0,
            "retry_on_status": (),
            "retry_on_timeout": False,
        }
        if self.api_key is not None:
            kwargs["api_key"] = self.api_key
        if self.basic_auth is not None:
            kwargs["basic_auth"] = self.basic_auth
        if self.url.startswith("https"):
            kwargs["verify_certs"] = self.verify_certs
            if self.ca_certs is not None:
                kwargs["ca_certs"] = self.ca_certs
        return AsyncElasticsearch(self.url, **kwargs)


class ClientSlot:
    """Holds a client that is either injected (the caller closes it) or owned (we do)."""

    def __init__(self, settings: EsSettings | None, client: AsyncElasticsearch | None) -> None:
        if settings is not None and client is not None:
            raise ValueError("give settings or an injected client, not both")
        self._settings = settings or EsSettings()
        self._injected = client
        self._client: AsyncElasticsearch | None = None
        self._stopped = False

    @property
    def started(self) -> bool:
        return self._client is not None

    def open(self) -> AsyncElasticsearch:
        if self._stopped:
            raise LifecycleError("already stopped; create a new instance")
        if self._client is None:
            injected = self._injected
            self._client = injected if injected is not None else self._settings.make_client()
        return self._client

    def get(self) -> AsyncElasticsearch:
        if self._client is None:
            state = "stopped" if self._stopped else "not started"
            raise LifecycleError(f"{state}: call `await start()` first")
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        self._stopped = True
        if client is not None and client is not self._injected:
            await client.close()
