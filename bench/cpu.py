"""`python -m bench.cpu`: CPU figures of the engine on the embedded SmolLM2-135M-Instruct (NF4).

Greedy decoding of 32 new tokens after the chat prompt "What is the capital of France?", batch 1 and
8, and the merged swap time of a random all-linear rank-16 adapter. Not a GPU benchmark: the CPU
path exists for development and CI.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.build import random_adapters
from bench.shapes import shape_facts
from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.request import Request, SamplingParams
from server.model.loader import load_model
from server.model.merge import MergedSwapper


def chat_prompt(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def decode_speed(engine: LLMEngine, prompt: list[int], batch: int, new_tokens: int = 32) -> str:
    requests = [Request(list(prompt), SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
                for _ in range(batch)]
    start = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    engine.step()  # prefill + first token
    after_prefill, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    end = time.perf_counter()
    decode_s = end - after_prefill
    return (f"batch {batch}: {batch * new_tokens / (end - start):.1f} tok/s end to end, "
            f"{batch * steps / decode_s:.1f} tok/s decode ({decode_s / steps * 1e3:.0f} ms/step)")


def main() -> None:
    loaded = load_model("embedded", cache_dir=Path.home() / ".cache" / "loraplex", device="cpu")
    engine = LLMEngine(loaded, Settings(device="cpu", cuda_graphs=False, max_model_len=2048))
    prompt = chat_prompt(loaded.tokenizer)
    for batch in (1, 8):
        print(decode_speed(engine, prompt, batch), flush=True)
    (adapter,) = random_adapters(shape_facts(loaded.config.hf_config), 1, torch.device("cpu"))
    swapper = MergedSwapper(loaded.model)
    swaps = [swapper.swap(("adapter", i), adapter.weights) * 1e3 for i in range(5)]
    back = swapper.swap(None) * 1e3
    print(f"merged swap, all-linear rank 16: {', '.join(f'{t:.0f}' for t in swaps)} ms; back to base {back:.0f} ms; "
          f"bit-exact base restored: {swapper.is_pristine()}", flush=True)


if __name__ == "__main__":
    main()
