"""API keys for the worker's search views: stored hashed, compared in constant time, rotatable.

The operator configures `INFLOW_WEB_API_KEYS=ID:sha256:HEX[,ID:sha256:HEX...]`: an id (what
the audit log names) and the SHA-256 of the key. Keys are random (`inflow web-key` makes
one: 256 bits), so a plain SHA-256 is enough; a slow password hash would only slow every
request. Several entries can be active at once: add the new key, move clients over, remove
the old one. Clients send `Authorization: ApiKey KEY` (or `Bearer KEY`, or `X-API-Key: KEY`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from streams.errors import ConfigError

KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PRESENTED_KEY = 256  # longer "keys" are not ours: refuse before hashing
KEY_PREFIX = "ifk_"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class StoredKey:
    key_id: str
    digest: bytes

    def __repr__(self) -> str:
        return f"StoredKey({self.key_id!r})"


class ApiKeys:
    """The active keys. `identify` answers which key id a presented key is, or None."""

    def __init__(self, keys: list[StoredKey]) -> None:
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("INFLOW_WEB_API_KEYS names a key id twice")
        self._keys = tuple(keys)

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        keys = []
        for entry in filter(None, (e.strip() for e in text.split(","))):
            key_id, _, rest = entry.partition(":")
            algorithm, _, hexdigest = rest.partition(":")
            if not KEY_ID_RE.fullmatch(key_id) or algorithm != "sha256":
                raise ConfigError(
                    "INFLOW_WEB_API_KEYS must be ID:sha256:HEX entries separated by commas "
                    "(ID of letters, digits, '.', '_', '-'; `inflow web-key` makes one)"
                )
            if not _DIGEST_RE.fullmatch(hexdigest.lower()):
                raise ConfigError(
                    f"INFLOW_WEB_API_KEYS entry {key_id!r}: the SHA-256 must be 64 hex digits "
                    "(store the key's hash, never the key)"
                )
            keys.append(StoredKey(key_id, bytes.fromhex(hexdigest)))
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def ids(self) -> list[str]:
        return [k.key_id for k in self._keys]

    def identify(self, presented: str | None) -> str | None:
        """The id of the key `presented` is, else None. Every stored key is compared, each with
        `hmac.compare_digest`, so the time taken does not depend on which one (if any) matched."""
        if not presented or len(presented) > MAX_PRESENTED_KEY:
            return None
        wanted = digest(presented)
        found = None
        for key in self._keys:
            if hmac.compare_digest(wanted, key.digest):
                found = key.key_id
        return found


def new_key(key_id: str) -> tuple[str, str]:
    """A fresh random key and its `INFLOW_WEB_API_KEYS` entry (the only place the key is
    shown is the caller's output; the worker stores the entry)."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise ConfigError("a key id is 1-64 letters, digits, '.', '_' or '-'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, f"{key_id}:sha256:{digest(key).hex()}"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: ApiKey K` / `Bearer K`, or `X-API-Key: K`.
    `headers` must be case-insensitive (aiohttp's are)."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() in ("apikey", "bearer") and value.strip():
        return value.strip()
    header = headers.get("X-API-Key", "").strip()
    return header or None


def is_loopback(host: str) -> bool:
    """True when a bind address is reachable only from this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" / 0.0.0.0 style wildcards
