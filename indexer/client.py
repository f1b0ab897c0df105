"""Connection settings and the client's ownership, shared by the writer and the searcher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from elasticsearch import ApiError, AsyncElasticsearch, TransportError

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


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (the transport's `errors`, causes, contexts): a TLS failure's
    reason sits a few levels down, under a `TlsError('TLS error')`."""
    found: list[BaseException] = []
    stack = [exc]
    while stack and len(found) < 20:
        current = stack.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        stack.extend(e for e in getattr(current, "errors", ()) if isinstance(e, BaseException))
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


def describe_es_error(exc: BaseException) -> str:
    """One line saying why a request to Elasticsearch failed, naming the setting to check.

    Never the response body as is (a TLS-terminating proxy answers HTML) and never a secret:
    the client's errors hold neither the API key nor the password.
    """
    if isinstance(exc, ApiError):
        status = exc.meta.status
        if status in (401, 403):
            return (
                f"Elasticsearch refused the credentials (HTTP {status}): check INFLOW_ES_API_KEY "
                "or INFLOW_ES_USERNAME/INFLOW_ES_PASSWORD"
            )
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            kind = str(body["error"].get("type") or "")
            detail = str(body["error"].get("reason") or "")
            reason = f"{kind} ({detail[:200]})" if kind and detail else kind or detail
        else:
            reason = str(exc.message)
        return f"Elasticsearch answered HTTP {status}: {_one_line(reason)}"
    if isinstance(exc, TransportError):
        causes = _causes(exc)
        text = " ".join(str(e) for e in causes)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return (
                "TLS: the Elasticsearch server's certificate is not trusted: check "
                "INFLOW_ES_CA_CERTS (unknown CA?)"
            )
        if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            return "TLS: the server does not speak HTTPS there: check INFLOW_ES_URL's scheme"
        if any(isinstance(e, ConnectionRefusedError) for e in causes):
            return "Elasticsearch unreachable: connection refused (INFLOW_ES_URL)"
        inner = next((e for e in reversed(causes) if str(e)), exc)
        return f"Elasticsearch unreachable ({type(exc).__name__}): {_one_line(str(inner), 160)}"
    return f"{type(exc).__name__}: {_one_line(str(exc))}"


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
