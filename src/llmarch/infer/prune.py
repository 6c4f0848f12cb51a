"""Structured pruning: drop whole attention heads and FFN channels with the lowest importance, giving a smaller
model with a valid config (fewer heads at the same head_dim; a narrower d_ff) whose weights load and run.

Importance of a head (or channel) is the size of what it writes into the residual stream: the mean norm of its
output over calibration tokens (or, without data, of its input weights) times the norm of its slice of the
output projection (Michel et al. 2019 score heads by the loss's sensitivity; this is the cheaper magnitude proxy).
With grouped kv heads the same number of query heads is dropped from every group, so G stays a divisor of H.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.model import build
from llmarch.nn.position import PositionScheme


def _ffn_inputs(ffn: nn.Module) -> tuple[nn.Linear, int]:
    """The Linear that produces the FFN channels and how many F-sized chunks it stacks (GLU: gate | up)."""
    if hasattr(ffn, "gate_up"):
        return ffn.gate_up, 2
    if hasattr(ffn, "up"):
        return ffn.up, 1
    raise ValueError(f"pruning supports MLP and GLU feed-forwards; {type(ffn).__name__} has neither up nor gate_up")


@torch.no_grad()
def importance(model, calib_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores: heads [L, H] and FFN channels [L, F]; ``calib_ids`` [B, T] makes them data-driven."""
    cfg = model.config
    H, Dh = cfg.n_heads, cfg.dh
    acts: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    if calib_ids is not None:
        for i, layer in enumerate(model.decoder.layers):
            def grab(name, i=i):
                return lambda mod, args: acts.setdefault(i, {}).__setitem__(name, args[0].float())
            hooks += [layer.attn.out.register_forward_pre_hook(grab("attn")),
                      layer.ffn.down.register_forward_pre_hook(grab("ffn"))]
        try:
            model.eval()(calib_ids)
        finally:
            for h in hooks:
                h.remove()
    heads, channels = [], []
    for i, layer in enumerate(model.decoder.layers):
        out_w = layer.attn.out.weight.float().view(cfg.d_model, H, Dh).norm(dim=(0, 2))  # [H]
        down_w = layer.ffn.down.weight.float().norm(dim=0)  # [F]
        if calib_ids is not None:
            head_in = acts[i]["attn"].view(*acts[i]["attn"].shape[:-1], H, Dh).norm(dim=-1).flatten(0, -2).mean(0)
            chan_in = acts[i]["ffn"].abs().flatten(0, -2).mean(0)
        else:
            head_in = layer.attn.qkv.weight.float()[:H * Dh].view(H, Dh, -1).norm(dim=(1, 2))
            up, chunks = _ffn_inputs(layer.ffn)
            chan_in = up.weight.float().view(chunks, cfg.d_ff, -1).norm(dim=(0, 2))
        heads.append(head_in * out_w)
        channels.append(chan_in * down_w)
    return torch.stack(heads), torch.stack(channels)


def _kept_heads(score: torch.Tensor, H: int, G: int, n_heads: int) -> tuple[list[int], list[int]]:
    """Query heads and kv heads to keep in one layer."""
    if G == H:  # one kv head per query head: drop both
        keep = sorted(score.topk(n_heads).indices.tolist())
        return keep, keep
    per_group = n_heads // G
    group = H // G
    keep = []
    for g in range(G):
        top = score[g * group:(g + 1) * group].topk(per_group).indices
        keep += sorted((top + g * group).tolist())
    return keep, list(range(G))


@torch.no_grad()
def prune(model, n_heads: int | None = None, d_ff: int | None = None, calib_ids: torch.Tensor | None = None):
    """A new, smaller model keeping the ``n_heads`` most important query heads and ``d_ff`` channels per layer."""
    cfg = model.config
    H, G, Dh, F = cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.d_ff
    n_heads = H if n_heads is None else n_heads
    d_ff = F if d_ff is None else d_ff
    if not 1 <= d_ff <= F:
        raise ValueError(f"d_ff must be in [1, {F}], got {d_ff}")
    if not 1 <= n_heads <= H or (G < H and n_heads % G):
        raise ValueError(f"n_heads must be in [1, {H}]" + (f" and a multiple of n_kv_heads={G}" if G < H else "")
                         + f", got {n_heads}")
    positions = model.decoder.positions
    if n_heads < H and type(positions).score_bias is not PositionScheme.score_bias:
        raise ValueError(f"position={cfg.position!r} biases scores per head (slopes depend on n_heads), so "
                         "dropping heads changes the function; prune only d_ff")
    head_score, chan_score = importance(model, calib_ids)
    new_G = n_heads if G == H else G
    new_cfg = cfg.replace(n_heads=n_heads, n_kv_heads=new_G, head_dim=Dh, d_ff=d_ff)
    state = dict(model.state_dict())
    for i, layer in enumerate(model.decoder.layers):
        pre = f"decoder.layers.{i}."
        q_keep, kv_keep = _kept_heads(head_score[i], H, G, n_heads)
        rows = [torch.arange(h * Dh, (h + 1) * Dh) for h in q_keep]
        rows += [H * Dh + torch.arange(g * Dh, (g + 1) * Dh) for g in kv_keep]
        rows += [(H + G) * Dh + torch.arange(g * Dh, (g + 1) * Dh) for g in kv_keep]
        rows = torch.cat(rows)
        for name in ("weight", "bias"):
            if pre + "attn.qkv." + name in state:
                state[pre + "attn.qkv." + name] = state[pre + "attn.qkv." + name][rows]
        cols = torch.cat([torch.arange(h * Dh, (h + 1) * Dh) for h in q_keep])
        state[pre + "attn.out.weight"] = state[pre + "attn.out.weight"][:, cols]
        keep = chan_score[i].topk(d_ff).indices.sort().values
        up, chunks = _ffn_inputs(layer.ffn)
        up_name = pre + "ffn." + ("gate_up" if chunks == 2 else "up")
        idx = torch.cat([keep + c * F for c in range(chunks)])
        for name in ("weight", "bias"):
            if f"{up_name}.{name}" in state:
                state[f"{up_name}.{name}"] = state[f"{up_name}.{name}"][idx]
        state[pre + "ffn.down.weight"] = state[pre + "ffn.down.weight"][:, keep]
    small = build(new_cfg)
    small.load_state_dict(state, strict=True)
    return small.to(next(model.parameters()).dtype).eval()
