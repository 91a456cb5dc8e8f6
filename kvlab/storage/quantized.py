"""KIVI-quantized KV storage for one group of heads (HAQ-KV): pure torch, any device.

A :class:`QuantSegment` stores what a dense :class:`~kvlab.storage.dense.Segment` stores, quantized the KIVI
way (Liu et al. 2024): keys **per channel** in blocks of ``group_size`` tokens (every (head, channel)
has a scale and zero point per block), values **per token** in groups of ``min(group_size, D)``
channels; asymmetric, round-to-nearest, float16 scales (:mod:`kvlab.quant`). The ``residual`` most
recent tokens stay in full precision; when the residual holds ``residual + group_size`` tokens its
oldest ``group_size`` are quantized into the body as one block, as soon as they arrive (so a chunk's
queries attend to the stored, quantized version of its older tokens, and memory is measured honestly).

Layout: the quantized tokens (the *body*) are a :class:`~kvlab.storage.codes.QuantBody`; the first tokens, where
the scorer keeps them (``QuantGroup.exact_sinks``), are :class:`~kvlab.storage.sinks.ExactSinks` (``s`` tokens in
full precision, never evicted); besides them::

    rkeys, rvalues   (B, h, r, D)  the model's dtype, the newest tokens as the model handed them over (keys rotated
                                   at their true positions), r in [residual, residual + G)
    scores           (B, h, s + T + r)  float32 accumulated attention, only for H2O-like scorers

Kept tokens read in the order sinks, body, residual.

Positions. With ``rope="pre"`` (the default) quantized keys and sinks are stored **before RoPE**: a key is
un-rotated from its true position (in float32) when it becomes a sink or leaves the residual for the body. At
attention time they are dequantized and rotated, in float32 and rounded once to the model's dtype, to their frame
position ``seen - n + i`` (n kept, i its index; see :mod:`kvlab.storage.frames`): exact re-indexing, no drift
however often tokens are evicted; when the scorer keeps original positions (H2O's default), to their true
position instead, kept per body token (int32). This is KVQuant's choice (Hooper et al. 2024): RoPE turns pairs of
channels by a position-dependent angle, which blurs the per-channel structure that per-channel scales exploit.
``rope="post"`` (KIVI's) stores the body's keys as the model rotated them: a step dequantizes without rotating
(only exact sinks move), so true positions must be frame positions: no eviction, a positional scorer with exact
sinks, or no re-indexing (:class:`~kvlab.storage.plan.QuantGroup` refuses anything else). The residual (the newest
``r`` tokens, whose frame positions are their true ones) is used as the model handed it over, in either case.

Token-level eviction. Dropping a token from a quantized block leaves the codes of the block's other tokens
valid under the block's key scales, so :meth:`compress` drops single tokens as the dense segment does: the
scorer scores every kept token (``(n,)`` or ``(B, h, n)``, body then residual), the residual is always kept and
the best body tokens fill the budget; a positional scorer (a window, a sliding layer) drops the oldest body
tokens by a slice. A block's scale row lives as long as one of its tokens does (compacted once every
``group_size`` decode steps, to a count sent to the host the time before, so no step waits for the device;
per-head choices may leave a head a few counted dead rows as padding). Whole-block
eviction cost 3% perplexity over it on SmolLM2 (pydoc, 2048 tokens, budget 512), even with exact blocks.
The scores are float32 bookkeeping and, as for the dense segment, not counted in :meth:`nbytes`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.errors import KvlabError
from kvlab.storage.attention import attend
from kvlab.storage.codes import QuantBody
from kvlab.storage.plan import GROUP_SIZE, RESIDUAL, Group, Storage, by_slice
from kvlab.storage.rope import Rotary
from kvlab.storage.sinks import ExactSinks
from kvlab.storage.tokens import keep_indices, order


class QuantSegment:
    """The kept tokens of one group of KV heads, quantized (see the module docstring).

    Implements :class:`~kvlab.storage.plan.Storage`. ``keys`` and ``values`` read as dense ``(B, h, n, D)``
    tensors (keys rotated to their positions). It stores no padding: a padded batch is stored one row at a time
    (:class:`~kvlab.storage.rows.RowSplit`, which :func:`~kvlab.storage.make_segment` puts around it).
    """

    def __init__(self, group: Group, rotary: Rotary | None):
        self.group = group
        self.heads = torch.tensor(group.heads, dtype=torch.long)
        self.rotary = rotary
        # frame positions (re-indexed) unless the scorer keeps original ones and something can be evicted
        self.reindex = group.scorer.reindex or group.budget is None
        self.bits = group.bits
        self.group_size = getattr(group, "group_size", GROUP_SIZE)
        self.residual = getattr(group, "residual", RESIDUAL)
        # the scorer's sinks (always kept), in full precision; none once a sliding layer's cap replaced the scorer
        self.sinks = ExactSinks(getattr(group.scorer, "sinks", 0) if getattr(group, "exact_sinks", False) else 0,
                                rotary)
        self.needs_scores = group.scorer.needs_scores
        self.observed = group.scorer.observed() if self.needs_scores else None
        # body keys kept as rotated; QuantGroup checked that their true positions are their frame positions
        self.post = getattr(group, "rope", "pre") == "post" and rotary is not None
        self.body = QuantBody(group.bits, self.group_size, positions=not self.reindex and not self.post)
        self.clear()

    def clear(self) -> None:
        """Forget every token (the state of a fresh segment)."""
        self.seen = 0  # tokens fed so far: the next key is at true position `seen`
        self.body.clear()
        self.sinks.clear()
        self.rkeys: torch.Tensor | None = None  # (B, h, r, D) as handed over (rotated at their true positions)
        self.rvalues: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # (B, h, n) float32

    # -- state ---------------------------------------------------------------------------
    @property
    def body_length(self) -> int:
        return self.body.length

    @property
    def residual_length(self) -> int:
        return 0 if self.rkeys is None else self.rkeys.shape[2]

    @property
    def sink_length(self) -> int:
        return self.sinks.length

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
        codes, scales = self.body.nbytes()
        exact = sum(t.nbytes for t in (self.rkeys, self.rvalues) if t is not None) + self.sinks.nbytes()
        return {"codes": codes, "scales": scales, "residual": exact}

    def source_nbytes(self) -> int:
        """No separate originals: the exact sinks are kept before RoPE in place of their keys."""
        return 0

    def reserved_nbytes(self) -> int:
        """The body's dropped tokens still allocated (a window drops them by views until its next block), and the
        sinks prepared for rotation (``rope=post``)."""
        return self.body.reserved_nbytes() + self.sinks.reserved_nbytes()

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
        return order(None, self.length, self.device)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a batch-axis reorder / repeat / select) to every stored tensor."""
        self.body.map_batch(fn)
        self.sinks.map_batch(fn)
        for name in ("rkeys", "rvalues", "scores"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Keys rotated to their positions (frame, or original without re-indexing) and values: ``(B, h, n, D)``
        each, in the model's dtype; no padding. Sinks and body are rotated in float32 and rounded once."""
        dtype, s, t, n = self.rvalues.dtype, self.sink_length, self.body.length, self.length
        if s + t == 0:
            return self.rkeys, self.rvalues, None
        b, h, _, d = self.rkeys.shape
        keys = torch.empty(b, h, n, d, dtype=dtype, device=self.device)  # filled in place: no concatenation
        values = torch.empty_like(keys)
        values[:, :, s + t:] = self.rvalues
        keys[:, :, s + t:] = self.rkeys
        if s:
            values[:, :, :s] = self.sinks.values
        if self.post:  # the body's keys are rotated at their true positions, which are their frame positions
            if t:
                self.body.dequantize(keys=keys[:, :, s:s + t], values=values[:, :, s:s + t])
            if s:
                self.sinks.rotate_into(keys[:, :, :s], self.seen - n if self.reindex else 0)
            return keys, values, None
        pre = torch.empty(b, h, s + t, d, device=self.device)  # the sinks' and the body's keys before RoPE, float32
        if s:
            pre[:, :, :s] = self.sinks.keys
        if t:
            self.body.dequantize(keys=pre[:, :, s:], values=values[:, :, s:s + t])
        if self.rotary is None:
            keys[:, :, :s + t] = pre
        elif self.reindex:  # frame positions seen - n .. of the sinks and the body
            self.rotary.shift_range(pre, self.seen - n, out=keys[:, :, :s + t])
        else:  # the sinks' own positions 0..s-1, the body's kept true positions
            pos = self.body.kpos
            if s:
                pos = torch.cat((torch.arange(s, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:2], s), pos), 2)
            keys[:, :, :s + t] = self.rotary.shift(pre, pos, dtype=dtype, bound=self.seen)
        return keys, values, None

    time_index = None  # the kept tokens are always stored in time order, so stored() is dense()
    stored = dense

    def drop_last(self) -> None:
        raise KvlabError("a quantized part cannot give back its newest token: group positions support 16-bit methods "
                         "only; use batch positions for quant/haq")

    # -- a forward pass --------------------------------------------------------------------
    def push(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Evict down to the budget, then add ``(B, h, q, D)`` new keys and values (see :meth:`append`)."""
        if valid is not None and not bool(valid.all()):  # once per padded chunk, never in a decode step
            raise KvlabError("a quantized segment stores no padding: wrap it in kvlab.storage.RowSplit (make_segment "
                             "does), which stores a padded batch one row at a time")
        self.compress(lazy=key_states.shape[-2] == 1)
        self.append(key_states, value_states)

    def compress(self, lazy: bool = False) -> None:
        """Evict down to the budget: keep the sinks, the residual and the best-scoring body tokens. ``lazy``
        (a decode step): dead key-scale rows are dropped once every ``group_size`` steps, since counting
        them reads a number back from the device."""
        budget, n, body, s, r = self.group.budget, self.length, self.body_length, self.sink_length, self.residual_length
        if budget is None or n <= budget or body == 0:
            return
        k = max(0, budget - s - r)  # body tokens kept
        if by_slice(self.group.scorer, n, s, k + r):  # the newest body tokens: a slice
            self.body.keep_last(k)
            keep = None
        else:
            score = self.group.scorer.score(self)[..., s:s + body]  # (body,) or (B, h, body): sinks, residual stay
            keep = keep_indices(score, k)  # body tokens, in time order
            if keep.dim() == 1:  # one choice for every head
                keep = keep.expand(*self.rkeys.shape[:2], -1)
            self.body.keep(keep)
        if self.scores is not None:
            if keep is None:
                keep = torch.arange(body - k, body, device=self.scores.device).expand(*self.scores.shape[:2], -1)
            head = torch.arange(s, device=keep.device).expand(*keep.shape[:2], -1)
            rest = torch.arange(s + body, n, device=keep.device).expand(*keep.shape[:2], -1)
            self.scores = self.scores.gather(2, torch.cat((head, keep + s, rest), dim=-1))
        if not lazy or self.seen % self.group_size == 0:
            self.body.compact(wait=not lazy)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add ``(B, h, q, D)`` new keys (rotated at their true positions) and values: the first ``sinks``
        tokens ever seen to the sinks, the others to the residual, whose oldest blocks are quantized
        once it holds ``residual + group_size`` tokens."""
        q = key_states.shape[-2]
        if self.rkeys is None:
            self._start(key_states)
        key_states, value_states = self.sinks.take(key_states, value_states, self.seen)  # the first tokens ever seen
        self.rkeys = torch.cat((self.rkeys, key_states), dim=2)
        self.rvalues = torch.cat((self.rvalues, value_states), dim=2)
        self.seen += q
        if self.needs_scores:
            new = torch.zeros(*key_states.shape[:2], q, dtype=torch.float32, device=key_states.device)
            self.scores = torch.cat((self.scores, new), dim=-1)
        blocks = (self.residual_length - self.residual) // self.group_size
        if blocks > 0:  # a decode step's block is checked for float16 overflow later, without waiting
            self._quantize_oldest(blocks * self.group_size, check=q > 1)

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
        self.body.start(b, h, d, key_states.device)
        self.rkeys = key_states.new_empty(b, h, 0, d)
        self.rvalues = key_states.new_empty(b, h, 0, d)
        self.sinks.start(key_states)
        if self.needs_scores:
            self.scores = torch.zeros(b, h, 0, dtype=torch.float32, device=key_states.device)

    def _quantize_oldest(self, m: int, check: bool) -> None:
        """Move the residual's oldest ``m`` tokens (a multiple of G) into the body, un-rotated from their true
        positions ``seen - r ..`` unless ``rope`` is post."""
        first = self.seen - self.residual_length
        k = self.rkeys[:, :, :m]
        if self.rotary is not None and not self.post:
            k = self.rotary.shift_range(k, first, -1, torch.float32)
        self.body.add(k, self.rvalues[:, :, :m], first, check)
        self.rkeys, self.rvalues = self.rkeys[:, :, m:].clone(), self.rvalues[:, :, m:].clone()
