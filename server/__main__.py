"""`python -m server` (or `loraplex`): parse settings, log, serve (server/serving.py: uvicorn in this process,
SIGTERM drains before exiting 0).

`loraplex keys ...` (or `python -m server keys ...`) manages the API keys file instead: server/keys_cli.py.
With `--api-server-count N` (N > 1), this process starts the engine process and N API processes that each
run `serve` (server/launcher.py).
"""

from __future__ import annotations

import sys

from server import keys_cli
from server.config import parse_settings
from server.launcher import serve_many
from server.profiling import profiled
from server.serving import configure_logging, serve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys_cli.main(argv[1:])
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    if settings.api_server_count > 1:
        return serve_many(settings)
    with profiled("api"):
        return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
