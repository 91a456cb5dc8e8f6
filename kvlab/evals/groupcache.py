"""Two separately compressed KV caches for one sequence: a source part and a target part.

Group Position Encoding (Tong et al. 2025, "LLM as Effective Streaming Processor: Bridging Streaming-Batch
Mismatches with Group Position Encoding") numbers source tokens ``0..S-1`` and target tokens
``phi, phi+1, ...`` in a group of their own; source tokens attend only to the source, target tokens to
every source token read so far and to the earlier target tokens. Here:

* source tokens are fed through the source :class:`~kvlab.cache.KVCache` itself (plain causal attention,
  positions = source tokens seen, so the source part is independent of the target);
* target tokens are fed through a :class:`TargetCache`, kvlab's :class:`~kvlab.cache.JoinedCache` of both
  parts, with explicit ``position_ids = phi + target tokens seen``: they go to the target part (which
  compresses itself) and attend over the kept source tokens followed by the kept target tokens.

Each part is compressed by its own cache with its own budget and re-indexes its own positions (a kept
key's position is relative to the tokens its part has seen, see :mod:`kvlab.storage.frames`), so a
compressed source keeps source positions and a compressed target keeps target positions. Sliding-window
layers are not supported (a window over two interleaved groups is not defined), nor quantized parts
(a quantized part cannot give back its newest token).
"""

from __future__ import annotations

import torch

from kvlab.cache import JoinedCache, KVCache


class TargetCache(JoinedCache):
    """The cache to pass when feeding target tokens: ``model(ids, past_key_values=cache,
    position_ids=cache.position_ids(q, phi))``. ``source`` and ``target`` are two fresh
    :func:`~kvlab.cache.make_cache` caches of the same method."""

    def __init__(self, source: KVCache, target: KVCache):
        super().__init__(source, target)
        self.source, self.target = source, target

    def position_ids(self, q: int, phi: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(1, q)`` group positions of the next ``q`` target tokens: ``phi + target tokens seen``."""
        return (phi + self.target.seen_tokens + torch.arange(q, device=device))[None]

    def pop_last(self) -> None:
        """Forget the newest target token (it is fed again later, after more source has been read).
        Valid right after a forward pass that appended it: the kept tokens keep their positions."""
        self.target.drop_last()
