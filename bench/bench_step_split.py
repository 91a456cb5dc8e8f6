"""Where a decode step's time goes, by operator: the model's weights, attention, and everything else.

    python bench/bench_step_split.py [--model smollm2-135m] [--context 4096] [--methods "full;h2o:budget=1024"]
                                     [--profile p.json]

For each kvlab spec (``{p}``: ``--profile``, for ``head-aware`` and ``haq``): a fresh cache, ``--context`` tokens
of real text (pydoc) prefilled ``--chunk`` at a time and ``--warmup`` greedy decode steps. Then ``--rounds`` rounds:
in each, every spec takes one step timed without the profiler, then one step under torch's profiler (CPU activity),
so that the specs share the machine's state (``step_ms``: the median timed step). The profiled steps' self times
are split into (ms per step)

* ``weights_ms``: ``aten::mm``, the model's linear layers (a batch-1 step multiplies 2-D activations);
* ``attention_ms``: sdpa's kernels (``aten::*scaled_dot_product*``) and ``aten::bmm``, the two products of kvlab's
  explicit attention (query by keys, probabilities by values), where a scorer needs the probabilities;
* ``rest_ms``: the unprofiled step minus those two, everything else the step does, operators and Python alike (the
  profiler barely inflates the large operators subtracted, and inflates the small ones this leaves out);

with the ``--top`` other operators by self time (ms and calls per step). Differences to the first spec (usually
``full``) are computed here: what a method saves in attention and spends on the rest. Meant for a CPU: on a GPU the
profiler's CPU times are launch costs, not the kernels'. Prints tables; writes bench/results/step_split.json and .md
(``--out`` another stem).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from timing import greedy_step, run_meta, run_script, write

import kvlab
from kvlab.data import load_text, tokenize
from kvlab.errors import KvlabError
from kvlab.methods import build
from kvlab.spec import without_profile
from kvlab.stream import feed

OUT = Path(__file__).resolve().parent / "results"
METHODS = "full;haq:budget=1024,profile={p},bits=8/4/2,rope=post"


def is_weights(op: str) -> bool:
    return op == "aten::mm"


def is_attention(op: str) -> bool:
    return op == "aten::bmm" or "scaled_dot_product" in op


class Stepper:
    """A spec's cache after the prefill of ``ids (1, n)`` and ``warmup`` greedy steps; :meth:`step` takes one more."""

    def __init__(self, model, ids: torch.Tensor, spec: str, warmup: int, chunk: int):
        self.model, self.spec, self.context = model, spec, ids.shape[1]
        self.cache = kvlab.make_cache(model, spec)
        with torch.no_grad():
            self.token = feed(model, self.cache, ids, chunk).argmax(-1, keepdim=True)
        self.times: list[float] = []
        self.ops: dict[str, list[float]] = {}  # operator -> [self ms, calls], summed over the profiled steps
        self.profiled = 0
        for _ in range(warmup):
            self.step()

    def step(self) -> None:
        self.token = greedy_step(self.model, self.cache, self.token)

    def timed(self) -> None:
        t = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - t)

    def profiled_step(self) -> None:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.step()
        for e in prof.key_averages():
            acc = self.ops.setdefault(e.key, [0.0, 0.0])
            acc[0] += e.self_cpu_time_total / 1000
            acc[1] += e.count
        self.profiled += 1

    def row(self, top: int) -> dict:
        """The spec's figures: the median timed step, the profiled steps' mean split, the rest's ``top`` operators."""
        ops = [(op, ms / self.profiled, calls / self.profiled) for op, (ms, calls) in self.ops.items()]
        weights = sum(ms for op, ms, _ in ops if is_weights(op))
        attention = sum(ms for op, ms, _ in ops if is_attention(op))
        step_ms = 1000 * statistics.median(self.times)
        others = sorted((o for o in ops if not is_weights(o[0]) and not is_attention(o[0])), key=lambda o: -o[1])
        return {"method": self.spec, "context": self.context, "step_ms": round(step_ms, 2),
                "weights_ms": round(weights, 2), "attention_ms": round(attention, 2),
                "rest_ms": round(step_ms - weights - attention, 2), "profiled_ops_ms": round(sum(o[1] for o in ops), 2),
                "top": [{"op": op, "ms": round(ms, 3), "calls": round(calls, 1)} for op, ms, calls in others[:top]]}


def run(model, ids: torch.Tensor, specs: list[str], rounds: int, warmup: int, chunk: int, top: int) -> list[dict]:
    """Every spec's row. ``rounds`` rounds, in each of which every spec takes one timed step (round ``r`` starting
    with spec ``r``, in turn), then every spec one profiled step: the specs share the machine's state, as in
    ``bench_decode.py``."""
    steppers = [Stepper(model, ids, spec, warmup, chunk) for spec in specs]
    for r in range(rounds):
        for s in steppers[r % len(steppers):] + steppers[:r % len(steppers)]:  # none always first after the profiler
            s.timed()
        for s in steppers:
            s.profiled_step()
        gc.collect()  # the profiler's events, so that no timed step pays for collecting them
    return [s.row(top) for s in steppers]


def table(rows: list[dict]) -> str:
    """The split, each row beside the first; then each row's top other operators."""
    ref = rows[0]
    lines = ["| method | step ms | weights ms | attention ms | rest ms | attention saved | rest added |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{without_profile(r['method'])}` | {r['step_ms']:.2f} | {r['weights_ms']:.2f} | "
                     f"{r['attention_ms']:.2f} | {r['rest_ms']:.2f} | {ref['attention_ms'] - r['attention_ms']:.2f} | "
                     f"{r['rest_ms'] - ref['rest_ms']:.2f} |")
    for r in rows:
        ops = ", ".join(f"`{o['op']}` {o['ms']:.2f} ms ({o['calls']:g} calls)" for o in r["top"])
        lines += ["", f"`{without_profile(r['method'])}`, the rest's largest operators per step: {ops}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--methods", default=METHODS, help="';'-separated kvlab specs ({p}: --profile)")
    p.add_argument("--profile", default="", help="head profile of the model (head-aware, haq)")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    p.add_argument("--top", type=int, default=6, help="how many of the rest's operators to list")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=OUT / "step_split", help="output stem (.json and .md are added)")
    args = p.parse_args()
    if min(args.rounds, args.chunk, args.threads) < 1 or args.warmup < 0 or args.top < 0 or args.context < 2:
        p.error("--rounds, --chunk and --threads must be positive, --warmup and --top not negative, "
                "--context 2 or more")
    specs = [s.format(p=args.profile) for s in args.methods.split(";")]
    try:  # a wrong spec or profile path: one line before the model loads
        if "{p}" in args.methods and not Path(args.profile).is_file():
            raise KvlabError(f"a spec names {{p}}: --profile must be a head profile of the model (kvlab heads profile "
                             f"makes one); got '{args.profile}'")
        for spec in specs:
            build(spec)
    except KvlabError as exc:
        p.error(str(exc))
    torch.set_num_threads(args.threads)
    model, tok = kvlab.load(args.model)
    meta = run_meta(model, args)
    ids = tokenize(tok, load_text("pydoc"), args.context).to(model.device)
    rows = run(model, ids, specs, args.rounds, args.warmup, args.chunk, args.top)
    text = table(rows)
    print(text)
    write(args.out, rows, text, meta)


if __name__ == "__main__":
    run_script(main, __file__)
