"""Pure scoring of attention rows: retrieval hits, induction and locality scores, GQA grouping, classes.

Every function takes the attention probabilities of a few query rows, ``attn`` of shape
``(H, Q, T)`` (query heads, selected queries, keys), with the queries' absolute positions
``query_pos`` of shape ``(Q,)``; nothing here touches a model.
"""

from __future__ import annotations

import math

import torch

from kvlab.errors import KvlabError

CLASSES = ("retrieval", "induction", "local")


def _check(attn: torch.Tensor, query_pos: torch.Tensor) -> None:
    if attn.dim() != 3 or query_pos.dim() != 1 or attn.shape[1] != query_pos.shape[0]:
        raise KvlabError(f"attention rows must be (heads, queries, keys) with one position per query, got "
                         f"{tuple(attn.shape)} and {tuple(query_pos.shape)}")
    if query_pos.numel() and int(query_pos.max()) >= attn.shape[2]:
        raise KvlabError(f"query position {int(query_pos.max())} is beyond the {attn.shape[2]} keys")


def retrieval_hits(attn: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """Whether each head's most-attended key is the needle token being copied.

    Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context Factuality"): at a copy step
    the query is the position whose output is needle token ``j``; a head retrieves when the argmax of
    its attention row is that token's position in the context, ``target_pos[j]``.
    ``attn``: (H, Q, T); ``target_pos``: (Q,). Returns (H, Q) bool.
    """
    _check(attn, target_pos)
    return attn.argmax(dim=-1) == target_pos.to(attn.device).unsqueeze(0)


def induction_score(attn: torch.Tensor, query_pos: torch.Tensor, period: int) -> torch.Tensor:
    """Mean attention from each token of a repeated sequence to the token after its earlier copy.

    For a random sequence repeated twice with ``period`` L, the query at position ``p`` in the second
    copy has the same token at ``p - L``; an induction head attends to ``p - L + 1``.
    ``attn``: (H, Q, T); ``query_pos``: (Q,) positions in the second copy. Returns (H,).
    """
    _check(attn, query_pos)
    if period < 1 or int(query_pos.min()) - period + 1 < 0:
        raise KvlabError(f"induction period {period} does not fit query positions starting at {int(query_pos.min())}")
    target = (query_pos - period + 1).to(attn.device)                        # (Q,)
    picked = attn.gather(-1, target.view(1, -1, 1).expand(attn.shape[0], -1, 1))  # (H, Q, 1)
    return picked.squeeze(-1).mean(dim=-1)


def locality_mask(query_pos: torch.Tensor, num_keys: int, sinks: int, window: int) -> torch.Tensor:
    """(Q, T) bool: key ``k`` is a sink (``k < sinks``) or in the window ``q - window < k <= q``."""
    keys = torch.arange(num_keys, device=query_pos.device).unsqueeze(0)     # (1, T)
    q = query_pos.unsqueeze(1)                                              # (Q, 1)
    return (keys < sinks) | ((keys > q - window) & (keys <= q))


def locality_score(attn: torch.Tensor, query_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Attention mass on the first ``sinks`` keys plus the last ``window`` keys, averaged over queries.

    The StreamingLLM view (Xiao et al. 2024): a head with a score near 1 loses almost nothing when its
    cache keeps only sinks and a recent window. ``attn``: (H, Q, T). Returns (H,).
    """
    _check(attn, query_pos)
    if sinks < 0 or window < 1:
        raise KvlabError(f"locality needs sinks >= 0 and window >= 1, got sinks={sinks}, window={window}")
    mask = locality_mask(query_pos.to(attn.device), attn.shape[-1], sinks, window)
    return (attn * mask.unsqueeze(0)).sum(dim=-1).mean(dim=-1)


def group_query_heads(scores: torch.Tensor, num_kv_heads: int, reduce: str) -> torch.Tensor:
    """(..., Hq) per query head -> (..., Hkv) per KV head under grouped-query attention.

    Query heads ``g * r .. (g + 1) * r - 1`` share KV head ``g`` (``r = Hq // Hkv``, the order of
    transformers' ``repeat_kv``). ``reduce`` is "max" or "min".
    """
    hq = scores.shape[-1]
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise KvlabError(f"{hq} query heads cannot be grouped into {num_kv_heads} KV heads")
    grouped = scores.reshape(*scores.shape[:-1], num_kv_heads, hq // num_kv_heads)
    if reduce == "max":
        return grouped.amax(dim=-1)
    if reduce == "min":
        return grouped.amin(dim=-1)
    raise KvlabError(f"unknown reduction '{reduce}'; choose from: max, min")


def _top(scores: torch.Tensor, free: torch.Tensor, count: int, minimum: float) -> torch.Tensor:
    """Bool mask of the ``count`` highest free scores above ``minimum``; ties go to the lower flat index."""
    flat, avail = scores.reshape(-1), free.reshape(-1) & (scores.reshape(-1) > minimum)
    order = sorted((i for i in range(flat.numel()) if avail[i]), key=lambda i: (-float(flat[i]), i))
    chosen = torch.zeros_like(avail)
    chosen[order[:count]] = True
    return chosen.reshape(scores.shape)


def quota_count(quota: float, total: int) -> int:
    """How many of ``total`` heads a quota selects: ``quota * total`` rounded half up."""
    return int(math.floor(quota * total + 0.5))


def classify(retrieval: torch.Tensor, induction: torch.Tensor, *, retrieval_quota: float, induction_quota: float,
             min_retrieval: float = 0.0, min_induction: float = 0.0) -> list[list[str]]:
    """Classes by quotas: the top ``retrieval_quota`` of all heads by retrieval score are ``retrieval``,
    then the top ``induction_quota`` of all heads among the rest by induction score are ``induction``,
    and every other head is ``local``. A head is picked only when its score is above the minimum.

    ``retrieval``, ``induction``: (layers, kv_heads). Returns [layer][kv_head] class names.
    """
    if retrieval.shape != induction.shape or retrieval.dim() != 2:
        raise KvlabError(f"score grids must both be (layers, kv_heads), got {tuple(retrieval.shape)} "
                         f"and {tuple(induction.shape)}")
    total = retrieval.numel()
    is_r = _top(retrieval, torch.ones_like(retrieval, dtype=torch.bool), quota_count(retrieval_quota, total),
                min_retrieval)
    is_i = _top(induction, ~is_r, quota_count(induction_quota, total), min_induction)
    return [["retrieval" if is_r[l, h] else "induction" if is_i[l, h] else "local"
             for h in range(retrieval.shape[1])] for l in range(retrieval.shape[0])]
