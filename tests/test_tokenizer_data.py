"""Tokenizer (byte-level BPE through HF tokenizers) and data (corpus, split, token cache, packing)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from llmarch import data
from llmarch.tokenizer import default_specials, load_tokenizer, load_tokenizer_for, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    root, files = data.stdlib_files()
    return root, data.take_bytes(files, 200_000)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(data.read_texts(corpus[1]), vocab_size=600)


def random_texts(seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:  # every byte value, as a latin-1 string
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))).decode("latin-1"))
        elif kind == 1:  # arbitrary code points (no lone surrogates: they are not valid text)
            cps = [rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)])
                   for _ in range(rng.randrange(1, 40))]
            out.append("".join(map(chr, cps)))
        else:  # whitespace runs, control characters, special-token spellings, emoji
            out.append(rng.choice(["  \t\n\r\x00\x0b", "<eos><pad>", "def f():\n\treturn 1", "🙂👍🏽", " ", "\u2028x"])
                       * rng.randrange(1, 4))
    return out


def test_round_trip_arbitrary_text(tok):
    for text in random_texts(0):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_specials_and_vocab(tok):
    specials = default_specials()
    assert tok.vocab_size == 600
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3]
    assert len(tok.sentinel_ids) == len(specials) - 6
    assert tok.special_ids == frozenset(range(len(specials)))
    assert tok.encode("<eos>") == [tok.eos_id]  # specials are matched as whole tokens
    assert len(tok.encode("    return self")) < len("    return self")  # merges were learnt


def test_save_load_and_hf_file(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer_for(tmp_path)
    assert again.content_hash() == tok.content_hash()
    assert again.encode("import os\n") == tok.encode("import os\n")
    # a tokenizer.json written by someone else, with other spellings of the special tokens
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<s>", "</s>", "[MASK]"])
    hf.save(str(tmp_path / "other.json"))
    other = load_tokenizer(tmp_path / "other.json")
    assert (other.bos_id, other.eos_id, other.mask_id, other.pad_id) == (0, 1, 2, None)
    with pytest.raises(ValueError, match="no pad token"):
        other.require("pad")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_split_is_deterministic_and_by_file(corpus):
    root, files = corpus
    a_train, a_val = data.split_files(root, files, 0.2)
    b_train, b_val = data.split_files(root, list(reversed(files)), 0.2)
    assert sorted(a_val) == sorted(b_val) and a_val
    assert not set(a_train) & set(a_val) and set(a_train) | set(a_val) == set(files)
    # adding files never moves an existing file to the other split
    _, all_files = data.stdlib_files()
    _, more_val = data.split_files(root, data.take_bytes(all_files, 400_000), 0.2)
    assert set(a_val) <= set(more_val)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_files(root, files, 1.5)


def test_corpus_sources(tmp_path):
    root, files = data.corpus_files(None)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files) and len(files) > 100
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    assert [f.name for f in data.corpus_files(tmp_path)[1]] == ["a.txt", "b.md"]
    assert [f.name for f in data.corpus_files(str(tmp_path / "**" / "*.md"))[1]] == ["b.md"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.corpus_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="matched no files"):
        data.corpus_files(str(tmp_path / "*.rst"))


def test_token_cache_and_packing(corpus, tok, tmp_path):
    root, files = corpus
    train, val = data.split_files(root, files, 0.2)
    splits = data.tokenize_corpus(train, val, tok, tmp_path)
    assert isinstance(splits.train, np.memmap) and splits.train.dtype == np.uint16
    texts = data.read_texts(train)
    expected = [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    assert splits.train.tolist() == expected  # documents back to back, eos-separated
    stamp = (splits.directory / "train.bin").stat().st_mtime_ns
    again = data.tokenize_corpus(train, val, tok, tmp_path)  # second call reads the cache
    assert (again.directory / "train.bin").stat().st_mtime_ns == stamp and again.directory == splits.directory

    seqs = data.PackedSequences(splits.train, 33, seed=1)
    batch = seqs.batch(0, seqs.n)  # one epoch: every chunk exactly once, shuffled
    assert batch.shape == (seqs.n, 33)
    flat = np.asarray(splits.train[:seqs.n * 33]).reshape(seqs.n, 33)
    assert sorted(map(tuple, batch.tolist())) == sorted(map(tuple, flat.tolist()))
    assert not np.array_equal(batch.numpy(), flat)
    assert np.array_equal(seqs.batch(5, 3).numpy(), batch[5:8].numpy())  # a position is a sample count
    assert not np.array_equal(seqs.batch(seqs.n, 4).numpy(), batch[:4].numpy())  # next epoch, new order
    with pytest.raises(ValueError, match="fewer than one sequence"):
        data.PackedSequences(splits.val[:10], 33)


def test_character_level_bpe_beside_byte_level():
    """bpe: base units are the characters seen (unseen -> <unk>, spaces kept); bbpe: bytes, everything round-trips."""
    from llmarch.tokenizer import UNK, train_tokenizer

    texts = ["the cat sat on the mat\n  indented line\n"] * 30 + ["a dog ran far away\n"] * 30
    char = train_tokenizer(iter(texts), 120, kind="bpe")
    byte = train_tokenizer(iter(texts), 400, kind="bbpe")
    seen = "the dog sat far away\n  on the mat"
    assert char.decode(char.encode(seen)) == seen and byte.decode(byte.encode(seen)) == seen
    unseen = "zq ü"  # none of these characters is in the training text
    unk = char.inner.token_to_id(UNK)
    assert char.encode(unseen).count(unk) == 3 and char.decode(char.encode(unseen)) != unseen
    assert byte.decode(byte.encode(unseen)) == unseen
    assert all(len(char.inner.id_to_token(i)) >= 1 for i in range(char.vocab_size))
    assert char.inner.token_to_id("t") is not None and byte.inner.token_to_id("t") is not None
    with pytest.raises(ValueError, match="tokenizer kind"):
        train_tokenizer(iter(texts), 120, kind="wordpiece")
    from tests.train_util import settings

    with pytest.raises(ValueError, match="tokenizer_kind"):
        settings("out", "cache", tokenizer_kind="char")
