"""Device rules: where reading a tensor's values back into Python is free, checks that never read back, and how
the host's memory allocator serves a CPU training process.

On an accelerator, ``int(t)``, ``bool(t)``, ``t.item()`` or ``t.tolist()`` waits for every queued kernel (a host
sync) and stalls the launch queue, so the model forward and the training step read values back only on the CPU,
where the read is a memory load. Elsewhere a check becomes ``torch._assert_async``: the device raises when the
condition fails, at the next synchronisation, and the caller's queue never drains.
"""
from __future__ import annotations

import ctypes
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 1 << 30  # free memory at the top of the heap returned to the OS past this much
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_reusing = False


def host_reads_ok(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values into Python costs only the read: a CPU tensor outside a compiled trace."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def assert_on_device(ok: torch.Tensor, message: str) -> None:
    """Fail with ``message`` unless the boolean scalar ``ok`` holds, without reading it back (no-op on the meta
    device and while torch.compile traces)."""
    if ok.device.type != "meta" and not torch.compiler.is_compiling():
        torch._assert_async(ok, message)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to ``device``: through pinned memory and without blocking when it is a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def read_back(values: list[torch.Tensor]) -> list[float]:
    """The values of several scalar tensors as Python floats, in one transfer (one host sync, not one per value);
    each value is exactly ``float(v)``. Distributed tensors (DTensor) are read through their full value."""
    if not values:
        return []
    values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in values]
    return torch.stack([v.detach().reshape(()).to(torch.float32 if v.dtype != torch.float64 else v.dtype)
                        for v in values]).tolist()


def reuse_host_memory() -> bool:
    """Have glibc's malloc keep freed host memory for the next allocation of the process (``mallopt``: no
    ``mmap`` for large blocks, the heap trimmed past ``TRIM_BYTES`` of free space). Returns whether that is in
    effect. Idempotent.

    By default glibc maps every block above 32 MB (below, as large as the largest freed so far) afresh from the
    OS and unmaps it on free, and the kernel then zero-fills each of its 4 KB pages on first touch (a page fault
    each, ~0.6 ms per MB here). A training step allocates and frees the same large gradients, optimizer
    temporaries and logits every step, so it pays that again each time: small CPU training steps ran 1.2-1.9x
    faster with the memory reused (``benchmarks/host_memory.py``). The cost: the process keeps its peak heap
    (up to ``TRIM_BYTES`` free at the top) instead of returning it between steps.

    Left alone where the user tuned malloc through the environment (``MALLOC_MMAP_MAX_`` and friends,
    ``GLIBC_TUNABLES=glibc.malloc...``) and off glibc (macOS, musl, Windows), where this returns False."""
    global _reusing
    if _reusing:
        return True
    if any(k in os.environ for k in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, ValueError, OSError, TypeError):
        return False
    _reusing = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
    return _reusing


__all__ = ["host_reads_ok", "assert_on_device", "to_device", "read_back", "reuse_host_memory"]
