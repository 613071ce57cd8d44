"""A stand-in engine process for client tests: speaks the protocol without a model (a spawn target).

Each request gets one token per loop iteration: its prompt's ids in turn, up to max_tokens. Prompt
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


def fake_engine_core(settings, hf_dir, model_id, input_address, output_address, parent_pid) -> None:
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inputs.connect(input_address)
    outputs.connect(output_address)
    _, decoder = input_codec()
    encoder, _ = output_codec()
    outputs.send(encoder.encode(Ready(max_model_len=64, eos_token_ids=[0], num_slots=8, cache_config=None)))
    running: dict[str, _Running] = {}
    while True:
        if inputs.poll(0 if running else 50):
            message = decoder.decode(inputs.recv())
            if isinstance(message, Shutdown):
                break
            if isinstance(message, AddRequest):
                if message.prompt_token_ids == [DIE]:
                    os._exit(3)
                if message.prompt_token_ids == [REFUSE]:
                    outputs.send(encoder.encode(Outputs([], [Rejected(message.request_id, "sampling",
                                                                      "top_p must be in (0, 1]")])))
                    continue
                running[message.request_id] = _Running(message)
            elif isinstance(message, AbortRequests):
                for request_id in message.request_ids:
                    if running.pop(request_id, None) is not None:
                        delta = MetricsDelta(increments=[("request_success", [MODEL, message.reason.value], 1.0)])
                        outputs.send(encoder.encode(Outputs([], [], delta)))
        step = []
        for request_id, entry in list(running.items()):
            prompt, params = entry.message.prompt_token_ids, entry.message.params
            token = prompt[entry.num_sent % len(prompt)]
            entry.num_sent += 1
            done = entry.num_sent >= params.max_tokens
            step.append(TokenOutput(request_id, [token], None, FinishReason.LENGTH if done else None,
                                    len(prompt), entry.num_sent))
            if done:
                del running[request_id]
        if step:
            outputs.send(encoder.encode(Outputs(step)))
    inputs.close()
    outputs.close(linger=1000)
    context.term()
