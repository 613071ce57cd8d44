"""API keys and tenants: a TOML or YAML keys file, sha256-hashed keys, scopes and adapter globs.

Example keys file (TOML)::

    [[keys]]
    key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # sha256("test")
    tenant = "acme"
    scopes = ["generate", "admin"]
    adapters = ["acme-*"]
    rate_limit = { requests_per_second = 5, tokens_per_minute = 20000 }
    scheduling = { weight = 1.0, max_running_requests = 8, max_queued_requests = 64 }

The YAML form is the same list under a top-level `keys:`. Keys of one tenant share one rate-limit
bucket and one scheduling policy, so they must list the same `rate_limit` and `scheduling` (or none).
`scheduling` (every field optional; a missing one takes the server default): `weight`, the tenant's
share under fair scheduling relative to others; `max_running_requests`, its requests in the running
batch at once (more wait in the queue); `max_queued_requests`, its requests in flight (running and
waiting) before new ones get 429.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.engine.fairness import TenantPolicy

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Scope = Literal["generate", "admin"]
SCOPES: tuple[Scope, ...] = ("generate", "admin")


class KeyFileError(ValueError):
    """The keys file cannot be read or is invalid; the message names the file and the field."""


class RateLimit(BaseModel):
    """Per-tenant limits; a missing field means no limit of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: float | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)


class Scheduling(BaseModel):
    """Per-tenant scheduling: fair-share weight and request caps; a missing field takes the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, gt=0, le=1000)
    max_running_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=1)


class KeyEntry(BaseModel):
    """One API key as stored: its sha256, tenant, scopes and the adapter name globs it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    tenant: str = Field(min_length=1, max_length=128)
    scopes: list[Scope] = Field(min_length=1)
    adapters: list[str] = Field(default_factory=list)
    rate_limit: RateLimit | None = None
    scheduling: Scheduling | None = None


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: tenant, scopes, adapter globs and rate limit."""

    tenant: str
    scopes: frozenset[str]
    adapter_globs: tuple[str, ...]
    rate_limit: RateLimit | None = None
    scheduling: Scheduling | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use(self, adapter_name: str) -> bool:
        """Whether this caller may see, use or manage the adapter called `adapter_name`."""
        return any(fnmatchcase(adapter_name, glob) for glob in self.adapter_globs)


OPEN_PRINCIPAL = Principal(tenant="open", scopes=frozenset(SCOPES), adapter_globs=("*",))


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The keys of one keys file; `authenticate` maps a presented key to its Principal."""

    def __init__(self, entries: list[KeyEntry]):
        self._entries = [(bytes.fromhex(e.key_sha256), _principal(e)) for e in entries]
        limits: dict[str, RateLimit | None] = {}
        self.scheduling: dict[str, Scheduling] = {}  # tenant -> policy, for tenants that set one
        for entry in entries:
            if limits.setdefault(entry.tenant, entry.rate_limit) != entry.rate_limit:
                raise KeyFileError(f"tenant {entry.tenant!r}: its keys list different rate_limit values")
            if entry.scheduling is not None:
                self.scheduling.setdefault(entry.tenant, entry.scheduling)
        for entry in entries:
            if entry.scheduling != self.scheduling.get(entry.tenant):
                raise KeyFileError(f"tenant {entry.tenant!r}: its keys list different scheduling values")

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Parse a .toml, .yaml or .yml keys file; raise KeyFileError naming the problem."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"auth file {str(path)!r} cannot be read: {exc.strerror}") from None
        suffix = Path(path).suffix.lower()
        try:
            if suffix == ".toml":
                raw = tomllib.loads(text)
            elif suffix in (".yaml", ".yml"):
                raw = yaml.safe_load(text)
            else:
                raise KeyFileError(f"auth file {str(path)!r} must end in .toml, .yaml or .yml")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise KeyFileError(f"auth file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
        try:
            return cls(KeyFile.model_validate(raw).keys)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise KeyFileError(f"auth file {str(path)!r} is invalid: {problems}") from None

    def authenticate(self, presented_key: str) -> Principal | None:
        """The Principal of `presented_key`, or None. Compares every stored digest in constant time."""
        digest = hash_key(presented_key)
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = principal
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _principal(entry: KeyEntry) -> Principal:
    return Principal(
        tenant=entry.tenant,
        scopes=frozenset(entry.scopes),
        adapter_globs=tuple(entry.adapters),
        rate_limit=entry.rate_limit,
        scheduling=entry.scheduling,
    )


def tenant_policies(auth_file: Path | None, default: TenantPolicy) -> dict[str, TenantPolicy]:
    """The engine's per-tenant scheduling policies from the keys file, missing fields from `default`."""
    if auth_file is None:
        return {}
    return {
        tenant: TenantPolicy(
            weight=s.weight,
            max_running_requests=s.max_running_requests or default.max_running_requests,
            max_queued_requests=s.max_queued_requests or default.max_queued_requests,
        )
        for tenant, s in KeyRing.from_file(auth_file).scheduling.items()
    }
