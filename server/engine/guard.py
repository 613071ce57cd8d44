"""Fault isolation around one engine, shared by its two drivers (the engine thread and the engine
process): a step or an abort that raises fails its own requests, never the loop. `engine` is a
server.engine.engine.LLMEngine (not imported: the engine imports this module)."""

from __future__ import annotations

import logging

import torch

from server.engine.request import FinishReason, RequestOutput

log = logging.getLogger(__name__)


def run_step(engine) -> list[RequestOutput]:
    """One step; an exception inside it (e.g. CUDA OOM) fails that step's requests, not the server."""
    try:
        return engine.step()
    except Exception as err:
        log.exception("engine step failed")
        outputs = engine.fail_all(f"{type(err).__name__} during generation")
        empty_cuda_cache()
        return outputs


def abort_or_fail(engine, request_id: str,
                  reason: FinishReason = FinishReason.ABORT) -> list[RequestOutput]:
    """Abort a request; if the abort itself raises, the request still leaves the engine, as a failure."""
    try:
        output = engine.abort(request_id, reason)
    except Exception as err:
        log.exception("abort of %s failed; failing it instead", request_id)
        return engine.fail_ids([request_id], f"{type(err).__name__} while aborting")
    return [] if output is None else [output]


def empty_cuda_cache() -> None:
    """Return cached CUDA blocks after an out-of-memory error (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
