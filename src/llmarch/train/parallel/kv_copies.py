"""GQA under tensor parallel with fewer kv heads than tp ranks (G < T): each rank keeps a copy of the one kv head
its query heads read (:func:`.tensor.heads_layout` repeats its rows), so T/G ranks hold the same k and v rows.

The forward is exact as it is, and so is the input gradient (each rank's part of it is summed by the
column-parallel all-reduce), but a copy's weight gradient only sees its own rank's query heads: the gradient of
the kv head is the sum over its copies. :meth:`KVCopies.sync` sums them over the ranks holding copies once per
optimizer step (before clipping), so every copy gets the same gradient and the same AdamW update and the copies
stay equal; :meth:`row_weights` counts each copy 1/(T/G) in the global gradient norm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class KVCopies:
    """``masks``: parameter name -> bool [tp-local rows], True on the copied k and v rows; ``mesh``: the run's
    (pp, dp, tp) mesh; ``copies`` = T/G consecutive tp ranks hold one kv head."""

    def __init__(self, masks: dict[str, torch.Tensor], mesh, copies: int):
        from torch.distributed.device_mesh import DeviceMesh

        self.masks, self.copies = masks, copies
        grid = DeviceMesh(mesh.device_type, mesh.mesh.reshape(-1, copies), mesh_dim_names=("kv_head", "kv_copy"))
        self.group = grid["kv_copy"].get_group()
        self.dp_rank, self.dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
        self.weights: dict[int, torch.Tensor] = {}

    def _local_rows(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The mask of the rows this rank's (FSDP2-chunked) shard holds."""
        mask = self.masks[name].to(local.device)
        if local.shape[0] == len(mask):
            return mask
        start = self.dp_rank * -(-len(mask) // self.dp)  # FSDP2 chunks dim 0 as torch.chunk does
        return mask[start:start + local.shape[0]]

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Sum the gradients of the kv copies over the ranks that hold them (in place)."""
        self.weights = {}
        for name, p in model.named_parameters():
            if name not in self.masks or p.grad is None:
                continue
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            rows = self._local_rows(name, local)
            picked = local[rows]
            dist.all_reduce(picked, group=self.group)
            local[rows] = picked
            self.weights[id(p)] = 1.0 - (1.0 - 1.0 / self.copies) * rows.float()

    def row_weights(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> weight of each local row in the squared gradient norm (1/copies on copies)."""
        return self.weights


def attach_kv_copies(model: nn.Module, mesh, n_kv_heads: int, head_dim: int) -> KVCopies | None:
    """The :class:`KVCopies` of a tensor-parallel model whose layout repeats kv rows (None when G >= T); kept on
    the model as ``model.kv_copies``."""
    tp = mesh["tp"].size()
    if n_kv_heads >= tp:
        return None
    masks = {}
    for name, order in model.tp_layout.orders.items():
        if len(order) > int(order.max()) + 1:  # repeated rows: [q (H/T) | k | v] per rank, k and v one head each
            n = len(order) // tp
            masks[name] = torch.arange(n) >= n - 2 * head_dim
    model.kv_copies = KVCopies(masks, mesh, tp // n_kv_heads)
    return model.kv_copies


__all__ = ["KVCopies", "attach_kv_copies"]
