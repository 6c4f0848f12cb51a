"""RETRO vs its base decoder on the standard-library corpus (byte level, vocabulary 256).

Both models start from the same decoder weights and see the same batches in the same loop; RETRO also gets, for
every 32-byte chunk, k=2 neighbours (chunk + continuation) retrieved from a faiss flat index over the training
files. ``--retriever ngram`` embeds chunks as hashed bags of byte 1..4-grams (lexical, no training);
``--retriever encoder`` (the default) uses a frozen BERT-style encoder of this library (mean-pooled). No pretrained
encoder can be downloaded here, so the encoder is random (a random-feature embedder) unless ``--retriever-steps N``
first gives it N DPR-style contrastive steps (a chunk should pick out its own next chunk among the batch's,
in-batch negatives). Also reports how many of the true continuation's byte 4-grams the top-1 neighbour holds.
Training sequences never retrieve their own text; validation files are not in the index. Prints both validation
losses and writes them as JSON.

    PYTHONPATH=src python examples/retro_vs_base.py --steps 500 --train-bytes 2000000 --val-bytes 100000 \
        --seq 128 --batch 16 --d-model 96 --lr 2e-3 --threads 1 --retriever ngram --ngram-dim 256 \
        --json benchmarks/results/retro_vs_base.json

The loop is deliberately small. With the shared training loop the only RETRO-specific step is, per batch,
``nb, mask = retrieve_neighbours(index, embed, inputs, k, r, own_text_exclusion(starts, T + 1, m))`` and
``model(inputs, neighbours=nb, neighbour_mask=mask)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import llmarch
from llmarch.model import Model
from llmarch.retrieval import (ChunkIndex, EncoderEmbedder, HashedNgramEmbedder, in_batch_negatives_loss,
                               own_text_exclusion, retrieve_neighbours)
from llmarch.retrieval.corpus import byte_stream, split_files, text_files


def retro_config(seq: int, d_model: int = 128, n_layers: int = 4) -> llmarch.ModelConfig:
    """retro-tiny at byte level (CCA in layers 1 and 3, chunks of 32, 2 neighbours of 64 bytes, 1 encoder layer)."""
    return llmarch.preset("retro-tiny").replace(vocab_size=256, max_seq_len=seq, pad_token_id=0, d_model=d_model,
                                                d_ff=4 * d_model, n_layers=n_layers)


def train_retriever(encoder, stream: np.ndarray, m: int, steps: int, seed: int, batch: int = 64) -> None:
    """DPR-style contrastive training (in-batch negatives) of one shared encoder: a chunk's mean-pooled, normalised
    embedding should pick out the chunk that follows it among the batch's next chunks. Neighbours then come from
    similar contexts. The encoder is frozen afterwards."""
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed + 1)
    encoder.train()
    for _ in range(steps):
        at = rng.integers(0, len(stream) // m - 1, size=batch) * m
        pair = torch.from_numpy(np.stack([stream[a:a + 2 * m] for a in at]).astype(np.int64)).view(2 * batch, m)
        v = F.normalize(encoder(pair).hidden_states.mean(1), dim=-1).view(batch, 2, -1)
        loss = in_batch_negatives_loss(v[:, 0] / 0.05, v[:, 1])  # temperature 0.05
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"  retriever: {steps} contrastive steps, last loss {loss.item():.3f}", flush=True)


def build_index(stream: np.ndarray, path: Path, chunk_size: int, seed: int, retriever_steps: int = 0,
                retriever: str = "encoder", ngram_dim: int = 1024):
    if retriever == "ngram":  # lexical: hashed bag of byte 1..4-grams, no training
        embed = HashedNgramEmbedder(ngram_dim, 4)
        index = ChunkIndex.create(path, dim=embed.dim, chunk_size=chunk_size, kind="flat", embedder=embed.meta,
                                  encoder=f"hashed byte 1..4-grams, {ngram_dim} buckets")
        index.add(stream, embed, batch_size=1024)
        return index, embed
    torch.manual_seed(seed)
    encoder = llmarch.build(llmarch.preset("dpr-tiny").replace(vocab_size=256, dropout=0.0, attn_dropout=0.0))
    if retriever_steps:
        train_retriever(encoder, stream, chunk_size, retriever_steps, seed)
    embed = EncoderEmbedder(encoder, pool="mean")
    name = f"dpr-tiny, {retriever_steps} contrastive steps" if retriever_steps else "random dpr-tiny"
    index = ChunkIndex.create(path, dim=embed.dim, chunk_size=chunk_size, kind="flat", encoder=name)
    index.add(stream, embed, batch_size=1024)
    return index, embed


def ngram_overlap(index, embed, val: np.ndarray, m: int, n_chunks: int = 2000, seed: int = 0) -> dict:
    """How much the top-1 neighbour (chunk + continuation) of a validation chunk shares with the true continuation:
    the fraction of the continuation's distinct byte 4-grams found in it, against a random indexed chunk."""
    chunks = val[:len(val) // m * m].reshape(-1, m)[:n_chunks + 1]
    queries, truth = chunks[:-1], chunks[1:]
    top = index.neighbours(index.search(embed(queries), 1)[0])[:, 0]  # [Q, 2m]
    rand = index.neighbours(np.random.default_rng(seed).integers(0, len(index), size=len(queries)))
    grams = lambda row: {row[i:i + 4].astype(np.int32).tobytes() for i in range(len(row) - 3)}

    def share(nbs):
        return float(np.mean([len(grams(t) & grams(nb)) / max(1, len(grams(t))) for t, nb in zip(truth, nbs)]))
    return dict(neighbour=round(share(top), 4), random=round(share(rand), 4),
                verbatim_top1=round(float((top[:, :m] == queries).all(1).mean()), 4))


def sample_batch(stream: np.ndarray, batch: int, seq: int, m: int, rng: np.random.Generator):
    """[B, seq + 1] windows starting on chunk boundaries, and their start offsets."""
    starts = rng.integers(0, (len(stream) - seq - 1) // m, size=batch) * m
    return torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]).astype(np.int64)), starts


def neighbours_for(model, index, embed, inputs, exclude=None):
    r = model.config.retrieval
    return retrieve_neighbours(index, embed, inputs, r.n_neighbours, r.neighbour_len, exclude)


def loss_of(model, tokens: torch.Tensor, nb=None) -> torch.Tensor:
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    kw = {} if nb is None else dict(neighbours=nb[0], neighbour_mask=nb[1])
    logits = model(inputs, **kw).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


@torch.no_grad()
def evaluate(model, val: np.ndarray, seq: int, index, embed, retrieval: bool, batch: int = 16) -> float:
    model.eval()
    n = (len(val) - 1) // seq
    windows = torch.from_numpy(np.stack([val[i * seq:i * seq + seq + 1] for i in range(n)]).astype(np.int64))
    total = 0.0
    for i in range(0, n, batch):
        tokens = windows[i:i + batch]
        nb = neighbours_for(model, index, embed, tokens[:, :-1]) if retrieval else None
        total += loss_of(model, tokens, nb).item() * len(tokens)
    model.train()
    return total / n


def train(model, stream, steps, batch, seq, lr, seed, index=None, embed=None, log_every=50) -> list[dict]:
    m = model.config.retrieval.chunk_size if index is not None else 32
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, log = np.random.default_rng(seed), []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        tokens, starts = sample_batch(stream, batch, seq, m, rng)
        nb = None
        if index is not None:
            nb = neighbours_for(model, index, embed, tokens[:, :-1], own_text_exclusion(starts, seq + 1, m))
        loss = loss_of(model, tokens, nb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.append(dict(step=step, loss=round(loss.item(), 4), s=round(time.perf_counter() - t0, 1)))
            print(f"  {'retro' if index is not None else 'base '} step {step:4d} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return log


def run(steps: int = 300, train_bytes: int = 2_000_000, val_bytes: int = 100_000, batch: int = 8, seq: int = 256,
        lr: float = 2e-3, seed: int = 0, d_model: int = 128, retriever_steps: int = 0,
        workdir: str | None = None, retriever: str = "encoder", n_neighbours: int | None = None,
        ngram_dim: int = 1024, cca_layers: tuple[int, ...] | None = None) -> dict:
    train_files, val_files = split_files(text_files(), val_fraction=0.1, seed=seed)
    train_stream, val_stream = byte_stream(train_files, train_bytes), byte_stream(val_files, val_bytes)
    cfg = retro_config(seq, d_model)
    if n_neighbours is not None:
        cfg = cfg.replace(retrieval=dataclasses.replace(cfg.retrieval, n_neighbours=n_neighbours))
    if cca_layers is not None:
        cfg = cfg.replace(retrieval=dataclasses.replace(cfg.retrieval, cca_layers=tuple(cca_layers)))
    m = cfg.retrieval.chunk_size
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        index, embed = build_index(train_stream, Path(tmp) / "index", m, seed, retriever_steps, retriever,
                                   ngram_dim)
        index_s = time.perf_counter() - t0
        overlap = ngram_overlap(index, embed, val_stream, m, seed=seed)
        print(f"  index: {len(index)} chunks in {index_s:.0f}s; top-1 neighbour shares {overlap['neighbour']:.1%} "
              f"of the true continuation's 4-grams (random chunk {overlap['random']:.1%})", flush=True)
        torch.manual_seed(seed)
        retro = llmarch.build(cfg)
        base = Model(cfg.replace(retrieval=None))
        base.load_state_dict({k: v for k, v in retro.state_dict().items()
                              if ".cross" not in k and not k.startswith("neighbour_encoder")})
        results = dict(steps=steps, batch=batch, seq=seq, lr=lr, seed=seed, retriever=index.meta["encoder"],
                       train_bytes=len(train_stream),
                       val_bytes=len(val_stream), chunks_indexed=len(index), index_build_s=round(index_s, 1),
                       val_chunks_with_verbatim_top1=overlap["verbatim_top1"],
                       continuation_4gram_overlap=overlap,
                       params_base=sum(p.numel() for p in base.parameters()),
                       params_retro=sum(p.numel() for p in retro.parameters()),
                       config=cfg.to_dict())
        for name, model, idx in (("base", base, None), ("retro", retro, index)):
            t0 = time.perf_counter()
            results[f"{name}_log"] = train(model, train_stream, steps, batch, seq, lr, seed, idx, embed)
            results[f"{name}_train_s"] = round(time.perf_counter() - t0, 1)
            results[f"{name}_val_loss"] = round(evaluate(model, val_stream, seq, index, embed, idx is not None), 4)
        results["retro_val_loss_retrieval_off"] = round(evaluate(retro, val_stream, seq, index, embed, False), 4)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-bytes", type=int, default=2_000_000)
    p.add_argument("--val-bytes", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--retriever-steps", type=int, default=0,
                   help="contrastive steps for the frozen chunk encoder (0: random encoder)")
    p.add_argument("--retriever", choices=["encoder", "ngram"], default="encoder",
                   help="encoder: frozen dpr-tiny (random unless --retriever-steps); ngram: hashed byte n-grams")
    p.add_argument("--ngram-dim", type=int, default=1024, help="hash buckets of the ngram retriever")
    p.add_argument("--cca-layers", type=int, nargs="+", default=None,
                   help="decoder layers with chunked cross-attention (default: retro-tiny's 1 3)")
    p.add_argument("--neighbours", type=int, default=None, help="neighbours per chunk (default: retro-tiny's 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.steps, args.train_bytes, args.val_bytes, args.batch, args.seq, args.lr, args.seed, args.d_model,
              args.retriever_steps, retriever=args.retriever, n_neighbours=args.neighbours,
              ngram_dim=args.ngram_dim, cca_layers=args.cca_layers)
    print(f"validation loss (nats/byte): base {res['base_val_loss']:.4f}  retro {res['retro_val_loss']:.4f}  "
          f"(retro with retrieval off {res['retro_val_loss_retrieval_off']:.4f}); "
          f"{res['val_chunks_with_verbatim_top1']:.1%} of validation chunks have a verbatim top-1 neighbour")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
