"""BPE trained and run by Hugging Face ``tokenizers``: byte-level (``bbpe``, Radford et al. 2019, GPT-2: the 256
bytes are the base units, so any text round-trips) or character-level (``bpe``, Sennrich et al. 2016: the
characters seen in training are the base units, words are split at spaces, an unseen character becomes ``<unk>``).

:func:`train_tokenizer` learns merges from text; :func:`load_tokenizer` reads any ``tokenizer.json`` (ours or a
Hugging Face one). Special tokens are found by their text, so roles (bos, eos, pad, mask, sep, cls, span
sentinels) work for tokenizers we did not train when they use the usual spellings.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# our specials, in id order; span corruption adds sentinels after them
BASE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>", "<sep>", "<cls>")
# role -> accepted spellings, first match wins (ours first, then common Hugging Face spellings)
ROLE_SPELLINGS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "mask": ("<mask>", "[MASK]"),
    "sep": ("<sep>", "[SEP]", "</s>"),
    "cls": ("<cls>", "[CLS]", "<s>"),
}


def sentinel(i: int) -> str:
    """Text of the i-th span-corruption sentinel (T5 spelling)."""
    return f"<extra_id_{i}>"


def default_specials(n_sentinels: int = 32) -> list[str]:
    return list(BASE_SPECIALS) + [sentinel(i) for i in range(n_sentinels)]


class Tokenizer:
    """A thin wrapper of a ``tokenizers.Tokenizer``: text <-> ids, special-token roles, save, a content hash."""

    def __init__(self, inner: _HFTokenizer):
        self.inner = inner
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)
        self._ids = {role: self._first_id(spellings) for role, spellings in ROLE_SPELLINGS.items()}
        sentinels = []
        while (sid := inner.token_to_id(sentinel(len(sentinels)))) is not None:
            sentinels.append(sid)
        self.sentinel_ids: list[int] = sentinels
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in inner.get_added_tokens_decoder().items() if t.special)

    def _first_id(self, spellings: Iterable[str]) -> int | None:
        for s in spellings:
            i = self.inner.token_to_id(s)
            if i is not None:
                return i
        return None

    # --- roles ----------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def mask_id(self) -> int | None:
        return self._ids["mask"]

    @property
    def sep_id(self) -> int | None:
        return self._ids["sep"]

    @property
    def cls_id(self) -> int | None:
        return self._ids["cls"]

    def require(self, role: str) -> int:
        """The id of a special-token role, or a ValueError saying which spellings were looked for."""
        i = self._ids.get(role)
        if i is None:
            raise ValueError(f"tokenizer has no {role} token (looked for {list(ROLE_SPELLINGS[role])}); train one "
                             "with llmarch (it adds them) or add it to tokenizer.json")
        return i

    # --- text <-> ids ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- files ----------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.inner.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a file name), atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / TOKENIZER_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    def content_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={len(self.special_ids)})"


TOKENIZER_KINDS = ("bbpe", "bpe")
UNK = "<unk>"


def train_tokenizer(texts: Iterable[str] | Iterator[str], vocab_size: int,
                    special_tokens: list[str] | None = None, min_frequency: int = 2, kind: str = "bbpe",
                    max_alphabet: int = 1000) -> Tokenizer:
    """Learn a BPE of ``vocab_size`` tokens (specials included) from an iterator of texts; specials get the first
    ids. ``kind`` "bbpe": byte-level, every string round-trips. "bpe": character-level over at most
    ``max_alphabet`` characters, spaces kept as a word-initial ``▁`` marker, other characters -> ``<unk>``."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is unknown; choose one of {list(TOKENIZER_KINDS)}")
    specials = default_specials() if special_tokens is None else list(special_tokens)
    if kind == "bbpe":
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                             f"{len(specials)} special tokens; use at least {256 + len(specials)}")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        specials = specials if UNK in specials else specials + [UNK]
        tok = _HFTokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      limit_alphabet=max_alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Tokenizer(tok)
    log.info("trained %s BPE: %d tokens (%d special)", "byte-level" if kind == "bbpe" else "character-level",
             out.vocab_size, len(specials))
    return out


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` file (or a directory holding one), ours or from Hugging Face."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}; expected a Hugging Face tokenizer.json")
    try:
        return Tokenizer(_HFTokenizer.from_file(str(file)))
    except Exception as e:  # the Rust parser's message, but naming the file
        raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None


def load_tokenizer_for(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved with a model or training checkpoint (``DIR/tokenizer.json``)."""
    return load_tokenizer(Path(checkpoint_dir) / TOKENIZER_FILE)


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt text -> ids, the one encode path of ``generate``, ``chat`` and the Python API: what transformers'
    tokenizer gives for the same files with ``add_special_tokens=True``, i.e. the BOS/EOS of tokenizer.json's
    post-processor. (transformers >= 5 ignores ``add_bos_token`` / ``add_eos_token`` of tokenizer_config.json
    when a tokenizer.json exists: ``PreTrainedTokenizerBase._from_pretrained`` drops them.) Any other tokenizer
    object (``encode``, optional ``bos_id``) gets its BOS in front."""
    if not isinstance(text, str):
        raise ValueError(f"prompt: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise ValueError(f"prompt: not valid UTF-8 text (position {e.start}); pass UTF-8 encoded text") from None
    if isinstance(tok, Tokenizer):
        return tok.inner.encode(text, add_special_tokens=True).ids
    bos = getattr(tok, "bos_id", None)
    return ([bos] if bos is not None else []) + list(tok.encode(text))


__all__ = ["Tokenizer", "train_tokenizer", "load_tokenizer", "load_tokenizer_for", "default_specials", "sentinel",
           "encode_prompt"]
