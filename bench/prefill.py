"""Prefill speed: 32 prompts of equal length against 32 of unequal lengths with the same total tokens.

    python -m bench.prefill [--model 8b] [--out bench/results]

Equal: 32 x 2,048 tokens. Unequal: lengths spread evenly over 256..3,840 (also 65,536 tokens). Each set
is prefilled in one engine step (max_num_batched_tokens covers it; one output token per request) on
random NF4 weights; time = median of 3 steps after a warm-up. Writes ``<date>-<device>-prefill.json``
with ``ratios``: prefill_unequal_over_equal_<model> (time) and prefill_tflops_<model> (model FLOPs of
the equal set over its time: 2 x linear params per token, plus causal attention 2 x 2 x L^2 / 2 x
heads x head_dim per layer and sequence).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.results import write_named_result

NUM_PROMPTS, MEAN_LEN, MIN_LEN, MAX_LEN = 32, 2048, 256, 3840


def lengths_equal() -> list[int]:
    return [MEAN_LEN] * NUM_PROMPTS


def lengths_unequal() -> list[int]:
    """Evenly spread over MIN_LEN..MAX_LEN, integer, summing to NUM_PROMPTS * MEAN_LEN."""
    step = (MAX_LEN - MIN_LEN) / (NUM_PROMPTS - 1)
    lengths = [round(MIN_LEN + i * step) for i in range(NUM_PROMPTS)]
    lengths[-1] += NUM_PROMPTS * MEAN_LEN - sum(lengths)
    return lengths


def model_flops(shape: dict, lengths: list[int]) -> float:
    """Forward FLOPs of prefilling `lengths` (linears + causal attention; the LM head of one row each)."""
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, head_dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    linear_params = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                              + 3 * hidden * inter)
    tokens = sum(lengths)
    attention = sum(2 * 2 * length * length / 2 * heads * head_dim * layers for length in lengths)
    head = 2 * hidden * shape["vocab_size"] * len(lengths)
    return 2.0 * linear_params * tokens + attention + head


def time_prefill(engine, vocab_size: int, lengths: list[int], repeats: int = 3) -> list[float]:
    from bench.build import sync
    from server.engine.request import Request, SamplingParams

    times = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(repeats + 1):
        requests = [Request(torch.randint(0, vocab_size, (n,), generator=gen).tolist(),
                            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)) for n in lengths]
        for request in requests:
            engine.add_request(request)
        sync(engine.model.device)
        start = time.perf_counter()
        engine.step()
        sync(engine.model.device)
        times.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
    return times[1:]  # the first one compiles kernels


def main() -> None:
    from bench.build import loaded_model, our_model, random_hf_model
    from bench.shapes import SHAPES, llama_config
    from server.config import LoraMode, Settings
    from server.engine.engine import LLMEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="8b")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape, config = SHAPES[args.model], llama_config(args.model)
    hf = random_hf_model(config, device, dtype)
    ours = our_model(hf, device, dtype)
    del hf
    torch.cuda.empty_cache()
    total = NUM_PROMPTS * MAX_LEN
    settings = Settings(model="embedded", device="cuda", lora_mode=LoraMode.UNMERGED, max_slots=1, max_rank=16,
                        max_batch_size=NUM_PROMPTS, max_model_len=MAX_LEN + 16, max_num_batched_tokens=total,
                        kv_cache_blocks=NUM_PROMPTS * (MAX_LEN // 16 + 2) + 16, cuda_graphs=False)
    engine = LLMEngine(loaded_model(ours, config), settings)
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "model": args.model,
               "torch": torch.__version__, "command": f"python -m bench.prefill --model {args.model}", "runs": {}}
    for name, lengths in (("equal", lengths_equal()), ("unequal", lengths_unequal())):
        times = time_prefill(engine, shape["vocab_size"], lengths)
        seconds = statistics.median(times)
        results["runs"][name] = {"lengths": lengths, "seconds": times, "median_s": seconds,
                                 "model_tflops": model_flops(shape, lengths) / seconds / 1e12}
        print(name, f"{seconds:.3f} s", f"{results['runs'][name]['model_tflops']:.0f} TFLOP/s", flush=True)
    runs = results["runs"]
    results["ratios"] = {
        f"prefill_unequal_over_equal_{args.model}": runs["unequal"]["median_s"] / runs["equal"]["median_s"],
        f"prefill_tflops_{args.model}": runs["equal"]["model_tflops"],
    }
    write_named_result(args.out, results, "prefill")


if __name__ == "__main__":
    main()
