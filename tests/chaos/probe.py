"""Probe /health from its own process (so the test's client threads do not delay it):

    python -m tests.chaos.probe http://127.0.0.1:PORT 0.02

prints `<start time> <seconds> <status>` per probe, or `<failure time> error <reason>` (time.monotonic), until
SIGTERM. Standard library only, so it starts in a fraction of a second."""

from __future__ import annotations

import http.client
import signal
import sys
import time
from urllib.parse import urlsplit

TIMEOUT_S = 30.0


def main(url: str, interval_s: float) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=TIMEOUT_S)
    while True:
        started = time.monotonic()
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            print(f"{started:.6f} {time.monotonic() - started:.6f} {response.status}", flush=True)
        except (OSError, http.client.HTTPException) as exc:
            failed = time.monotonic()  # a probe cut by a kill fails after the kill, though it started before
            print(f"{failed:.6f} error {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
            connection.close()
            time.sleep(0.5)
            continue
        time.sleep(interval_s)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
