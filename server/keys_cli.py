"""`loraplex keys add|list|revoke`: manage the API keys file that server/api/auth.py reads.

A new key is random (`lpx_` + 32 random bytes, URL-safe base64), printed once on stdout and never
stored: the file keeps only its sha256. `list` shows each key by the first 12 hex digits of that
hash; `revoke` takes such a prefix, the key itself, or `--tenant` for all of a tenant's keys.

TOML files are edited in place (a new `[[keys]]` block is appended, a revoked block is cut out), so
comments elsewhere survive; YAML files are rewritten. Every write goes through a temp file and
`os.replace`, with mode 0600, and the result is re-read with the server's own parser before it
replaces the old file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from server.api.auth import SCOPES, KeyEntry, KeyFileError, KeyRing, RateLimit, hash_key

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

KEY_PREFIX = "lpx_"
SHORT_HASH_LEN = 12
_TABLE_HEADER = re.compile(r"^\s*\[")


class KeysCommandError(Exception):
    """A user error in a keys command; the message is printed and the exit status is 1."""


def new_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_entries(path: Path) -> list[KeyEntry]:
    """The key entries of a keys file, validated as the server validates them; [] if it does not exist."""
    if not path.exists():
        return []
    _check_suffix(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError):
        raw = None  # KeyRing.from_file below reports it
    if isinstance(raw, dict) and not raw:
        return []  # a new file holding only comments
    KeyRing.from_file(path)  # raises KeyFileError naming the problem, exactly as at server start-up
    return [KeyEntry.model_validate(item) for item in raw["keys"]]


def summarize(path: Path) -> tuple[int, int]:
    """(number of keys, number of tenants) in a keys file."""
    entries = read_entries(path)
    return len(entries), len({entry.tenant for entry in entries})


def add_key(path: Path, tenant: str, scopes: list[str], adapters: list[str],
            rate_limit: RateLimit | None = None) -> tuple[str, KeyEntry]:
    """Create a key for `tenant`, store its hash in `path` (created if missing); return (key, entry).

    Without `rate_limit` the tenant keeps the limit its other keys already have, since keys of one
    tenant share one bucket.
    """
    entries = read_entries(path)
    if rate_limit is None:
        rate_limit = next((e.rate_limit for e in entries if e.tenant == tenant), None)
    key = new_key()
    try:
        entry = KeyEntry(key_sha256=hash_key(key).hex(), tenant=tenant, scopes=scopes, adapters=adapters,
                         rate_limit=rate_limit)
    except ValidationError as exc:
        raise KeysCommandError(_first_error(exc)) from None
    if path.suffix.lower() == ".toml" and path.exists():
        text = path.read_text(encoding="utf-8")
        separator = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
        new_text = text + separator + _toml_block(entry)
    else:
        new_text = _render(path, [*entries, entry])
    _write_checked(path, new_text)
    return key, entry


def revoke_keys(path: Path, *, hash_prefix: str | None = None, key: str | None = None,
                tenant: str | None = None) -> list[KeyEntry]:
    """Remove the keys matching one selector; return them. Refuses to leave the file with no key."""
    entries = read_entries(path)
    if not entries:
        raise KeysCommandError(f"{path}: no keys file or no keys")
    if key is not None:
        hash_prefix = hash_key(key).hex()
    if hash_prefix is not None:
        prefix = hash_prefix.lower()
        if len(prefix) < 6 or not re.fullmatch(r"[0-9a-f]+", prefix):
            raise KeysCommandError("give at least 6 hex digits of the key's sha256 (as `keys list` shows)")
        doomed = [e for e in entries if e.key_sha256.lower().startswith(prefix)]
        if len(doomed) > 1:
            raise KeysCommandError(f"{hash_prefix!r} matches {len(doomed)} keys; give more digits")
    else:
        doomed = [e for e in entries if e.tenant == tenant]
    if not doomed:
        raise KeysCommandError("no key matches")
    if len(doomed) == len(entries):
        raise KeysCommandError("that would remove every key, and the server refuses an empty keys file; "
                               "add the replacement key first")
    if path.suffix.lower() == ".toml":
        new_text = _cut_toml_blocks(path.read_text(encoding="utf-8"), {e.key_sha256.lower() for e in doomed})
    else:
        new_text = _render(path, [e for e in entries if e not in doomed])
    _write_checked(path, new_text)
    return doomed


def describe(entry: KeyEntry) -> str:
    """One line for `keys list`: short hash, tenant, scopes, adapter globs, rate limit."""
    limit = ""
    if entry.rate_limit is not None:
        limit = "  limit=" + ",".join(f"{k}={v}" for k, v in entry.rate_limit.model_dump(exclude_none=True).items())
    adapters = ",".join(entry.adapters) or "(base model only)"
    return (f"{entry.key_sha256[:SHORT_HASH_LEN].lower()}  tenant={entry.tenant}  "
            f"scopes={','.join(entry.scopes)}  adapters={adapters}{limit}")


# ---- file formats ------------------------------------------------------------------------------


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise KeysCommandError(f"{path}: a keys file must end in .toml, .yaml or .yml")


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def _toml_block(entry: KeyEntry) -> str:
    lines = [
        "[[keys]]",
        f"key_sha256 = {_toml_string(entry.key_sha256)}",
        f"tenant = {_toml_string(entry.tenant)}",
        f"scopes = [{', '.join(_toml_string(s) for s in entry.scopes)}]",
        f"adapters = [{', '.join(_toml_string(a) for a in entry.adapters)}]",
    ]
    if entry.rate_limit is not None:
        limits = entry.rate_limit.model_dump(exclude_none=True)
        lines.append("rate_limit = { " + ", ".join(f"{k} = {v}" for k, v in limits.items()) + " }")
    return "\n".join(lines) + "\n"


def _render(path: Path, entries: list[KeyEntry]) -> str:
    header = "# loraplex API keys: only sha256 hashes of the keys. Managed with `loraplex keys`.\n"
    if path.suffix.lower() == ".toml":
        return header + "".join("\n" + _toml_block(e) for e in entries)
    data = {"keys": [e.model_dump(exclude_none=True) for e in entries]}
    return header + yaml.safe_dump(data, sort_keys=False)


def _cut_toml_blocks(text: str, hashes: set[str]) -> str:
    """Remove every `[[keys]]` block whose key_sha256 is in `hashes`; other lines stay as they are."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)] + [len(lines)]
    keep = list(range(starts[0]))
    for start, end in zip(starts, starts[1:], strict=False):
        block = "".join(lines[start:end])
        is_doomed = lines[start].strip() == "[[keys]]" and any(h in block.lower() for h in hashes)
        if not is_doomed:
            keep.extend(range(start, end))
    return "".join(lines[i] for i in keep)


def _write_checked(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (mode 0600) after checking the server would accept it."""
    _check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".keys-", suffix=path.suffix, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        KeyRing.from_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


# ---- command line ------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex keys", description="Manage the API keys file (LORAPLEX_AUTH_FILE).")
    parser.add_argument("--file", type=Path, default=os.environ.get("LORAPLEX_AUTH_FILE"),
                        help="keys file, .toml/.yaml/.yml (default: $LORAPLEX_AUTH_FILE)")
    commands = parser.add_subparsers(dest="command", required=True)
    # --file is accepted before or after the subcommand; SUPPRESS keeps the first one if the second is absent.
    file_flag = {"type": Path, "default": argparse.SUPPRESS, "help": "keys file (same as before the subcommand)"}

    add = commands.add_parser("add", help="create a key; prints it once, stores only its sha256")
    add.add_argument("--file", **file_flag)
    add.add_argument("--tenant", required=True, help="tenant name; keys of one tenant share its rate limit")
    add.add_argument("--scopes", type=_csv, default=["generate"],
                     help=f"comma-separated, from {','.join(SCOPES)} (default: generate)")
    add.add_argument("--adapters", type=_csv, default=[],
                     help="comma-separated adapter name globs the key may use, e.g. 'acme-*' "
                          "(default: none, the base model only)")
    add.add_argument("--requests-per-second", type=float, default=None, help="tenant rate limit (default: none)")
    add.add_argument("--tokens-per-minute", type=int, default=None, help="tenant token budget (default: none)")

    listing = commands.add_parser("list", help="show every key by the first 12 hex digits of its sha256")
    listing.add_argument("--file", **file_flag)

    revoke = commands.add_parser("revoke", help="remove keys: by hash prefix, by the key itself, or by tenant")
    revoke.add_argument("--file", **file_flag)
    selector = revoke.add_mutually_exclusive_group(required=True)
    selector.add_argument("hash_prefix", nargs="?", help="6+ leading hex digits of the key's sha256")
    selector.add_argument("--key", help="the key itself (prefer passing it via an environment variable)")
    selector.add_argument("--tenant", help="every key of this tenant")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `loraplex keys` (and `python -m server keys`)."""
    args = build_parser().parse_args(argv)
    if args.file is None:
        print("loraplex keys: give --file or set LORAPLEX_AUTH_FILE", file=sys.stderr)
        return 2
    path = Path(args.file)
    try:
        _check_suffix(path)
        if args.command == "add":
            limit = None
            if args.requests_per_second is not None or args.tokens_per_minute is not None:
                limit = RateLimit(requests_per_second=args.requests_per_second,
                                  tokens_per_minute=args.tokens_per_minute)
            key, entry = add_key(path, args.tenant, args.scopes, args.adapters, limit)
            print(f"added {describe(entry)} to {path}", file=sys.stderr)
            print("the key is shown only this once; store it now:", file=sys.stderr)
            print(key)
        elif args.command == "list":
            entries = read_entries(path)
            for entry in entries:
                print(describe(entry))
            tenants = len({e.tenant for e in entries})
            print(f"{len(entries)} keys, {tenants} tenants in {path}", file=sys.stderr)
        else:
            removed = revoke_keys(path, hash_prefix=args.hash_prefix, key=args.key, tenant=args.tenant)
            for entry in removed:
                print(f"revoked {describe(entry)}", file=sys.stderr)
            print("running servers read the keys file at start-up: restart them", file=sys.stderr)
    except (KeysCommandError, KeyFileError) as exc:
        print(f"loraplex keys: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"loraplex keys: {_first_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
