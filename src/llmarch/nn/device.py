"""Device rules: where reading a tensor's values back into Python is free, and checks that never read back.

On an accelerator, ``int(t)``, ``bool(t)``, ``t.item()`` or ``t.tolist()`` waits for every queued kernel (a host
sync) and stalls the launch queue, so the model forward and the training step read values back only on the CPU,
where the read is a memory load. Elsewhere a check becomes ``torch._assert_async``: the device raises when the
condition fails, at the next synchronisation, and the caller's queue never drains.
"""
from __future__ import annotations

import torch


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


__all__ = ["host_reads_ok", "assert_on_device", "to_device", "read_back"]
