"""A stand-in engine process for client tests: speaks the protocol without a model (a spawn target).

Each request gets one token per loop iteration: its prompt's ids in turn, up to max_tokens, sent to the
client it came from (one or several clients, as the real engine serves). Prompt
[DIE] ends the process; prompt [REFUSE] is refused as a bad sampling parameter. An abort is counted in
`request_success{finished_reason}` through the metric deltas, as the real engine does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq

from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    MetricsDelta,
    Outputs,
    Ready,
    Rejected,
    RelayMetrics,
    Shutdown,
    TokenOutput,
    input_codec,
    output_codec,
)
from server.engine.request import FinishReason

DIE, REFUSE = 999, 998
MODEL = "fake-engine"


@dataclass
class _Running:
    message: AddRequest
    num_sent: int = 0


def fake_engine_core(settings, hf_dir, model_id, endpoints, parent_pid) -> None:
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    outputs = [context.socket(zmq.PUSH) for _ in endpoints]
    for (input_address, output_address), output in zip(endpoints, outputs, strict=True):
        inputs.connect(input_address)
        output.connect(output_address)
    _, decoder = input_codec()
    encoder, _ = output_codec()
    for output in outputs:
        output.send(encoder.encode(Ready(max_model_len=64, eos_token_ids=[0], num_slots=8, cache_config=None)))
    running: dict[str, _Running] = {}
    open_clients = set(range(len(endpoints)))
    while open_clients:
        if inputs.poll(0 if running else 50):
            message = decoder.decode(inputs.recv())
            if isinstance(message, Shutdown):
                open_clients.discard(message.client)
            elif isinstance(message, RelayMetrics):
                for client, output in enumerate(outputs):
                    if client != message.client:
                        output.send(encoder.encode(Outputs([], [], message.delta)))
            elif isinstance(message, AddRequest):
                if message.prompt_token_ids == [DIE]:
                    os._exit(3)
                if message.prompt_token_ids == [REFUSE]:
                    outputs[message.client].send(encoder.encode(
                        Outputs([], [Rejected(message.request_id, "sampling", "top_p must be in (0, 1]")])))
                    continue
                running[message.request_id] = _Running(message)
            elif isinstance(message, AbortRequests):
                for request_id in message.request_ids:
                    if (entry := running.pop(request_id, None)) is not None:
                        delta = MetricsDelta(increments=[("request_success", [MODEL, message.reason.value], 1.0)])
                        outputs[entry.message.client].send(encoder.encode(Outputs([], [], delta)))
        steps: dict[int, list[TokenOutput]] = {}
        for request_id, entry in list(running.items()):
            prompt, params = entry.message.prompt_token_ids, entry.message.params
            token = prompt[entry.num_sent % len(prompt)]
            entry.num_sent += 1
            stop_token = token in params.stop_token_ids  # as the engine: STOP, and the token is the one that ended it
            done = stop_token or entry.num_sent >= params.max_tokens
            reason = FinishReason.STOP if stop_token else FinishReason.LENGTH if done else None
            steps.setdefault(entry.message.client, []).append(TokenOutput(
                request_id, [token], None, reason, len(prompt), entry.num_sent, ends_on_stop_token=stop_token))
            if done:
                del running[request_id]
        for client, step in steps.items():
            outputs[client].send(encoder.encode(Outputs(step)))
    inputs.close()
    for output in outputs:
        output.close(linger=1000)
    context.term()
