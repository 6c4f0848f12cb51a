"""Preparing a run's inputs: the corpus split, the tokenizer (trained once per corpus and size, cached) and the
token cache. Rank 0 does the work; the other ranks wait at a barrier and read the results."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llmarch import data
from llmarch.config import ModelConfig
from llmarch.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer
from llmarch.train.distributed import DistEnv, barrier
from llmarch.train.settings import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    tokenizer: Tokenizer
    splits: data.TokenSplits
    n_train_files: int
    n_val_files: int


def cache_dir_for(tc: TrainConfig) -> Path:
    return Path(tc.cache_dir) if tc.cache_dir else data.default_cache_dir()


def prepare(tc: TrainConfig, model_cfg: ModelConfig, env: DistEnv, resume_from: Path | None) -> Prepared:
    """Corpus -> split -> tokenizer -> cached token arrays, identical on every rank."""
    root, files = data.corpus_files(tc.data)
    max_bytes = None if tc.max_data_mb is None else int(tc.max_data_mb * 1e6)
    files = data.take_bytes(files, max_bytes)
    train_files, val_files = data.split_files(root, files, tc.val_fraction)
    cache = cache_dir_for(tc)
    source = "the Python standard library" if tc.data is None else tc.data
    if env.is_main:
        log.info("corpus: %s, %d files (%d train / %d validation)", source, len(files), len(train_files),
                 len(val_files))
    if resume_from is not None:  # the run's own tokenizer, whatever the settings say now
        tok_file = resume_from / TOKENIZER_FILE
    elif tc.tokenizer is not None:
        tok_file = Path(tc.tokenizer)
    else:
        vocab = tc.vocab_size or model_cfg.vocab_size
        kind = tc.tokenizer_kind
        tok_file = cache / f"tokenizer-{data.files_key(train_files)}-{vocab}{'' if kind == 'bbpe' else '-' + kind}.json"
        if env.is_main and not tok_file.is_file():
            log.info("training a %s BPE tokenizer (vocab %d) on %d files ...", kind, vocab, len(train_files))
            tok_file.parent.mkdir(parents=True, exist_ok=True)
            train_tokenizer(iter(data.read_texts(train_files)), vocab, kind=kind).save(tok_file)
        barrier(env)
    tok = load_tokenizer(tok_file)
    if env.is_main:
        tok.save(Path(tc.out) / TOKENIZER_FILE)
        splits = data.tokenize_corpus(train_files, val_files, tok, cache)
    barrier(env)
    if not env.is_main:
        splits = data.tokenize_corpus(train_files, val_files, tok, cache)  # reads rank 0's cache
    return Prepared(tok, splits, len(train_files), len(val_files))


def fit_model_config(cfg: ModelConfig, tok: Tokenizer, tc: TrainConfig) -> tuple[ModelConfig, list[str]]:
    """The model config with the vocabulary size and special-token ids of the tokenizer, and what changed."""
    roles = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    changes = {"vocab_size": tok.vocab_size, **roles}
    start = cfg.decoder_start_token_id
    if start is not None:  # keep its role: the config's pad (T5, Marian) or bos/eos id becomes the tokenizer's
        role = next((k for k in roles if getattr(cfg, k) == start and roles[k] is not None), None)
        if role is not None:
            changes["decoder_start_token_id"] = roles[role]
        elif start >= tok.vocab_size:
            raise ValueError(f"decoder_start_token_id: {start} is outside the tokenizer's vocabulary "
                             f"({tok.vocab_size}); set it with --set decoder_start_token_id=N")
    notes = [f"{k}: {getattr(cfg, k)} -> {v} (from the tokenizer)" for k, v in changes.items()
             if getattr(cfg, k) != v]
    # learned position tables are read at position_offset .. position_offset + seq_len - 1 (RoBERTa's offset)
    longest = tc.seq_len + (cfg.position_offset if cfg.position == "learned" else 0)
    if longest > cfg.max_seq_len:
        offset = f" + position_offset {cfg.position_offset}" if longest != tc.seq_len else ""
        raise ValueError(f"seq_len: {tc.seq_len}{offset} is longer than the model's max_seq_len {cfg.max_seq_len}; "
                         "lower --seq-len or raise max_seq_len (--set max_seq_len=N)")
    return cfg.replace(**changes), notes


__all__ = ["prepare", "fit_model_config", "Prepared", "cache_dir_for"]
