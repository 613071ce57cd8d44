"""Programmatic dependent launch's contract, read from the kernels' source (server/kernels/pdl.py): a kernel launched
with the attribute may start while the kernel ahead still writes its output, so before its wait it may read only
weights and store nothing. A kernel that broke this would race only on a GPU, at random; these checks fail at once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "server" / "kernels"
CSRC = KERNELS / "nf4" / "csrc"
# Every Triton module of the kernels but triton_pdl.py, whose pdl_enter is the wait itself
TRITON_MODULES = sorted(str(path.relative_to(KERNELS)) for path in KERNELS.rglob("triton_*.py")
                        if path.name != "triton_pdl.py")
# Pointers a Triton kernel may read before its wait: weights, which no kernel of a step writes.
WEIGHT_POINTERS = {"weight_ptr"}
# And, per kernel, other pointers no kernel ahead of it writes: the decode attention's step inputs (lengths, slots:
# written before the step's first kernel). norm_shrink's kernel (the residual add + norm adding qkv's or gate_up's LoRA
# shrink) read its linear's A and the step's slots there too; it measured neutral and was removed (design in 1f2972b).
PRE_WAIT_READS = {"_decode_kernel": {"context_lens_ptr", "slot_ptr"}}
# CUDA kernels launched plainly (`<<<...>>>`), never with the attribute, so they need no wait.
PLAIN_CUDA_KERNELS = {"nf4_mma_kernel", "wgmma_built_kernel"}


def _pdl_kernels() -> list[tuple[str, ast.FunctionDef]]:
    """(module, function) for every @triton.jit function of the Triton modules that takes a PDL argument."""
    found = []
    for module in TRITON_MODULES:
        tree = ast.parse((KERNELS / module).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(arg.arg == "PDL" for arg in node.args.args):
                found.append((module, node))
    return found


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    """The calls in `node` of a function whose name (or attribute) is `name`."""
    return [call for call in ast.walk(node) if isinstance(call, ast.Call)
            and (getattr(call.func, "id", None) == name or getattr(call.func, "attr", None) == name)]


def test_the_triton_kernels_that_take_part_are_the_expected_ones():
    names = {node.name for _, node in _pdl_kernels()}
    assert names >= {"_add_rmsnorm_kernel", "_silu_mul_kernel", "_decode_kernel", "_merge_splits_kernel",
                     "_shrink_kernel", "_expand_kernel", "_expand_sums_kernel", "_lora_delta_kernel",
                     "_lora_add_delta_kernel"}


@pytest.mark.parametrize("module,kernel", _pdl_kernels(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_a_triton_kernel_waits_before_it_reads_an_activation_or_stores(module, kernel):
    """`pdl_enter(PDL)` is a top-level statement of the kernel, and the statements before it store nothing and load
    only weights."""
    body = [stmt for stmt in kernel.body
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]  # the docstring
    enters = [i for i, stmt in enumerate(body) if isinstance(stmt, ast.Expr) and _calls(stmt, "pdl_enter")]
    assert len(enters) == 1, f"{module}:{kernel.name} calls pdl_enter(PDL) {len(enters)} times at its top level"
    assert [ast.unparse(arg) for arg in _calls(body[enters[0]], "pdl_enter")[0].args] == ["PDL"]
    pointers = {arg.arg for arg in kernel.args.args if arg.arg.endswith("_ptr")}
    for stmt in body[:enters[0]]:
        for name in ("store", "atomic_add", "atomic_max", "atomic_cas", "atomic_xchg"):
            assert not _calls(stmt, name), f"{module}:{kernel.name} calls tl.{name} before its wait"
        for load in _calls(stmt, "load"):
            read = {n.id for n in ast.walk(load.args[0]) if isinstance(n, ast.Name)} & pointers
            allowed = WEIGHT_POINTERS | PRE_WAIT_READS.get(kernel.name, set())
            assert read <= allowed, f"{module}:{kernel.name} reads {read - allowed} before its wait"


def _cuda_kernels() -> dict[str, str]:
    """Every __global__ kernel of server/kernels/nf4/csrc: name -> body (from its opening brace to the matching one)."""
    kernels = {}
    for path in sorted(CSRC.iterdir()):
        text = path.read_text()
        for match in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^;{]*?\)\s+)?(\w+)\s*\(", text):
            start = text.index("{", match.end())
            depth, end = 0, start
            for end in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    break
            kernels[match.group(1)] = text[start:end + 1]
    return kernels


def test_every_cuda_kernel_but_the_plain_ones_waits_for_the_kernel_ahead():
    kernels = _cuda_kernels()
    assert {"nf4_wgmma_kernel", "nf4_wgmma_resident_kernel", "nf4_gemv_pairs_kernel", "split_k_sum_kernel"} <= set(
        kernels)
    for name, body in kernels.items():
        if name not in PLAIN_CUDA_KERNELS:
            assert "wait_for_prior_grid();" in body, f"{name} is launched through launch_kernel and never waits"


def test_the_plain_cuda_kernels_launch_without_the_attribute():
    """The kernels without a wait are launched only by `<<<...>>>` (never through launch_kernel or
    launch_tile_layout, which add the attribute)."""
    text = "\n".join(path.read_text() for path in sorted(CSRC.iterdir()))
    for name in PLAIN_CUDA_KERNELS:
        assert re.search(rf"{name}(<[^;]*?>)?<<<", text), f"{name} has no plain launch"
        assert not re.search(rf"launch_(kernel|tile_layout)\(\s*{name}\b", text), f"{name} launched with PDL"
