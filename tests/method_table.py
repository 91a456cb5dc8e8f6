"""Every registered method with a few settings: the contract tests run over this table.

``LOSSLESS[name]`` builds a spec whose budget is at least the sequence length (the cache must then
reproduce the full cache's logits); ``TIGHT[name]`` one that must evict. Adding a method to the
registry without adding it here fails ``test_table_covers_registry``.
Entries are callables ``(seq_len, tmp_path, model) -> spec`` so that methods needing a file
(a head profile) can make one.
"""

from __future__ import annotations

from profiles import round_robin_profile

LOSSLESS = {
    "full": lambda n, tmp, model: "full",
    "streaming": lambda n, tmp, model: f"streaming:sinks=4,window={n}",
    "h2o": lambda n, tmp, model: f"h2o:budget={n},recent=4",
    # a head gets at least 0.4 / 2.0 of the mean budget (weights 2/1/0.4, equal localities): 10 n leaves each >= n tokens
    "head-aware": lambda n, tmp, model: f"head-aware:budget={10 * n},profile={round_robin_profile(model, tmp)}",
    # a residual of n tokens is never quantized; every head keeps >= 10 n * 0.4 / 2 >= n + group_size - 1 tokens
    "haq": lambda n, tmp, model: f"haq:budget={10 * n},profile={round_robin_profile(model, tmp)},bits=8/4/2,group_size=4,residual={n}",
    "quant": lambda n, tmp, model: f"quant:bits=4,group_size=4,residual={n}",
    "snapkv": lambda n, tmp, model: f"snapkv:budget={n},window=4,kernel=3",
    # beta=20: the top layer keeps window + (budget - window) / 20 >= n
    "pyramidkv": lambda n, tmp, model: f"pyramidkv:budget={20 * n},window=4,kernel=3",
    "tova": lambda n, tmp, model: f"tova:budget={n}",
    "adakv": lambda n, tmp, model: f"adakv:budget={n},window=4,kernel=3",
    "knorm": lambda n, tmp, model: f"knorm:budget={n},recent=2",
    "keydiff": lambda n, tmp, model: f"keydiff:budget={n}",
    "duo": lambda n, tmp, model: f"duo:profile={round_robin_profile(model, tmp)},sinks=2,window={n}",
}

TIGHT = {
    "streaming": lambda n, tmp, model: "streaming:sinks=2,window=6",
    "h2o": lambda n, tmp, model: "h2o:budget=8,recent=3",
    "head-aware": lambda n, tmp, model: f"head-aware:budget=8,profile={round_robin_profile(model, tmp)},recent=2,sinks=1,retrieval=1.5,local=0.5",
    "haq": lambda n, tmp, model: f"haq:budget=8,profile={round_robin_profile(model, tmp)},recent=2,sinks=1,retrieval=1.5,local=0.5,bits=8/4/2,group_size=2,residual=3",
    "snapkv": lambda n, tmp, model: "snapkv:budget=8,window=3,kernel=3",
    # layer budgets 11 (bottom) down to 5 (top), mean 8
    "pyramidkv": lambda n, tmp, model: "pyramidkv:budget=8,window=2,kernel=3,beta=2",
    "tova": lambda n, tmp, model: "tova:budget=8",
    "adakv": lambda n, tmp, model: "adakv:budget=8,window=2,kernel=3,floor=0.25",
    "knorm": lambda n, tmp, model: "knorm:budget=8,recent=2",
    "keydiff": lambda n, tmp, model: "keydiff:budget=8,recent=1",
    # retrieval heads keep everything: SEQ tokens
    "duo": lambda n, tmp, model: f"duo:profile={round_robin_profile(model, tmp)},sinks=2,window=6",
}

# tokens kept per KV head between forward passes for the TIGHT specs
TIGHT_BUDGET = {"streaming": 8, "h2o": 8, "head-aware": 8 * 2,  # a retrieval head can take up to 2x the mean
                "haq": 8 * 2, "snapkv": 8, "pyramidkv": 8 * 2, "tova": 8, "adakv": 8 * 2, "knorm": 8, "keydiff": 8,
                "duo": 30}  # duo's retrieval heads keep all of SEQ = 30
