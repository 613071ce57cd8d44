"""server.pinned_pages: adapter tensors packed into pages of one size (plain memory stands in for pinned)."""

from __future__ import annotations

import gc
import weakref

import torch

from server.pinned_pages import PAGE_BYTES, pin_packed


class Pages:
    """An allocator that remembers what it handed out."""

    def __init__(self):
        self.sizes: list[int] = []
        self.blocks: list[weakref.ref] = []

    def __call__(self, num_bytes: int) -> torch.Tensor:
        block = torch.empty(num_bytes, dtype=torch.uint8)
        self.sizes.append(num_bytes)
        self.blocks.append(weakref.ref(block.untyped_storage()))
        return block


def _tensors(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = [((16, 4096), (4096, 16)), ((16, 4096), (14336, 16)), ((3, 7), (5, 3)), ((16, 14336), (4096, 16))]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    return {(layer, "m"): tuple(torch.randn(s, generator=gen).to(d) for s in pair)
            for layer, (pair, d) in enumerate(zip(shapes * 8, dtypes * 8, strict=True))}


def test_copies_are_equal_packed_in_few_pages_and_aligned():
    tensors, pages = _tensors(), Pages()
    packed, pinned = pin_packed(tensors, pages)
    for key, pair in tensors.items():
        for original, copy in zip(pair, packed[key], strict=True):
            assert copy.dtype == original.dtype and copy.shape == original.shape and torch.equal(copy, original)
            assert (copy.data_ptr() - copy.untyped_storage().data_ptr()) % 256 == 0
    total = sum(t.numel() * t.element_size() for pair in tensors.values() for t in pair)
    assert set(pages.sizes) == {PAGE_BYTES} and pinned == len(pages.sizes) * PAGE_BYTES
    count = sum(len(pair) for pair in tensors.values())
    assert total // PAGE_BYTES < len(pages.sizes) <= -(-(total + 256 * count) // PAGE_BYTES)


def test_a_tensor_larger_than_a_page_gets_a_block_of_its_own():
    big = torch.randn(PAGE_BYTES // 4 + 1)  # float32: one element more than a page
    pages = Pages()
    packed, pinned = pin_packed({0: (big, torch.ones(3))}, pages)
    assert torch.equal(packed[0][0], big) and torch.equal(packed[0][1], torch.ones(3))
    assert sorted(pages.sizes) == [PAGE_BYTES, PAGE_BYTES + 4]
    assert pinned == PAGE_BYTES + 2 * PAGE_BYTES  # the block counts as the allocator's power of two


def test_pages_are_freed_when_the_last_copy_goes():
    pages = Pages()
    packed, _ = pin_packed(_tensors(), pages)
    keep = packed[(0, "m")][0]
    del packed
    gc.collect()
    alive = [ref for ref in pages.blocks if ref() is not None]
    assert len(alive) == 1  # the page holding `keep`
    del keep
    gc.collect()
    assert all(ref() is None for ref in pages.blocks)
