"""An lm-evaluation-harness (Gao et al. 2021, EleutherAI ``lm_eval``) model backed by an llmarch model, registered
as model name ``"llmarch"``: ``lm_eval.simple_evaluate(model="llmarch", model_args="checkpoint=DIR", tasks=[...])``
once this module is imported (``llmarch eval --tasks`` imports it). Needs the optional extra ``llmarch[eval]``.

Scoring follows the harness's own Hugging Face backend: contexts and continuations are encoded together and split
(trailing spaces move to the continuation), an empty context is the prefix token (bos, else eos), inputs are cut
from the left to the model's context, and rolling log-likelihoods use windows that predict every token once.
"""
from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llmarch.eval.perplexity import Window, check_causal, prefix_token, rolling_windows, score_windows


@register_model("llmarch")
class LlmarchLM(TemplateLM):
    """``checkpoint``: a training run (its newest good checkpoint), an llmarch checkpoint or a Hugging Face
    directory with its tokenizer; or pass ``model`` and ``tokenizer`` objects directly."""

    def __init__(self, checkpoint: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None, **_: object):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("checkpoint: give model_args='checkpoint=DIR' (a run, checkpoint or HF directory)")
            from llmarch.checkpoint import load_model
            from llmarch.tokenizer import load_tokenizer_for
            from llmarch.train.checkpoints import resolve_model_dir

            path = resolve_model_dir(checkpoint)
            model, tokenizer = load_model(path), load_tokenizer_for(path)
        if tokenizer is None:
            raise ValueError("tokenizer: pass the model's tokenizer with the model")
        check_causal(model)
        self.model = model.to(device or "cpu").eval()
        self.tokenizer = tokenizer
        self.batch_size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.max_length = min(int(max_length or model.config.max_seq_len), model.config.max_seq_len)

    # --- tokens -----------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return prefix_token(self.tokenizer) if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- scoring ----------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (log P(continuation | context), whether
        greedy decoding would produce exactly the continuation)."""
        windows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: the continuation encodes to no tokens")
            ids = (list(ctx) + list(cont))[-(self.max_length + 1):][:-1]  # inputs cut from the left
            windows.append(Window(i, ids, list(cont)[-len(ids):]))
        return [(float(lp.sum()), greedy) for lp, greedy in score_windows(self.model, windows, self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string (perplexity tasks), from windows of the model's context."""
        windows, counts = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            w = rolling_windows(i, self.tok_encode(text), self.prefix_token_id, self.max_length)
            windows += w
            counts.append(len(w))
        scores = score_windows(self.model, windows, self.batch_size)
        out, k = [], 0
        for n in counts:
            out.append(float(sum(lp.sum() for lp, _ in scores[k:k + n])))
            k += n
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut at the first ``until`` string or eos."""
        from llmarch.infer.generate import generate

        out = []
        for req in requests:
            context, kw = req.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kw.get("max_gen_toks", 256))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            room = max(self.max_length - new, 1)
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            gen = generate(self.model, torch.tensor([ids]), max_new_tokens=min(new, self.max_length - len(ids)),
                           temperature=temperature, eos_token_id=self.tokenizer.eos_id,
                           stop_strings=until or None, decode=self.tok_decode, seed=0)
            toks = gen[0, len(ids):].tolist()
            if self.tokenizer.eos_id in toks:
                toks = toks[:toks.index(self.tokenizer.eos_id)]
            text = self.tok_decode(toks)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


__all__ = ["LlmarchLM"]
