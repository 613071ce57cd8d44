"""What bulk copies into shared memory beside the x-resident NF4 kernel's walk cost it (a TMA-fed shrink's prior).

    python -m bench.resident_ring [--shapes gate_up,down] [--rows 32] [--out bench/results]

The question (bench/NOTES.md, fifty-fourth session): a LoRA shrink inside the resident kernel would bring its pool
tiles by the TMA unit into a shared-memory ring during the weights' walk, but the thirty-ninth session saw any ring
through shared memory slow the exact dequantization beside it (the codes' ring: 48 -> 58-69 us). This probe runs the
server's kernel (8B shapes, 32 block tokens, the byte-pair table, the server's warpgroups and splits) built with
bench/csrc/resident_ring.cu's RING: RING bytes a stage brought by one bulk copy per block into a ring of slots
nobody reads (2-8 slots, as many as 12 KB hold; a copy waits only for the one that many stages before it) (the
shrink's tiles would be ~2 KB a stage and SM for gate_up's 8.4 MB of A, ~6 KB for down's 14.7), timed by
CUDA-graph replay over weight copies (bench.kernels.time_calls) against RING 0 (the server's kernel itself, SASS for
SASS) and the server's call. Every ring's output is checked bit for bit against the server's (``exact``): the copies
change no arithmetic and must not touch x's tiles. Writes ``<out>/<date>-<device>-resident-ring.json`` with
``ratios``: ``ring<bytes>_over_ring0_<shape>_m<rows>``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import time
from pathlib import Path

import torch

from bench.kernels import layer_shapes, time_calls, timing_layer
from bench.results import write_named_result

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "csrc" / "resident_ring.cu"
RINGS = (0, 1024, 2048, 3072, 4096)  # bytes a stage (the instances resident_ring.cu builds)
SOURCE_BYTES = 12288 * 40960  # what the copies walk (~500 MB, a multiple of every ring): a launch's epoch moves them
WARPGROUPS = {"gate_up": 7, "down": 6}  # the server's picks at 32 rows in the s53-s54 H100 profiles


def build() -> Path:
    """The probe's shared library for sm_90a, built by nvcc against the server's kernel headers."""
    from server import nvcc_library

    return nvcc_library.build(SOURCE, "loraplex_resident_ring", 9, 0, feature="a", flags=("--use_fast_math",),
                              include_dirs=(ROOT / "server" / "kernels" / "nf4" / "csrc",))


@functools.cache
def _library() -> ctypes.PyDLL:
    if torch.cuda.get_device_capability() != (9, 0):
        raise RuntimeError("the resident ring probe needs Hopper (sm_90a)")
    lib = ctypes.PyDLL(str(build()))
    lib.loraplex_resident_ring_source.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.loraplex_resident_ring.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 5
    return lib


def run_shape(name: str, in_features: int, out_features: int, rows: int, num_sms: int, server_too: bool = True) -> dict:
    """One shape's times and checks; without `server_too` the rings are checked against RING 0 (the server's kernel
    from this build) and the server's call is neither built (~75 s for the CUDA extension) nor timed."""
    from server.kernels.nf4 import cuda_nf4_wgmma

    lib = _library()
    warpgroups = WARPGROUPS[name]
    layer = timing_layer(in_features, out_features)
    shape, table = layer.shape, layer.table
    splits = cuda_nf4_wgmma.resident_split_k(rows, shape, num_sms, warpgroups, pairs=True)
    per_split = -(-(in_features // 64) // splits)
    splits = -(-(in_features // 64) // per_split)  # the splits the launch makes of them (csrc's split_shape)
    x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
    out = torch.empty(rows, out_features, dtype=x.dtype, device="cuda")
    partial = torch.empty(splits, rows, out_features, dtype=torch.float32, device="cuda")
    server = functools.partial(cuda_nf4_wgmma.nf4_wgmma, shape=shape, code_table=table, split_k=splits,
                               block_tokens=32, num_sms=num_sms, resident_warpgroups=warpgroups, pairs=True)
    want = None
    if server_too:
        want = server(x, layer.nf4[0][3], defer_sum=True)
        want = want.partials if splits > 1 else want

    def call(ring, tiled):
        err = lib.loraplex_resident_ring(warpgroups, ring, torch.cuda.current_stream().cuda_stream, x.data_ptr(),
                                         tiled[0].data_ptr(), tiled[1].data_ptr(), table.data_ptr(), out.data_ptr(),
                                         partial.data_ptr(), rows, out_features, in_features, splits, num_sms)
        if err:
            raise RuntimeError(f"resident_ring launch failed: cudaError {err}")

    entry = {"layer": name, "in": in_features, "out": out_features, "rows": rows, "warpgroups": warpgroups,
             "splits": splits, "us": {}, "exact": {}, "errors": {}}
    if server_too:
        entry["us"]["server"] = round(time_calls([lambda c=c: server(x, c[3]) for c in layer.nf4]), 2)
    for ring in RINGS:
        try:
            out.fill_(float("nan"))  # a launch that wrote nothing fails the check
            partial.fill_(float("nan"))
            call(ring, layer.nf4[0][3])
            got = partial if splits > 1 else out
            if want is None:  # RING 0 (the first) is the reference
                want = got.clone()
            entry["exact"][str(ring)] = bool(torch.equal(got, want))
            entry["us"][str(ring)] = round(time_calls([lambda c=c, r=ring: call(r, c[3]) for c in layer.nf4]), 2)
        except RuntimeError as err:  # a ring that does not fit beside x and the table, say (a fault would break
            entry["errors"][str(ring)] = str(err)[:200]  # the context: the rings after it fail too, and say so)
    del layer
    torch.cuda.empty_cache()
    print(name, rows, warpgroups, splits, entry["us"], entry["exact"], entry["errors"] or "", flush=True)
    return entry


def main() -> None:
    from server.kernels.nf4.triton_nf4 import device_num_sms

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="gate_up,down", help="8B layers (those the resident kernel serves)")
    parser.add_argument("--rows", type=int, default=32, help="1-32 (one 32-token group)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--no-server", action="store_true",
                        help="check the rings against RING 0 and skip the server's call (no CUDA extension build)")
    args = parser.parse_args()
    if not 0 < args.rows <= 32:
        parser.error("rows must be 1-32")
    lib = _library()
    source = torch.empty(SOURCE_BYTES, dtype=torch.uint8, device="cuda")
    if err := lib.loraplex_resident_ring_source(source.data_ptr(), SOURCE_BYTES):
        raise RuntimeError(f"setting the ring's source failed: cudaError {err}")
    num_sms = device_num_sms(0)
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "command": f"python -m bench.resident_ring --shapes {args.shapes} --rows {args.rows}", "layers": []}
    shapes = layer_shapes("8b")
    for name in args.shapes.split(","):
        results["layers"].append(run_shape(name, *shapes[name], args.rows, num_sms, server_too=not args.no_server))
    results["ratios"] = {f"ring{ring}_over_ring0_{e['layer']}_m{e['rows']}": round(e["us"][str(ring)] / e["us"]["0"], 3)
                         for e in results["layers"] for ring in RINGS[1:] if str(ring) in e["us"] and "0" in e["us"]}
    print(results["ratios"], flush=True)
    write_named_result(args.out, results, "resident-ring")


if __name__ == "__main__":
    main()
