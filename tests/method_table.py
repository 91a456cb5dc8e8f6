"""Every registered method with a few settings: the contract tests run over this table.

``LOSSLESS[name]`` builds a spec whose budget is at least the sequence length (the cache must then
reproduce the full cache's logits); ``TIGHT[name]`` one that must evict. Adding a method to the
registry without adding it here fails ``test_table_covers_registry``.
Entries are callables ``(seq_len, tmp_path, model) -> spec`` so that methods needing a file
(a head profile) can make one.
"""

from __future__ import annotations

LOSSLESS = {
    "full": lambda n, tmp, model: "full",
    "streaming": lambda n, tmp, model: f"streaming:sinks=4,window={n}",
    "h2o": lambda n, tmp, model: f"h2o:budget={n},recent=4",
}

TIGHT = {
    "streaming": lambda n, tmp, model: "streaming:sinks=2,window=6",
    "h2o": lambda n, tmp, model: "h2o:budget=8,recent=3",
}

# tokens kept per KV head between forward passes for the TIGHT specs
TIGHT_BUDGET = {"streaming": 8, "h2o": 8}
