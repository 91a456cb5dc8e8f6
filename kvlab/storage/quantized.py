"""KIVI-quantized KV storage for one group of heads (HAQ-KV): pure torch, any device.

A :class:`QuantSegment` stores what a dense :class:`~kvlab.storage.dense.Segment` stores, quantized the KIVI
way (Liu et al. 2024): keys **per channel** in blocks of ``group_size`` tokens (every (head, channel)
has a scale and zero point per block), values **per token** in groups of ``min(group_size, D)``
channels; asymmetric, round-to-nearest, float16 scales (:mod:`kvlab.quant`). The ``residual`` most
recent tokens stay in full precision; when the residual holds ``residual + group_size`` tokens its
oldest ``group_size`` are quantized into the body as one block, as soon as they arrive (so a chunk's
queries attend to the stored, quantized version of its older tokens, and memory is measured honestly).

Layout (cheap tensor ops to append blocks or drop tokens, no lists of tensors)::

    kcodes, vcodes   (B, h, T, D * bits / 8)  uint8, codes packed along the channel axis
    kscale, kzero    (B, h, NB, D)            float16, one row per block of G tokens (per channel)
    kblock           (B, h, T)                int16, the row of kscale each body token uses
    kpos             (B, h, T)                int32 true positions, only for a scorer that does not re-index
    vscale, vzero    (B, h, T, D / Gv)        float16, one per Gv channels per token
    rkeys, rvalues   (B, h, r, D)             the model's dtype, full precision (r in [residual, residual + G))
    skeys, svalues   (B, h, s, D)             the first ``sinks`` tokens, full precision, never evicted
    scores           (B, h, s + T + r)        float32 accumulated attention, only for H2O-like scorers

Sinks. A group whose scorer always keeps the first tokens (StreamingLLM's attention sinks, its
``sinks``) can keep them in full precision (``QuantGroup.exact_sinks``): they take a large share of
every query's attention, so their quantization error reaches every output. On SmolLM2 (pydoc, 2048
tokens, budget 512, ``haq`` bits 8/4/2) exact sinks on the 2-bit local heads bring perplexity from
+12.3% to +6.6% of the full cache's, for 2 KiB per head. KVQuant (below) and IntactKV (Liu et al.
2024) keep the first token's KV in full precision for the same reason. Kept tokens read in the
order sinks, body, residual.

Positions. Keys are stored **before RoPE**: each incoming key is un-rotated from its true position
(the j-th key of a forward is at ``seen + j``). At attention time every kept key is dequantized and
rotated to its frame position ``seen - n + i`` (n kept, i its index; see :mod:`kvlab.storage.dense`), which is
exact re-indexing with no drift however often tokens are evicted; when the group's scorer keeps
original positions (H2O's default), to its true position instead, kept per body token (int32).
KIVI quantizes post-RoPE keys; quantizing pre-RoPE keys per channel is the choice of KVQuant
(Hooper et al. 2024, "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization"): RoPE mixes pairs of channels with a position-dependent angle, which blurs the
per-channel outlier structure that per-channel scales exploit.

Token-level eviction. Evicting a token from a quantized block leaves the codes of the block's other
tokens valid under the block's key scales, so :meth:`compress` drops single tokens exactly as the
dense segment does: the group's scorer scores every kept token (``(n,)`` or ``(B, h, n)``, body then
residual in time order), the residual is always kept, and the best body tokens fill the rest of the
budget. A block's scale row lives as long as one of its tokens does (rows are compacted after each
eviction; with per-head scores a head may carry a few dead rows as padding, which are counted).
Whole-block (page-level) eviction was tried first: on SmolLM2 (pydoc, 2048 tokens, budget 512) it
cost 3% perplexity over token-level eviction even with exact (unquantized) blocks, because a block
of 32 tokens rarely holds only heavy hitters.
The scores are float32 bookkeeping and, as for the dense segment, not counted in :meth:`nbytes`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.errors import KvlabError
from kvlab.quant import pack, quantize, unpack
from kvlab.storage.attention import attend
from kvlab.storage.base import Storage, keep_indices
from kvlab.storage.plan import GROUP_SIZE, RESIDUAL, Group
from kvlab.storage.rope import Rotary


class QuantSegment:
    """The kept tokens of one group of KV heads, quantized (see the module docstring).

    Implements :class:`~kvlab.storage.base.Storage`. ``keys`` and ``values`` read as dense ``(B, h, n, D)``
    tensors (keys rotated to their positions). Padded batches are refused (not yet supported).
    """

    def __init__(self, group: Group, rotary: Rotary | None):
        if group.bits not in (2, 4, 8):
            raise KvlabError(f"quantized storage needs bits 2, 4 or 8, got {group.bits}")
        self.group = group
        self.heads = torch.tensor(group.heads, dtype=torch.long)
        self.rotary = rotary
        # frame positions (re-indexed) unless the scorer keeps original ones and something can be evicted
        self.reindex = group.scorer.reindex or group.budget is None
        self.bits = group.bits
        self.group_size = getattr(group, "group_size", GROUP_SIZE)
        self.residual = getattr(group, "residual", RESIDUAL)
        # the scorer's sinks (always kept), in full precision; none once a sliding layer's cap replaced the scorer
        self.sinks = getattr(group.scorer, "sinks", 0) if getattr(group, "exact_sinks", False) else 0
        self.needs_scores = group.scorer.needs_scores
        self.observed = group.scorer.observed() if self.needs_scores else None
        self.clear()

    def clear(self) -> None:
        """Forget every token (the state of a fresh segment)."""
        self.seen = 0  # tokens fed so far: the next key is at true position `seen`
        self.kcodes = self.vcodes = self.kscale = self.kzero = self.vscale = self.vzero = self.kblock = None
        self.kpos: torch.Tensor | None = None  # (B, h, T) int32 true positions, only without re-indexing
        self.rkeys: torch.Tensor | None = None  # (B, h, r, D) pre-RoPE
        self.rvalues: torch.Tensor | None = None
        self.skeys: torch.Tensor | None = None  # (B, h, s, D) pre-RoPE, the first `sinks` tokens
        self.svalues: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # (B, h, n) float32

    # -- state ---------------------------------------------------------------------------
    @property
    def body_length(self) -> int:
        return 0 if self.kcodes is None else self.kcodes.shape[2]

    @property
    def residual_length(self) -> int:
        return 0 if self.rkeys is None else self.rkeys.shape[2]

    @property
    def sink_length(self) -> int:
        return 0 if self.skeys is None else self.skeys.shape[2]

    @property
    def length(self) -> int:
        return self.sink_length + self.body_length + self.residual_length

    @property
    def device(self) -> torch.device:
        return self.rkeys.device

    def length_after_compress(self) -> int:
        budget, n = self.group.budget, self.length
        return n if budget is None or n <= budget else max(budget, self.sink_length + self.residual_length)

    def nbytes_parts(self) -> dict[str, int]:
        """Bytes of the packed codes; of the scales, zero points and per-token block rows (and positions);
        of the full-precision residual and sinks."""
        def size(*ts: torch.Tensor | None) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)
        return {"codes": size(self.kcodes, self.vcodes),
                "scales": size(self.kscale, self.kzero, self.kblock, self.kpos, self.vscale, self.vzero),
                "residual": size(self.rkeys, self.rvalues, self.skeys, self.svalues)}

    def source_nbytes(self) -> int:
        """Keys are kept before RoPE here: no separate originals."""
        return 0

    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + zero points + block rows + residual and sink keys/values (not the
        scores)."""
        return sum(self.nbytes_parts().values())

    # -- dense views (tests, references) -------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.rkeys is None else self.dense()[0]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.rkeys is None else self.dense()[1]

    @property
    def age(self) -> torch.Tensor:
        """Kept tokens after each kept one (time order, no padding): ``(n,)``. Among the kept tokens, so the
        newest ``k`` are those with ``age < k``, as for the dense segment."""
        return torch.arange(self.length - 1, -1, -1, device=self.device)

    @property
    def order(self) -> torch.Tensor:
        """Each kept token's index in the cache (no padding here): ``(n,)``."""
        return torch.arange(self.length, device=self.device)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a batch-axis reorder / repeat / select) to every stored tensor."""
        for name in ("kcodes", "vcodes", "kscale", "kzero", "kblock", "kpos", "vscale", "vzero", "rkeys", "rvalues",
                     "skeys", "svalues", "scores"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Dequantized keys rotated to their positions (frame, or original without re-indexing) and
        values: ``(B, h, n, D)`` each; no padding."""
        bk, bv = self._dequantized_body()
        keys = torch.cat((self.skeys, bk, self.rkeys), dim=2)
        values = torch.cat((self.svalues, bv, self.rvalues), dim=2)
        if self.rotary is not None:
            n, r, s = keys.shape[2], self.residual_length, self.sink_length
            if self.reindex:
                pos = torch.arange(self.seen - n, self.seen, device=keys.device)  # (n,)
            else:  # (B, h, n): the sinks', the body's own positions, then the residual's (never evicted, contiguous)
                head = torch.arange(s, device=keys.device).expand(*keys.shape[:2], s)
                tail = torch.arange(self.seen - r, self.seen, device=keys.device).expand(*keys.shape[:2], r)
                pos = torch.cat((head, self.kpos, tail), dim=2)
            keys = self.rotary.shift(keys, pos)
        return keys, values, None

    def drop_last(self) -> None:
        raise KvlabError("a quantized part cannot give back its newest token: group positions support 16-bit methods "
                         "only; use batch positions for quant/haq")

    # -- a forward pass --------------------------------------------------------------------
    def push(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Evict down to the budget, then add ``(B, h, q, D)`` new keys and values (see :meth:`append`)."""
        if valid is not None and not bool(valid.all()):  # once per padded chunk, never in a decode step
            raise KvlabError("quantized storage (haq, quant) does not support padded batches yet: run the prompts "
                             "one at a time, or use a 16-bit method")
        self.compress(lazy=key_states.shape[-2] == 1)
        self.append(key_states, value_states)

    def compress(self, lazy: bool = False) -> None:
        """Evict down to the budget: keep the sinks, the residual and the best-scoring body tokens. ``lazy``
        (a decode step): dead key-scale rows are dropped once every ``group_size`` steps, since counting
        them reads a number back from the device."""
        budget, n, body, s = self.group.budget, self.length, self.body_length, self.sink_length
        if budget is None or n <= budget or body == 0:
            return
        score = self.group.scorer.score(self)[..., s:s + body]  # (body,) or (B, h, body): sinks and residual stay
        keep = keep_indices(score, max(0, budget - s - self.residual_length))  # body tokens, in time order
        if keep.dim() == 1:  # one choice for every head
            keep = keep.expand(*self.kblock.shape[:2], -1)
        for name in ("kcodes", "vcodes", "vscale", "vzero", "kblock") + (() if self.reindex else ("kpos",)):
            t = getattr(self, name)
            setattr(self, name, t.gather(2, keep if t.dim() == 3 else keep[..., None].expand(*keep.shape, t.shape[-1])))
        if self.scores is not None:
            head = torch.arange(s, device=keep.device).expand(*keep.shape[:2], -1)
            rest = torch.arange(s + body, n, device=keep.device).expand(*keep.shape[:2], -1)
            self.scores = self.scores.gather(2, torch.cat((head, keep + s, rest), dim=-1))
        self._compact_scales(lazy)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add ``(B, h, q, D)`` new keys (rotated at their true positions) and values: the first ``sinks``
        tokens ever seen to the sinks, the others to the residual, whose oldest blocks are quantized
        once it holds ``residual + group_size`` tokens."""
        q = key_states.shape[-2]
        if self.rkeys is None:
            self._start(key_states)
        keys = key_states
        if self.rotary is not None:
            keys = self.rotary.shift(key_states, -torch.arange(self.seen, self.seen + q, device=key_states.device))
        s = max(0, min(self.sinks - self.seen, q))  # the first tokens ever seen
        self.skeys = torch.cat((self.skeys, keys[:, :, :s]), dim=2)
        self.svalues = torch.cat((self.svalues, value_states[:, :, :s]), dim=2)
        self.rkeys = torch.cat((self.rkeys, keys[:, :, s:]), dim=2)
        self.rvalues = torch.cat((self.rvalues, value_states[:, :, s:]), dim=2)
        self.seen += q
        if self.needs_scores:
            new = torch.zeros(*key_states.shape[:2], q, dtype=torch.float32, device=key_states.device)
            self.scores = torch.cat((self.scores, new), dim=-1)
        blocks = (self.residual_length - self.residual) // self.group_size
        if blocks > 0:
            self._quantize_oldest(blocks * self.group_size)

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               prefix: Storage | None = None) -> torch.Tensor:
        """Attention of ``query (B, h*g, q, D)`` over the dequantized kept tokens (the last ``q`` of
        which are the queries' own). Returns ``(B, h*g, q, D)``; accumulates H2O scores like the dense
        segment (mean over the group's query heads)."""
        if prefix is not None:
            raise KvlabError("group positions support 16-bit methods only; use batch positions for quant/haq")
        keys, values, _ = self.dense()
        out, received = attend(query, keys, values, scaling=scaling, window=window, softcap=softcap,
                               need_probs=self.needs_scores, observed=self.observed)
        if received is not None:
            self.receive(received)
        return out

    def receive(self, received: torch.Tensor) -> None:
        """Add (or, for a scorer observing only the newest queries, set) the attention ``(B, h, n)`` received."""
        if self.needs_scores:
            self.scores = received if self.observed is not None else self.scores + received

    # -- internals ---------------------------------------------------------------------------
    def _start(self, key_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.vgroup = min(self.group_size, d)
        if (d * self.bits) % 8 or d % self.vgroup:
            raise KvlabError(f"head_dim {d} cannot be packed at {self.bits} bits in value groups of {self.vgroup} "
                             f"channels; choose a group_size that divides {d}")
        dev, half = key_states.device, torch.float16
        width = d * self.bits // 8
        self.kcodes = torch.empty(b, h, 0, width, dtype=torch.uint8, device=dev)
        self.vcodes = torch.empty(b, h, 0, width, dtype=torch.uint8, device=dev)
        self.kscale = torch.empty(b, h, 0, d, dtype=half, device=dev)
        self.kzero = torch.empty_like(self.kscale)
        self.kblock = torch.empty(b, h, 0, dtype=torch.int16, device=dev)
        if not self.reindex:
            self.kpos = torch.empty(b, h, 0, dtype=torch.int32, device=dev)
        self.vscale = torch.empty(b, h, 0, d // self.vgroup, dtype=half, device=dev)
        self.vzero = torch.empty_like(self.vscale)
        self.rkeys = key_states.new_empty(b, h, 0, d)
        self.rvalues = key_states.new_empty(b, h, 0, d)
        self.skeys = key_states.new_empty(b, h, 0, d)
        self.svalues = key_states.new_empty(b, h, 0, d)
        if self.needs_scores:
            self.scores = torch.zeros(b, h, 0, dtype=torch.float32, device=dev)

    def _quantize_oldest(self, m: int) -> None:
        """Move the residual's oldest ``m`` tokens (a multiple of G) into the body."""
        b, h, _, d = self.rkeys.shape
        k, v = self.rkeys[:, :, :m], self.rvalues[:, :, :m]
        qk = quantize(k, self.bits, axis=2, group_size=self.group_size)  # codes in (B, h, D, m) order
        kc = unpack(qk.data, self.bits, k.numel()).view(b, h, d, m).transpose(2, 3)  # (B, h, m, D)
        qv = quantize(v, self.bits, axis=3, group_size=self.vgroup)  # codes already in (B, h, m, D) order
        width = d * self.bits // 8
        self.kcodes = torch.cat((self.kcodes, pack(kc.contiguous(), self.bits).view(b, h, m, width)), dim=2)
        self.vcodes = torch.cat((self.vcodes, qv.data.view(b, h, m, width)), dim=2)
        rows = self.kscale.shape[2] + torch.arange(m, device=k.device) // self.group_size
        self.kblock = torch.cat((self.kblock, rows.to(torch.int16).expand(b, h, m)), dim=2)
        self.kscale = torch.cat((self.kscale, qk.scale.transpose(2, 3)), dim=2)  # (B, h, m/G, D)
        self.kzero = torch.cat((self.kzero, qk.zero.transpose(2, 3)), dim=2)
        self.vscale = torch.cat((self.vscale, qv.scale), dim=2)  # (B, h, m, D/Gv)
        self.vzero = torch.cat((self.vzero, qv.zero), dim=2)
        if self.kpos is not None:  # the residual's oldest m tokens sit at seen - r .. seen - r + m - 1
            first = self.seen - self.residual_length
            pos = torch.arange(first, first + m, dtype=torch.int32, device=k.device).expand(b, h, m)
            self.kpos = torch.cat((self.kpos, pos), dim=2)
        self.rkeys, self.rvalues = self.rkeys[:, :, m:].clone(), self.rvalues[:, :, m:].clone()

    def _dequantized_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values of the body, ``(B, h, T, D)`` in the residual's dtype."""
        b, h, t, _ = self.kcodes.shape
        d, g, gv = self.rkeys.shape[-1], self.group_size, self.vgroup
        dtype = self.rkeys.dtype
        if t == 0:
            empty = self.rkeys.new_empty(b, h, 0, d)
            return empty, empty
        kc = unpack(self.kcodes, self.bits, b * h * t * d).view(b, h, t, d).float()
        if self.kscale.shape[2] * g == t:  # every block whole: token i uses row i // G
            keys = (kc.view(b, h, t // g, g, d) * self.kscale.float()[:, :, :, None]
                    + self.kzero.float()[:, :, :, None]).view(b, h, t, d)
        else:
            rows = self.kblock.long()[..., None].expand(b, h, t, d)
            keys = kc * self.kscale.float().gather(2, rows) + self.kzero.float().gather(2, rows)
        vc = unpack(self.vcodes, self.bits, b * h * t * d).view(b, h, t, d // gv, gv).float()
        values = vc * self.vscale.float()[..., None] + self.vzero.float()[..., None]  # (B, h, T, D/Gv, Gv)
        return keys.to(dtype), values.view(b, h, t, d).to(dtype)

    def _compact_scales(self, lazy: bool) -> None:
        """Drop the key-scale rows no kept token uses; renumber ``kblock``. Heads keep their live rows
        in time order, padded to the largest count over heads."""
        rows = self.kscale.shape[2]
        if lazy and self.seen % self.group_size:
            return  # compacting reads a count back from the device: a decode step does it once every G steps
        idx = self.kblock.long()  # (B, h, T)
        live = torch.zeros(*idx.shape[:2], rows, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
        count = int(live.sum(-1).max()) if idx.numel() else 0
        if count == rows:
            return
        order = torch.argsort((~live).to(torch.uint8), dim=-1, stable=True)[..., :count]  # live rows first
        self.kblock = (live.cumsum(-1) - 1).gather(2, idx).to(torch.int16)
        take = order[..., None].expand(-1, -1, -1, self.kscale.shape[-1])
        self.kscale, self.kzero = self.kscale.gather(2, take), self.kzero.gather(2, take)
