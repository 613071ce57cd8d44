"""CPU measurements behind the reliability fixes of the adapter store and /metrics (issue 9).

    python -m bench.reliability archive-bomb          # peak RSS and time to inspect a 510 KB bomb
    python -m bench.reliability metrics-churn 500     # /metrics series after 500 adapters come and go

Each prints one line; run each in a fresh process (archive-bomb reads the process's peak RSS).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import resource
import tarfile
import tempfile
import time
from pathlib import Path

from adapters_store import AdapterError
from adapters_store.archive import extract_adapter_files

SERVER_LIMIT = 512 << 20  # the default max_upload_bytes


class _Zeros(io.RawIOBase):
    def __init__(self, num_bytes: int):
        self.num_left = num_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        num = min(len(buffer), self.num_left)
        buffer[:num] = bytes(num)
        self.num_left -= num
        return num


def build_bomb(num_zero_bytes: int = 500 << 20) -> bytes:
    """A .tar.gz with a valid config and a safetensors member of zeros (about 1000x compression)."""
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).encode()
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = num_zero_bytes
        tar.addfile(info, _Zeros(num_zero_bytes))
    return raw.getvalue()


def archive_bomb() -> str:
    archive = build_bomb()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    start = time.perf_counter()
    try:
        extract_adapter_files(archive, SERVER_LIMIT)
        outcome = "accepted by the archive reader"
    except AdapterError as exc:
        outcome = f"{exc.status_code} {type(exc).__name__}"
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    return (f"archive {len(archive)} bytes: {seconds:.2f} s, peak RSS {rss_before} -> {rss_after} MiB "
            f"(+{rss_after - rss_before}), {outcome}")


def metrics_churn(num_adapters: int) -> str:
    from tests.api.helpers import api_settings, live_server, upload
    from tests.conftest import build_peft_adapter, build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    model = build_tiny_model(root / "model")
    adapter = build_peft_adapter(model, root / "adapter", rank=4, targets=["q_proj", "v_proj"], seed=1)

    def num_series(client) -> tuple[int, int]:
        text = client.get("/metrics").text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#")), len(text)

    with live_server(api_settings(model, root / "store")) as live, live.client() as client:
        before = num_series(client)
        for i in range(num_adapters):
            upload(client, f"churn-{i}", adapter)
            body = {"model": f"churn-{i}", "prompt": "Hi", "max_tokens": 1}
            assert client.post("/v1/completions", json=body).status_code == 200
            assert client.delete(f"/v1/adapters/churn-{i}").status_code == 200
        after = num_series(client)
    return (f"/metrics before: {before[0]} series, {before[1]} bytes; after {num_adapters} adapters "
            f"uploaded, used and deleted: {after[0]} series, {after[1]} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("archive-bomb")
    churn = commands.add_parser("metrics-churn")
    churn.add_argument("num_adapters", type=int, nargs="?", default=500)
    args = parser.parse_args()
    print(archive_bomb() if args.command == "archive-bomb" else metrics_churn(args.num_adapters))


if __name__ == "__main__":
    main()
