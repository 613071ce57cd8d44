"""Messages between the API process and the engine process, encoded with msgspec (MessagePack).

API -> engine (one PUSH/PULL socket a client): `AddRequest`, `AbortRequests`, `RelayMetrics`, `Shutdown`.
Engine -> API (another a client): `Ready` once the model is loaded, `Outputs` after each step that produced
something (new token ids, finishes, refusals, and the metric updates recorded since the last message),
and `Failed` if startup or the engine loop fails for good. Token ids travel, never text: the API process
detokenizes.

With several API processes (`api_server_count`), each is a client with an index: its requests' outputs go
to its own output socket only; the engine's metric updates, `Ready` and `Failed` go to every client, and
one client's own metric updates (`RelayMetrics`) are passed on to the others, so each API process's
/metrics shows the whole server.
"""

from __future__ import annotations

import msgspec

from server.engine.request import FinishReason, SamplingParams


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    """A tokenized request; `adapter` is the (name, version) the API process resolved, None for the base."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: tuple[str, int] | None
    arrival_time: float  # time.monotonic() in the API process (one clock for every process of the host)
    tenant: str = ""  # the API key's tenant: fair scheduling
    client: int = 0  # the API process it came from: where its outputs go


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    """Stop requests. `reason` STOP: the API process found a stop string (counted as a normal finish)."""

    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """This client is done; the engine process exits once every client has said so."""

    client: int = 0


class MetricsDelta(msgspec.Struct, array_like=True):
    """Prometheus updates recorded in the engine process since the last message, by family attribute name
    in server.metrics and label values: counter increments, gauge values, histogram observations already
    counted into the family's buckets ((bucket index, count) pairs, non-cumulative, and the values' sum),
    series removals (applied first)."""

    increments: list[tuple[str, list[str], float]] = []
    gauges: list[tuple[str, list[str], float]] = []
    histograms: list[tuple[str, list[str], list[tuple[int, int]], float]] = []
    removals: list[tuple[str, list[str]]] = []


class RelayMetrics(msgspec.Struct, tag="metrics", array_like=True):
    """One API process's own metric updates, for the engine to pass on to the other API processes."""

    client: int
    delta: MetricsDelta


EngineInput = AddRequest | AbortRequests | Shutdown | RelayMetrics


class TokenOutput(msgspec.Struct, array_like=True):
    """One request's new tokens of a step; `finish_reason` set on its last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: (id, logprob), best first
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] | None = None  # first output only
    ends_on_stop_token: bool = False  # the last new token is the stop or EOS token that ended it (no text)


class Rejected(msgspec.Struct, array_like=True):
    """A request refused at admission: kind "sampling" (a 400) or "adapter" (its version is gone: a 404)."""

    request_id: str
    kind: str
    message: str


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[TokenOutput]
    rejected: list[Rejected] = []
    metrics: MetricsDelta | None = None


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The engine is loaded and serving; what the API process needs to validate requests."""

    max_model_len: int
    eos_token_ids: list[int]
    num_slots: int
    cache_config: tuple[int, int, int, str, float | None, bool] | None  # EngineMetrics.record_config's arguments
    metrics: MetricsDelta | None = None


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """Startup failed or the engine loop died; the engine process exits after sending it."""

    error: str


EngineOutput = Outputs | Ready | Failed


def input_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineInput)


def output_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineOutput)
