"""`llmarch index`: build a retrieval index (faiss + memmapped chunks) from text files, inspect it, query it."""
from __future__ import annotations

import time
from pathlib import Path

from llmarch.cli.common import add_json_flag, emit_json, table


def add(sub) -> None:
    p = sub.add_parser("index", help="build, inspect and query a retrieval index (RETRO chunks in faiss)")
    verbs = p.add_subparsers(dest="index_verb", metavar="ACTION", required=True)
    b = verbs.add_parser("build", help="chunk text files, embed the chunks with a frozen encoder, store them")
    b.add_argument("--data", metavar="PATH", help="a text file or a directory (default: the Python stdlib sources)")
    b.add_argument("--out", metavar="DIR", required=True, help="index directory to create (new or empty)")
    b.add_argument("--overwrite", action="store_true", help="build into a non-empty --out, replacing the index "
                   "files there; other files are kept")
    b.add_argument("--pattern", default="*.py", help="file pattern under a directory (default *.py)")
    b.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    b.add_argument("--tokenizer", metavar="FILE", help="a tokenizers tokenizer.json (default: UTF-8 bytes, V=256)")
    b.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk (RETRO: 64)")
    b.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat", help="faiss index (flat = exact)")
    b.add_argument("--metric", choices=["ip", "l2"], default="ip")
    b.add_argument("--nlist", type=int, default=None, help="ivf cells (default ~4 sqrt(N))")
    b.add_argument("--nprobe", type=int, default=8, help="ivf cells visited per query")
    b.add_argument("--embedder", choices=["ngram", "encoder"], default=None,
                   help="ngram: hashed bag of token 1..4-grams, lexical and training-free (the default); encoder: a "
                   "frozen encoder model (the default when --encoder or --encoder-preset is given)")
    b.add_argument("--ngram-dim", type=int, default=1024, help="hash buckets of the ngram embedder")
    b.add_argument("--ngram-n", type=int, default=4, help="longest n-gram of the ngram embedder")
    enc = b.add_mutually_exclusive_group()
    enc.add_argument("--encoder", metavar="DIR", help="frozen encoder: an llmarch or HF model directory")
    enc.add_argument("--encoder-preset", default=None, help="encoder preset with seeded random weights, "
                     "a random-feature embedder (default bert-tiny)")
    b.add_argument("--pool", choices=["mean", "first"], default="mean", help="mean (RETRO) or [CLS] (DPR)")
    b.add_argument("--seed", type=int, default=0)
    add_json_flag(b)
    b.set_defaults(func=run_build)
    i = verbs.add_parser("info", help="what an index holds")
    i.add_argument("index", metavar="DIR")
    add_json_flag(i)
    i.set_defaults(func=run_info)
    q = verbs.add_parser("query", help="the chunks nearest to a text (embedded like the index's chunks)")
    q.add_argument("index", metavar="DIR")
    q.add_argument("text", help="query text")
    q.add_argument("-k", type=int, default=5, help="chunks to show (default 5)")
    q.add_argument("--tokenizer", metavar="FILE", help="the tokenizer.json the index was built with (not needed "
                   "for a byte-level index)")
    add_json_flag(q)
    q.set_defaults(func=run_query)


def _tokens(args):
    import numpy as np

    from llmarch.retrieval.corpus import byte_stream, text_files

    from llmarch.train.retrieving import index_tokenizer

    files = text_files(args.data, args.pattern)
    if args.tokenizer is None:
        return byte_stream(files, args.max_bytes).astype(np.int64), index_tokenizer(None), len(files)
    from llmarch.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)  # the same encoding as training (no special tokens added)
    ids, total = [], 0
    for f in files:
        text = f.read_text(errors="replace")
        ids += tok.encode(text)
        total += len(text.encode())
        if args.max_bytes is not None and total >= args.max_bytes:
            break
    return np.asarray(ids, dtype=np.int64), index_tokenizer(tok), len(files)


def _encoder(args, vocab: int):
    import torch

    import llmarch

    if args.encoder:
        from llmarch.checkpoint import load_model

        model = load_model(args.encoder)
        if model.config.vocab_size < vocab:
            raise ValueError(f"--encoder {args.encoder}: its vocabulary ({model.config.vocab_size}) does not cover "
                             f"the corpus tokens ({vocab}); use the encoder's tokenizer with --tokenizer")
        return model, args.encoder
    torch.manual_seed(args.seed)
    cfg = llmarch.preset(args.encoder_preset or "bert-tiny")
    if cfg.kind != "encoder":
        raise ValueError(f"--encoder-preset {args.encoder_preset}: needs an encoder preset (bert-tiny, dpr-tiny, ...)")
    return llmarch.build(cfg.replace(vocab_size=vocab, dropout=0.0, attn_dropout=0.0)), \
        f"{args.encoder_preset or 'bert-tiny'} (random, seed {args.seed})"


def run_build(args) -> int:
    from llmarch.outdir import check_out_dir, staged_dir

    check_out_dir(args.out, args.overwrite, "--out")  # before the work: a user's directory is never emptied
    with staged_dir(args.out, args.overwrite) as tmp:  # built beside --out, then moved in
        info = _build(args, tmp)
    if args.json:
        emit_json(info)
    else:
        print(table([[k, v] for k, v in info.items()], ["field", "value"]))
    return 0


def _build(args, out: Path) -> dict:
    from llmarch.checkpoint import save_model
    from llmarch.retrieval import ChunkIndex, EncoderEmbedder, HashedNgramEmbedder

    t0 = time.perf_counter()
    tokens, tok_meta, n_files = _tokens(args)
    kind = args.embedder or ("encoder" if args.encoder or args.encoder_preset else "ngram")
    if kind == "ngram":
        embed = HashedNgramEmbedder(args.ngram_dim, args.ngram_n)
        name = f"hashed 1..{args.ngram_n}-grams, {args.ngram_dim} buckets"
        index = ChunkIndex.create(out, dim=embed.dim, chunk_size=args.chunk_size, kind=args.kind,
                                  metric=args.metric, nlist=args.nlist, nprobe=args.nprobe, embedder=embed.meta)
    else:
        model, name = _encoder(args, tok_meta["vocab_size"])
        embed = EncoderEmbedder(model, pool=args.pool)
        index = ChunkIndex.create(out, dim=embed.dim, chunk_size=args.chunk_size, kind=args.kind,
                                  metric=args.metric, nlist=args.nlist, nprobe=args.nprobe, encoder="encoder",
                                  pool=args.pool)
        save_model(model, out / "encoder")  # queries are embedded with the same frozen encoder
    index.meta.update(tok_meta)  # which tokens the chunks hold: checked by train/generate --index
    n = index.add(tokens, embed)
    return dict(out=str(Path(args.out)), files=n_files, tokens=int(len(tokens)), chunks=n, dim=embed.dim,
                kind=args.kind, metric=args.metric, encoder=name, seconds=round(time.perf_counter() - t0, 2))


def run_info(args) -> int:
    from llmarch.retrieval import ChunkIndex

    meta = ChunkIndex.load(args.index).meta
    if args.json:
        emit_json(meta)
    else:
        print(table([[k, v] for k, v in meta.items()], ["field", "value"]))
    return 0


def run_query(args) -> int:
    """Embed the text like the chunks (cut into chunks, vectors averaged), print the ``k`` nearest chunks."""
    import numpy as np

    from llmarch.retrieval import ChunkIndex, embedder_for
    from llmarch.train.retrieving import BYTES, check_index_tokenizer

    if args.k < 1:
        raise ValueError(f"-k: must be >= 1, got {args.k}")
    index = ChunkIndex.load(args.index)
    m, pad = index.chunk_size, index.meta.get("pad_id", 0)
    if index.meta.get("tokenizer", BYTES) == BYTES:
        ids, decode = list(args.text.encode()), lambda t: bytes(t).decode("utf-8", errors="replace")
    elif args.tokenizer is None:
        raise ValueError(f"{args.index}: the index was built with a tokenizer (not bytes); pass it with --tokenizer")
    else:
        from llmarch.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        check_index_tokenizer(index, tok)
        ids, decode = tok.encode(args.text), tok.decode
    if not ids:
        raise ValueError("text: the query is empty")
    chunks = np.full((-(-len(ids) // m), m), pad, dtype=np.int64)  # [N, m], the last one padded
    chunks.reshape(-1)[:len(ids)] = ids
    vec = np.asarray(embedder_for(index)(chunks), dtype=np.float32).mean(0, keepdims=True)
    vec /= max(float(np.linalg.norm(vec)), 1e-12)
    found, scores = index.search(vec, min(args.k, len(index)))
    rows = [dict(rank=r + 1, chunk=int(i), score=round(float(sc), 4),
                 text=decode([int(t) for t in index.neighbours(np.array([i]))[0, :m] if t != pad]))
            for r, (i, sc) in enumerate(zip(found[0], scores[0])) if i >= 0]
    if args.json:
        emit_json(rows)
    else:
        print(table([[r["rank"], r["chunk"], r["score"], " ".join(r["text"].split())[:100]] for r in rows],
                    ["rank", "chunk", "score", "text"]))
    return 0
