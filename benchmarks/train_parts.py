"""Parts of the fp32 LLaMA-style training step ([4, 512], D 512, H 8, G 2, V 8192), each variant against the
form it replaced or was compared with, forward + backward, interleaved rounds, median ms:

- attention: SDPA over the strided q/k/v views of the fused projection (what llmarch runs) against contiguous
  copies and against repeating k/v to full heads;
- rotation: ``llmarch.nn.rope.rotate`` against ``x * cos + rotate_half(x) * sin`` on the joint q/k view;
- SwiGLU: ``gate_product`` against chunk + silu + mul;
- loss: the LM head alone, + ``F.cross_entropy``, + llmarch's chunked loss.

    PYTHONPATH=src python benchmarks/train_parts.py [--repeats 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import common
from llmarch.nn.activation import gate_product
from llmarch.nn.rope import rotate, rotate_half
from llmarch.train.chunked_ce import chunked_ce_sum

B, T, H, G, Dh, D, FF, V = 4, 512, 8, 2, 64, 512, 1376, 8192


def parts() -> dict[str, dict]:
    """{part: {variant: fn}}: each fn runs one forward + backward."""
    qkv = torch.randn(B, T, (H + 2 * G) * Dh, requires_grad=True)
    g_att = torch.randn(B, H, T, Dh)

    def views():
        x = qkv.view(B, T, H + 2 * G, Dh).transpose(1, 2)  # [B, H+2G, T, Dh]
        return x[:, :H], x[:, H:H + G], x[:, H + G:]

    def sdpa(prep):
        def run():
            q, k, v = prep(*views())
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != H).backward(g_att)
        return run

    ang = torch.randn(B, 1, T, Dh // 2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    g_rot = torch.randn(B, H + G, T, Dh)

    def rot(fn):
        return lambda: fn(qkv.view(B, T, H + 2 * G, Dh).transpose(1, 2)[:, :H + G], cos, sin).backward(g_rot)

    h = torch.randn(B, T, 2 * FF, requires_grad=True)
    g_glu = torch.randn(B, T, FF)
    hid = torch.randn(B * T, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.02).requires_grad_()
    y = torch.randint(0, V, (B * T,))
    return {
        "attention (SDPA fwd+bwd, one layer)": {
            "strided views (llmarch)": sdpa(lambda q, k, v: (q, k, v)),
            "contiguous copies": sdpa(lambda q, k, v: (q.contiguous(), k.contiguous(), v.contiguous())),
            "k/v repeated to H heads": sdpa(lambda q, k, v: (q.contiguous(), k.repeat_interleave(H // G, 1),
                                                             v.repeat_interleave(H // G, 1)))},
        "rotation of q and k (one layer)": {
            "rope.rotate (llmarch)": rot(rotate),
            "x*cos + rotate_half(x)*sin": rot(lambda x, c, s: x * c + rotate_half(x) * s)},
        "SwiGLU product (one layer)": {
            "gate_product (llmarch)": lambda: gate_product(F.silu, h).backward(g_glu),
            "chunk + silu + mul": lambda: (F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]).backward(g_glu)},
        "LM head + loss": {
            "head only (sum)": lambda: (hid @ w.T).sum().backward(),
            "head + F.cross_entropy": lambda: F.cross_entropy(hid @ w.T, y, reduction="sum").backward(),
            "head + chunked loss (llmarch)": lambda: chunked_ce_sum(hid @ w.T, y).backward()},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, out = [], {}
    for part, fns in parts().items():
        times = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        out[part] = times
        for k, v in times.items():
            rows.append([part, k, statistics.median(v) * 1e3])
    common.print_table(rows, ["part", "variant", "ms (median)"])
    print(f"wrote {common.write_results('train_parts', dict(settings=vars(args), times=out, load=os.getloadavg()))}")


if __name__ == "__main__":
    main()
