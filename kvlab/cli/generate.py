"""``kvlab generate``: bounded-memory generation, tokens streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from kvlab.cli.common import add_method_arg, add_model_args, load_model, methods_of
from kvlab.errors import KvlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a compressed KV cache (streams tokens)")
    add_model_args(p)
    add_method_arg(p, "streaming:sinks=4,window=1020", extra="; several generate one after another")
    p.add_argument("--prompt", required=True, help="the prompt text, or - to read it from standard input")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from kvlab.cache import make_cache

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise KvlabError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise KvlabError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise KvlabError(f"--temperature must be >= 0, got {args.temperature}")
    specs = methods_of(args)
    model, tok = load_model(args)
    if not args.raw and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(model.device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    for spec in specs:
        if len(specs) > 1:
            print(f"\n== {spec}", file=sys.stderr, flush=True)
        cache = make_cache(model, spec)
        torch.manual_seed(args.seed)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=args.max_new_tokens, streamer=streamer,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id, **sampling)
        new = out.shape[1] - ids.shape[1]
        print(f"[{new} tokens; KV cache {cache.nbytes() / 2**20:.2f} MiB now, peak {cache.peak_nbytes / 2**20:.2f} MiB, "
              f"full cache would hold {cache.full_nbytes() / 2**20:.2f} MiB]", file=sys.stderr)
    return 0
