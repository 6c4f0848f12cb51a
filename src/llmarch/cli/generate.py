"""`llmarch generate`: sample text from a checkpoint (or token ids from a preset with random weights), printing
tokens as they come."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from llmarch.cli.common import add_dtype_arg, load_for_inference

if TYPE_CHECKING:
    import torch


def add(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a training run / model directory (llmarch or HF)")
    src.add_argument("--preset", metavar="NAME", help="a preset with random weights (prompt = token ids)")
    p.add_argument("--prompt", default="", help="prompt text (token ids separated by spaces with --preset)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--cache", choices=["auto", "dynamic", "static"], default="auto",
                   help="KV cache: static where the model supports it (auto), else dynamic")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (static cache; on a CPU "
                   "where llmarch's native decode layers run, eager decoding is faster)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_arg(p)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user turn in the checkpoint's chat "
                   "template (as `chat` does) and stop at the end of the reply")
    p.add_argument("--index", metavar="DIR", help="RETRO: retrieve neighbours from this chunk index (built with "
                   "the checkpoint's tokenizer) as each chunk completes; no streaming")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for a vision-language model (repeatable; its image tokens lead the prompt)")
    p.add_argument("--style", type=int, default=None, metavar="ID",
                   help="the condition id of a conditioned model (config.condition)")
    p.add_argument("--instruction", default=None, metavar="TEXT", help="the instruction of a conditioned model "
                   "with an instruction encoder (condition.instruction_layers; token ids with --preset)")
    p.set_defaults(func=run)


def cache_for(model, choice: str) -> str:
    """``auto``: the static (compilable) cache for decoders with multi-head attention, else the growing one (also
    for RETRO without ``--index``: its base decoder, neighbours None)."""
    cfg = model.config
    if choice == "static" and cfg.retrieval is not None:
        raise ValueError("--cache static: a RETRO model decodes with the dynamic cache (or --index); use --cache auto")
    if choice != "auto":
        return choice
    static = cfg.kind == "decoder" and cfg.mixers == ("attention",) and cfg.retrieval is None
    return "static" if static else "dynamic"


def token_ids(flag: str, text: str) -> list[int]:
    """Token ids typed as numbers separated by spaces (--preset models have no tokenizer)."""
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        raise ValueError(f"{flag}: with --preset the {flag[2:]} is token ids separated by spaces, got "
                         f"{text!r}") from None


def instruction_ids(ids: list[int]) -> torch.Tensor:
    import torch

    if not ids:
        raise ValueError("--instruction: the instruction is empty; give some text (token ids with --preset)")
    return torch.tensor([ids])


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args) -> int:
    import torch

    import llmarch
    from llmarch.infer.chat import TextStream

    torch.manual_seed(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, compile=args.compile)
    if args.style is not None:
        kw["style"] = args.style
    conditioned = args.style is not None or args.instruction is not None  # the condition enters the forward
    if args.preset:
        if args.index:
            raise ValueError("--index needs --checkpoint (a trained RETRO run and the tokenizer its index was built "
                             "with), not --preset")
        model = llmarch.build(llmarch.preset(args.preset)).eval()
        model = model.to(torch.bfloat16) if args.dtype == "bf16" else model
        kw["cache"] = "dynamic" if conditioned else cache_for(model, args.cache)
        ids = token_ids("--prompt", args.prompt) or [0]
        if args.instruction is not None:
            kw["instruction"] = instruction_ids(token_ids("--instruction", args.instruction))
        if args.image:
            from llmarch.infer.images import image_prompt, processor_for

            ids, images = image_prompt(model, ids, args.image, processor_for(model))
            kw.update(images, cache="dynamic")
        _emit(" ".join(str(t) for t in ids))
        stream = None if args.no_stream else (lambda tok: _emit(f" {int(tok[0])}"))
        out = llmarch.generate(model, torch.tensor([ids]), streamer=stream, **kw)
        _emit("\n" if stream else "".join(f" {t}" for t in out[0, len(ids):].tolist()) + "\n")
        return 0

    from llmarch.tokenizer import encode_prompt, load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    path = resolve_model_dir(args.checkpoint)  # a model directory, or a training run's newest good checkpoint
    model = load_for_inference(path, args.dtype)
    tok = load_tokenizer_for(path)
    kw["cache"] = "dynamic" if conditioned else cache_for(model, args.cache)
    if args.instruction is not None:
        kw["instruction"] = instruction_ids(tok.encode(args.instruction))
    # the tokenizer's own BOS/EOS rule, as transformers applies it; an empty prompt starts from BOS (else EOS)
    ids = encode_prompt(tok, args.prompt) or [t for t in (tok.bos_id, tok.eos_id) if t is not None][:1]
    eos, more_stops = tok.eos_id, None
    if args.chat:  # the template's prompt; a reply ends at an end-of-turn token
        ids, _ = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        eos, *rest = tok.end_of_turn_ids
        more_stops = [[i] for i in rest]
    if args.index:
        return _retro(args, model, tok, ids)
    if args.image:
        from llmarch.infer.images import image_prompt, processor_for

        ids, images = image_prompt(model, ids, args.image, processor_for(model, path), tok.bos_id)
        kw.update(images, cache="dynamic")  # images enter through the model's forward
    stops = tuple(args.stop)
    stream = None if args.no_stream else TextStream(tok.decode, _emit, stops)
    seq2seq = model.config.kind == "encoder_decoder"
    if not seq2seq and not args.chat:  # a decoder continues the prompt; an encoder-decoder answers it
        _emit(args.prompt)
    out = llmarch.generate(model, torch.tensor([ids]), eos_token_id=eos, stop_sequences=more_stops,
                           stop_strings=stops or None, decode=tok.decode, streamer=stream, **kw)
    # an encoder-decoder returns its start token and the new tokens (the prompt went through the encoder)
    new = out[0, 1 if seq2seq else len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    text = tok.decode(new)
    for s in stops:
        text = text.split(s)[0]
    if stream is not None:
        stream.finish(text)
        _emit("\n")
    else:
        _emit(text + "\n")
    return 0


def _retro(args, model, tok, ids: list[int]) -> int:
    """``--index``: RETRO generation that retrieves once per completed chunk (recomputes each step, no cache)."""
    import torch

    from llmarch.retrieval import retro_generate
    from llmarch.train.retrieving import load_index

    if args.min_p is not None or args.repetition_penalty != 1.0 or args.stop:
        raise ValueError("--index: RETRO generation takes --temperature and --top-k/--top-p only; drop --min-p, "
                         "--repetition-penalty and --stop")
    index, embed = load_index(args.index, model.config, tok)
    out = retro_generate(model, torch.tensor([ids]), index, embed, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_id,
                         generator=torch.Generator().manual_seed(args.seed))
    new = out[0, len(ids):].tolist()
    if tok.eos_id is not None and tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    _emit(args.prompt + tok.decode(new) + "\n")
    return 0
