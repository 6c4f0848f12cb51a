"""Byte-level vs character-level BPE (seed 001 contrasts them) on the same corpus: vocabulary size, tokens per
byte of held-out text, unknown characters, exact round trips. Trained on standard-library modules, measured on
other modules (split by file) plus a line of non-ASCII text the training files lack.

    PYTHONPATH=src python benchmarks/tokenizer_kinds.py [--vocab 4000] [--train-files 120] [--held-out-files 40]

Writes benchmarks/results/tokenizer_kinds.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from llmarch import data  # noqa: E402
from llmarch.tokenizer import TOKENIZER_KINDS, UNK, train_tokenizer  # noqa: E402

FOREIGN = "naïve café — 東京 ünïcödé ✓ λx. x"  # characters rare or absent in the stdlib sources


def measure(kind: str, vocab: int, train: list[str], held: list[str]) -> dict:
    t0 = time.perf_counter()
    tok = train_tokenizer(iter(train), vocab, kind=kind)
    seconds = time.perf_counter() - t0
    ids = [tok.encode(h) for h in held]
    unk = tok.inner.token_to_id(UNK)
    return dict(kind=kind, vocab=tok.vocab_size, train_seconds=round(seconds, 2),
                tokens_per_byte=sum(map(len, ids)) / sum(len(h.encode()) for h in held),
                unknown_tokens=0 if unk is None else sum(i.count(unk) for i in ids),
                round_trips=sum(tok.decode(i) == h for i, h in zip(ids, held)), texts=len(held),
                foreign_round_trip=tok.decode(tok.encode(FOREIGN)) == FOREIGN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--train-files", type=int, default=120)
    ap.add_argument("--held-out-files", type=int, default=40)
    args = ap.parse_args()
    _, files = data.corpus_files(None)
    train = list(data.read_texts(files[: args.train_files]))
    held = list(data.read_texts(files[args.train_files: args.train_files + args.held_out_files])) + [FOREIGN]
    rows = [measure(kind, args.vocab, train, held) for kind in TOKENIZER_KINDS]
    print_table([[r["kind"], r["vocab"], f"{r['tokens_per_byte']:.4f}", r["unknown_tokens"],
                  f"{r['round_trips']}/{r['texts']}", r["foreign_round_trip"], r["train_seconds"]] for r in rows],
                ["kind", "vocab", "tokens/byte", "unk tokens", "round trips", "non-ASCII line", "train s"])
    print(write_results("tokenizer_kinds", dict(settings=vars(args), rows=rows)))


if __name__ == "__main__":
    main()
