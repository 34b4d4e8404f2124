"""The CPU KV pool's memory (fastgpt2/engine/host_memory.py): zeros like torch.zeros, on a 2 MiB boundary, and on
transparent huge pages where the kernel offers them to a process that asks."""
import gc
import mmap
import re
from pathlib import Path

import pytest
import torch

from fastgpt2.engine.host_memory import HUGE_PAGE_BYTES, zeros_on_huge_pages

linux_advice = pytest.mark.skipif(getattr(mmap, "MADV_HUGEPAGE", None) is None, reason="no MADV_HUGEPAGE here")


def _thp_mode(setting: str = "enabled") -> str | None:
    try:
        text = Path(f"/sys/kernel/mm/transparent_hugepage/{setting}").read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def _anon_huge_kb(address: int) -> int | None:
    """AnonHugePages of the mapping of this process that holds `address` (kB), from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


@linux_advice
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pool_is_zeros_on_a_huge_page_boundary_and_outlives_its_mapping_name(dtype):
    shape = (2, 2, 64, 16, 12, 64)  # 6 or 12 MiB
    pool = zeros_on_huge_pages(shape, dtype)
    gc.collect()  # only the tensor refers to the mapping now
    assert pool.shape == shape and pool.dtype == dtype and pool.is_contiguous() and pool.device.type == "cpu"
    assert pool.data_ptr() % HUGE_PAGE_BYTES == 0
    assert torch.count_nonzero(pool).item() == 0
    pool[1, 0, 63, 15] = 2.5  # writable to its last block
    pool[0, 1, 0, 0, 0, 0] = -1.0
    assert pool.double().sum().item() == 2.5 * 12 * 64 - 1.0
    view = pool[1, 0]
    del pool
    gc.collect()
    assert view[63, 15].double().sum().item() == 2.5 * 12 * 64  # the view keeps the mapping


@linux_advice
def test_the_kernel_backs_the_pool_with_huge_pages_when_it_offers_them():
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here")
    if _thp_mode("defrag") not in ("always", "madvise", "defer+madvise"):
        # The kernel would not compact memory for an advised fault: huge pages only when some happen to be free.
        pytest.skip(f"transparent huge page defrag is {_thp_mode('defrag')!r} here")
    pool = zeros_on_huge_pages((8 * HUGE_PAGE_BYTES // 4,), torch.float32)
    huge_kb = _anon_huge_kb(pool.data_ptr())
    assert huge_kb is not None and huge_kb >= 2048, f"AnonHugePages of the pool's mapping: {huge_kb} kB"


def test_a_small_pool_is_plain_zeros():
    pool = zeros_on_huge_pages((4, 16, 12), torch.float32)
    assert pool.shape == (4, 16, 12) and torch.count_nonzero(pool).item() == 0
