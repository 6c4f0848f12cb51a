"""The files that travel with a model's weights so that a converted (or quantized) copy generates text at once: the
tokenizer in every form transformers writes it, and ``generation_config.json``. ``llmarch convert`` and
``llmarch.hf.save`` copy them from the source directory; nothing else in it is touched."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# tokenizer files of Hugging Face tokenizers (fast, BPE vocab/merges, WordPiece vocab, SentencePiece models), the
# chat template transformers >= 4.43 writes beside them, and the generation defaults
CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
           "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
           "chat_template.jinja", "chat_template.json", "generation_config.json")


def carry_model_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the :data:`CARRIED` files that ``src`` has into ``dst`` (each written to a temporary name, then renamed
    into place); returns their names. Weights and config are not among them."""
    src, dst = Path(src), Path(dst)
    copied = []
    if src.resolve() == dst.resolve():
        return copied
    for name in CARRIED:
        f = src / name
        if f.is_file() and not f.is_symlink():
            tmp = dst / f".{name}.{os.getpid()}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, dst / name)
            copied.append(name)
    if copied:
        log.info("carried %s from %s", ", ".join(copied), src)
    return copied


def write_tokenizer_config(dst: str | os.PathLike) -> bool:
    """Give a ``tokenizer.json`` without a ``tokenizer_config.json`` (an llmarch-trained tokenizer) the minimal
    config transformers' ``AutoTokenizer`` needs: the fast tokenizer class and its special tokens by role. Returns
    whether one was written."""
    from llmarch.tokenizer import load_tokenizer

    dst = Path(dst)
    if not (dst / "tokenizer.json").is_file() or (dst / "tokenizer_config.json").exists():
        return False
    tok = load_tokenizer(dst)
    roles = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id, "mask_token": tok.mask_id,
             "sep_token": tok.sep_id, "cls_token": tok.cls_id}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **{role: tok.inner.id_to_token(i) for role, i in roles.items() if i is not None}}
    tmp = dst / ".tokenizer_config.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2) + "\n")
    os.replace(tmp, dst / "tokenizer_config.json")
    return True


__all__ = ["CARRIED", "carry_model_files", "write_tokenizer_config"]
