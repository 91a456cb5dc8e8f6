"""KIVI quantization: bytes, reconstruction error and speed, on random or real keys/values.

    python bench/bench_quant.py                          # random K/V with outlier key channels
    python bench/bench_quant.py --model smollm2-135m     # real K/V of every layer on 1024 tokens of text

Prints, per bit width, the bytes relative to float16, the relative error of keys quantized per channel
(KIVI: the keys as the model rotated them), per channel before RoPE (KVQuant: un-rotated from their
positions, quantized, rotated back; what ``haq``/``quant`` store with ``rope=pre``), and per token (the naive
way), of values per token, and quantize + dequantize time. Random keys are rotated with Llama's frequencies
(base 10000) so that the two per-channel columns compare the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvlab.quant import dequantize, quantize, quantize_keys, quantize_values
from kvlab.storage import Rotary


def random_kv(tokens: int, seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Rotary]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 3, tokens, 64, generator=g)
    k[..., :4] += 8.0 * torch.randn(4, generator=g)  # fixed-offset outlier channels, as in real keys before RoPE
    rotary = Rotary(1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64))
    return [(rotary.shift_range(k, 0), torch.randn(1, 3, tokens, 64, generator=g))], rotary


def real_kv(name: str, tokens: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Rotary]:
    from kvlab.heads.probes import encode, haystack_text
    from kvlab.models import load

    model, tokenizer = load(name, device="cpu", dtype="float32")
    ids = torch.tensor([encode(tokenizer, haystack_text()[:12 * tokens])[:tokens]])
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    rotary = Rotary(model.model.rotary_emb.inv_freq)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers], rotary


def pre_rope_err(k: torch.Tensor, rotary: Rotary, bits: int, gs: int) -> float:
    """Keys ``(B, H, T, D)`` at positions ``0..T-1`` un-rotated, quantized per channel, rotated back."""
    pre = rotary.shift_range(k, 0, sign=-1, dtype=torch.float32)
    return rel_err(k, rotary.shift_range(dequantize(quantize_keys(pre, bits, gs)), 0))


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / x.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="take K/V from this model (alias or folder)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kv, rotary = real_kv(args.model, args.tokens) if args.model else random_kv(args.tokens, seed=0)
    gs = args.group_size
    print(f"{'bits':>4} {'bytes/fp16':>10} {'K per-chan':>10} {'K pre-RoPE':>10} {'K per-tok':>10} {'V per-tok':>10} "
          f"{'q+dq ms':>8}")
    for bits in (2, 4, 8):
        qbytes = fbytes = 0
        errs: dict[str, list[float]] = {"kc": [], "kp": [], "kt": [], "vt": []}
        for k, v in kv:
            qk, qv = quantize_keys(k, bits, gs), quantize_values(v, bits, gs)
            qbytes += qk.nbytes() + qv.nbytes()
            fbytes += 2 * (k.numel() + v.numel())
            errs["kc"].append(rel_err(k, dequantize(qk)))
            errs["kp"].append(pre_rope_err(k, rotary, bits, gs))
            errs["kt"].append(rel_err(k, dequantize(quantize(k, bits, axis=3, group_size=min(gs, k.shape[-1])))))
            errs["vt"].append(rel_err(v, dequantize(qv)))
        k, v = kv[0]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            dequantize(quantize_keys(k, bits, gs))
            dequantize(quantize_values(v, bits, gs))
            times.append(time.perf_counter() - start)
        mean = {key: statistics.mean(vals) for key, vals in errs.items()}
        print(f"{bits:>4} {qbytes / fbytes:>10.3f} {mean['kc']:>10.4f} {mean['kp']:>10.4f} {mean['kt']:>10.4f} "
              f"{mean['vt']:>10.4f} "
              f"{1e3 * statistics.median(times):>8.1f}")
    print(f"({len(kv)} layer(s) of K/V {tuple(kv[0][0].shape)}, group size {gs}, {args.threads} thread(s); "
          f"errors are ||x - x_hat|| / ||x||; time: median for one layer)")


if __name__ == "__main__":
    main()
