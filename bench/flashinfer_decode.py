"""FlashInfer's paged batch decode against triton_attention's on the decode step's cache (the roofline's last 4%).

    python -m bench.flashinfer_decode --fetch          # here (PyPI reachable): FlashInfer's headers into .flashinfer/
    python -m bench.flashinfer_decode [--contexts 192,2048] [--rows 32] [--out bench/results]   # on the GPU machine

Why (bench/NOTES.md, fifty-fourth session): `roofline_fraction_merged_b32_8b` needs the H200's merged step ~4%
shorter, and the decode attention reads its K and V at about half the copy bandwidth (~14.7 of the H100's 101-us
merged layer), where the guide names FlashInfer for attention kernels and no session had measured it. Its package
imports and JIT-builds far more than the GPU machine can be given (no internet; carry holds 64 MiB), but its decode
kernel is header-only: bench/csrc/flashinfer_decode.cu instantiates it (CUDA cores, one block a row and kv head, no
KV partition) against the headers `--fetch` unzips from the flashinfer-python wheel into the ignored .flashinfer/
(FlashInfer's include/ and the libcudacxx it needs, ~21 MB; carry it). Nothing of FlashInfer is committed.

At 8B's decode shape (32 q / 8 kv heads, head dim 128, bf16, blocks of 16 positions, each row's blocks shuffled over
the cache) and each context, it times by CUDA-graph replay over cache copies past the L2 (bench.kernels.time_calls)
``ours`` (paged_decode_attention_triton) and ``flashinfer``, each checked against the fp32 reference
(``max_err``: the largest |difference| over the largest |reference|), and the bandwidth each reads K and V at. Writes
``<out>/<date>-<device>-flashinfer-decode.json`` with ``ratios`` ``flashinfer_over_ours_b<rows>_ctx<context>``
(time over time: below 1, FlashInfer is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "csrc" / "flashinfer_decode.cu"
HEADERS = ROOT / ".flashinfer"  # ignored (.gitignore): fetched, never committed
WHEEL = "flashinfer-python==0.7.2.post1"
# the wheel's folders the kernel's headers need, and where they go under HEADERS
WHEEL_FOLDERS = {"flashinfer/data/include/": "include", "flashinfer/data/cccl/libcudacxx/include/": "libcudacxx"}
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def fetch(target: Path = HEADERS) -> None:
    """Download the flashinfer-python wheel (no dependencies) and unzip the headers its decode kernel needs."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("flashinfer_python-*.whl"))
        if target.exists():
            shutil.rmtree(target)
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                for prefix, folder in WHEEL_FOLDERS.items():
                    if name.startswith(prefix) and not name.endswith("/"):
                        path = target / folder / name[len(prefix):]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(archive.read(name))
    print(f"FlashInfer's headers in {target}: carry it to the GPU machine")


def build(major: int, minor: int) -> Path:
    """The probe's shared library for compute capability major.minor, built by nvcc against the fetched headers."""
    from server import nvcc_library

    return nvcc_library.build(SOURCE, "loraplex_flashinfer_decode", major, minor,
                              flags=("--use_fast_math", "--expt-relaxed-constexpr"),
                              include_dirs=(HEADERS / "libcudacxx", HEADERS / "include"))


@functools.cache
def _library() -> ctypes.PyDLL:
    if not (HEADERS / "include" / "flashinfer").is_dir():
        raise SystemExit(f"no FlashInfer headers in {HEADERS}: run `python -m bench.flashinfer_decode --fetch` where "
                         "PyPI is reachable, and carry .flashinfer")
    lib = ctypes.PyDLL(str(build(*torch.cuda.get_device_capability())))
    lib.loraplex_flashinfer_decode.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int] * 4 + [ctypes.c_float]
    return lib


def paged_arrays(block_tables: torch.Tensor, context_lens: torch.Tensor) -> dict[str, torch.Tensor]:
    """FlashInfer's page arrays for loraplex's block tables: indptr [B + 1], indices (each row's used blocks, in
    order), last_page_len [B], and the no-partition scheduler's request_indices, kv_tile_indices, kv_chunk_size."""
    lens = context_lens.long().cpu()
    pages = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    tables = block_tables.cpu()
    indices = torch.cat([tables[b, : int(n)] for b, n in enumerate(pages)])
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int64)
    indptr[1:] = pages.cumsum(0)
    arrays = {"indptr": indptr, "indices": indices, "last_page_len": (lens - 1) % BLOCK_SIZE + 1,
              "request_indices": torch.arange(len(lens)), "kv_tile_indices": torch.zeros(len(lens), dtype=torch.int64),
              "kv_chunk_size": lens.max().reshape(1)}
    return {k: v.to(torch.int32).to(block_tables.device) for k, v in arrays.items()}


def flashinfer_call(q, k_cache, v_cache, arrays: dict, scale: float):
    """call(): out [B, Hq, D] = FlashInfer's decode of q over the cache (one launch); and out."""
    lib = _library()
    out = torch.empty_like(q)

    def call():
        err = lib.loraplex_flashinfer_decode(
            torch.cuda.current_stream().cuda_stream, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            arrays["indices"].data_ptr(), arrays["indptr"].data_ptr(), arrays["last_page_len"].data_ptr(),
            out.data_ptr(), arrays["request_indices"].data_ptr(), arrays["kv_tile_indices"].data_ptr(),
            arrays["kv_chunk_size"].data_ptr(), q.shape[0], NUM_Q_HEADS, NUM_KV_HEADS, BLOCK_SIZE, scale)
        if err:
            raise RuntimeError(f"FlashInfer decode launch failed: cudaError {err}")
        return out

    return call


def run_context(rows: int, context: int) -> dict:
    from bench.attention_ncu import decode_inputs
    from bench.kernels import L2_DEFEAT_BYTES, time_calls
    from server.kernels.attention.attention_ops import paged_decode_attention_torch
    from server.kernels.attention.triton_attention import paged_decode_attention_triton

    kv_bytes = 2 * rows * context * NUM_KV_HEADS * HEAD_DIM * 2
    copies = max(2, min(8, -(-L2_DEFEAT_BYTES // kv_bytes)))
    scale = HEAD_DIM**-0.5
    caches = []
    for seed in range(copies):
        _, _, _, k_cache, v_cache, tables, lens = decode_inputs(rows, context, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM,
                                                                BLOCK_SIZE, seed=seed)
        caches.append((k_cache, v_cache, tables, lens, paged_arrays(tables, lens)))
    q = torch.randn(rows, NUM_Q_HEADS, HEAD_DIM, device="cuda").to(torch.bfloat16)
    k_cache, v_cache, tables, lens, arrays = caches[0]
    want = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, scale).float()
    calls = {"ours": [lambda c=c: paged_decode_attention_triton(q, c[0], c[1], c[2], c[3], scale) for c in caches],
             "flashinfer": [flashinfer_call(q, c[0], c[1], c[4], scale) for c in caches]}
    entry = {"rows": rows, "context": context, "copies": copies, "kv_mb": round(kv_bytes / 1e6, 1), "us": {},
             "tb_per_s": {}, "max_err": {}, "errors": {}}
    for name, fns in calls.items():
        try:
            got = fns[0]().float()
            entry["max_err"][name] = round(((got - want).abs().max() / want.abs().max()).item(), 5)
            entry["us"][name] = round(time_calls(fns), 2)
            entry["tb_per_s"][name] = round(kv_bytes / entry["us"][name] / 1e6, 2)
        except (RuntimeError, SystemExit) as err:
            entry["errors"][name] = str(err)[:300]
    print(rows, context, entry["us"], entry["tb_per_s"], entry["max_err"], entry["errors"] or "", flush=True)
    return entry


def main() -> None:
    from bench.results import write_named_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download FlashInfer's headers into .flashinfer/")
    parser.add_argument("--contexts", default="192,2048")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.fetch:
        fetch()
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.flashinfer_decode needs a CUDA GPU (or --fetch)")
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "flashinfer": WHEEL, "command": f"python -m bench.flashinfer_decode --contexts {args.contexts} "
                                               f"--rows {args.rows}", "contexts": []}
    for context in (int(c) for c in args.contexts.split(",")):
        results["contexts"].append(run_context(args.rows, context))
    results["ratios"] = {f"flashinfer_over_ours_b{e['rows']}_ctx{e['context']}":
                         round(e["us"]["flashinfer"] / e["us"]["ours"], 3)
                         for e in results["contexts"] if {"ours", "flashinfer"} <= set(e["us"])}
    print(results["ratios"], flush=True)
    write_named_result(args.out, results, "flashinfer-decode")


if __name__ == "__main__":
    main()
