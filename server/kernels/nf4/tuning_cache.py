"""The NF4 start-up tuning's picks kept on disk (server.kernels.nf4.nf4_autotune), so that a restart takes them instead
of timing every candidate again.

Why: every start times ~10-20 kernels for each weight shape at each of 8 row counts, each over up to 16 layers in
CUDA graphs (not yet timed apart from the rest of a start; the 8B engine bench's whole start took 20-50 s on an H100
in the fiftieth session). A restart that reads its picks back also runs the same kernels as before it, so the same
inputs give the same bits (picks timed again could differ on noise, and the candidates sum in different orders).

The file (JSON, `<cache_dir>/nf4-tuning.json`) holds, under a key, the picks {"out,in@rows": [kernel, [[option,
value], ...]]}. The key names everything a pick depends on: the GPU (name, SMs, compute capability), torch and
CUDA versions, the compute dtype, the LORAPLEX_NF4_* and LORAPLEX_PDL* switches and a hash of the kernels' sources
(csrc and the NF4 modules), so a change to any of them is a miss, timed afresh; a stored pick that is not among the
candidates the build offers is timed afresh too (nf4_autotune.tune). A file that does not parse is ignored (logged)
and written anew; a write reads, merges and replaces under a lock file, through a temporary file and a rename, so a
crash or a second server never leaves half of one. The newest KEEP keys are kept."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from server.kernels.nf4.nf4_dispatch import Choice

log = logging.getLogger(__name__)

FILE_NAME = "nf4-tuning.json"
KEEP = 8  # keys kept in the file, newest first (a machine's GPUs, software versions, source trees)
_SERVER_DIR = Path(__file__).resolve().parents[2]
# The sources a pick depends on (relative to server/): the CUDA kernels, and the Python that builds, launches and
# picks them.
SOURCES = ("kernels/nf4", "kernels/split_sums.py", "kernels/pdl.py", "model/quant.py")
# Switches the picks depend on: the NF4 kernels' and programmatic dependent launch's (the tuning's own on/off
# switches are not: a start with the cache on finds the same picks whichever way they were spelled).
SWITCH_PREFIXES = ("LORAPLEX_NF4_", "LORAPLEX_PDL")
NOT_SWITCHES = ("LORAPLEX_NF4_TUNING_CACHE", "LORAPLEX_NF4_AUTOTUNE")

Picks = dict[tuple[tuple[int, int], int], Choice]


def sources_digest(root: Path = _SERVER_DIR, names: tuple[str, ...] = SOURCES) -> str:
    """sha256 over the named files (and every file under the named folders but __pycache__), by relative path and
    content."""
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        # a folder's files, not the bytecode Python caches beside them (which come and go)
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0")
            digest.update(file.read_bytes() if file.exists() else b"<missing>")
            digest.update(b"\0")
    return digest.hexdigest()


def cache_key(device_name: str, num_sms: int, capability: tuple[int, int], torch_version: str,
              cuda_version: str | None, dtype: str, environ: dict[str, str] | None = None,
              digest: str | None = None) -> str:
    """The key of one GPU, software, compute dtype and source tree's picks (a sha256 of them all: short keys)."""
    environ = os.environ if environ is None else environ
    switches = sorted((k, v) for k, v in environ.items()
                      if k.startswith(SWITCH_PREFIXES) and k not in NOT_SWITCHES)
    parts = {"device": device_name, "sms": num_sms, "capability": list(capability), "torch": torch_version,
             "cuda": cuda_version, "dtype": dtype, "switches": switches, "sources": digest or sources_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def device_key(device_index: int, dtype) -> str:
    """cache_key of the current process's CUDA device `device_index`, for weights computed in `dtype`."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return cache_key(props.name, props.multi_processor_count, (props.major, props.minor), torch.__version__,
                     torch.version.cuda, str(dtype))


def _read(path: Path) -> dict:
    """The file's {key: picks} (newest last), or {} where it is missing or does not parse (logged)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("NF4 tuning cache %s unreadable (%s): timing afresh", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def load(path: Path, key: str) -> Picks:
    """The picks stored under `key` ({} for none); entries that do not parse are skipped (logged)."""
    picks: Picks = {}
    entries = _read(path).get(key, {})
    if not isinstance(entries, dict):
        log.warning("NF4 tuning cache %s: the picks under this key are not a mapping: timing afresh", path)
        return picks
    for name, value in entries.items():
        try:
            shape, rows = name.split("@")
            out_features, in_features = (int(n) for n in shape.split(","))
            kernel, options = value
            choice = Choice(str(kernel), tuple((str(option), int(number)) for option, number in options))
        except (ValueError, TypeError) as exc:
            log.warning("NF4 tuning cache %s: entry %r skipped (%s)", path, name, exc)
            continue
        picks[((out_features, in_features), int(rows))] = choice
    return picks


def save(path: Path, key: str, picks: Picks) -> None:
    """Store `picks` under `key` (replacing what it held; the key becomes the newest), keeping the newest KEEP keys.
    Atomic: a temporary file in the same folder, then a rename. A failure to write is logged, never raised (the
    picks still hold in this process)."""
    entries = {f"{out},{inp}@{rows}": [choice.kernel, [list(option) for option in choice.options]]
               for ((out, inp), rows), choice in sorted(picks.items())}
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):  # read, merge and replace under one lock: two servers starting at once keep both keys
            data = {k: v for k, v in _read(path).items() if k != key}
            data[key] = entries
            data = dict(list(data.items())[-KEEP:])
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp",
                                             delete=False) as f:
                temporary = Path(f.name)
                json.dump(data, f, indent=1)
            os.replace(temporary, path)
    except OSError as exc:
        log.warning("NF4 tuning cache %s not written (%s)", path, exc)
        if temporary is not None:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `<path>.lock` (flock: released when the process ends, however it ends)."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
