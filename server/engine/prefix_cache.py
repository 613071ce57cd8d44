"""Content hashes of KV blocks, for automatic prefix caching (see server.engine.kv_cache).

A block's hash covers its tokens, the hash of the block before it (so equal blocks at different
prefixes differ) and a namespace: the adapter name and version and whether the adapter was merged
into the weights when the block was computed (merged weights are requantized, so their keys and
values differ slightly from the unmerged ones), the request's cache_salt if it has one, and (setting
prefix_cache_scope "tenant", the default) its tenant. Blocks are never shared across adapter versions,
nor by default across tenants: a shared cache lets a tenant learn whether another sent a prompt from
its own time to first token.
SHA-256, truncated to 16 bytes: a collision would silently reuse the wrong keys and values.
"""

from __future__ import annotations

import hashlib
from array import array


def namespace(adapter_key: tuple[str, int] | None, merged: bool, salt: str | None = None,
              tenant: str | None = None) -> bytes:
    """Blocks hash differently in each namespace: adapter version, weight mode, the request's cache_salt
    (vLLM's parameter: requests share cached prefixes only under the same salt) and, with the tenant
    scope, the tenant (None: shared across tenants)."""
    name = "base" if adapter_key is None else f"{adapter_key[0]}/{adapter_key[1]}"  # names cannot hold "/"
    salted = "" if salt is None else "|salt=" + hashlib.sha256(salt.encode()).hexdigest()
    scoped = "" if tenant is None else "|tenant=" + hashlib.sha256(tenant.encode()).hexdigest()
    return f"{name}|merged={int(merged)}{salted}{scoped}".encode()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], space: bytes, num_full_blocks: int,
                        block_size: int) -> list[bytes]:
    """Append to `hashes` (the request's chain so far) up to `num_full_blocks` block hashes; returns it."""
    previous = hashes[-1] if hashes else space
    for index in range(len(hashes), num_full_blocks):
        tokens = array("q", token_ids[index * block_size : (index + 1) * block_size]).tobytes()
        previous = hashlib.sha256(previous + tokens).digest()[:16]
        hashes.append(previous)
    return hashes
