"""The compressed per-head KV cache of a plan: storage and the three ways a forward uses it.

Each layer keeps, per sequence and per KV head, the first `sink` real tokens and a ring
buffer of that head's window, packed into one [B, T, D] buffer per layer for keys (and one
for values) with T = sum over KV heads of (s0 + cap[h]): memory is the plan's KV density
times the dense cache, not heads x the largest window (layout: moa_search.kernels.decode).
Everything is allocated once, for the final length (prompt + new tokens) and the batch.

The number of real tokens written per sequence, `n` (int64 [B], on the device), is the same
for every layer; so are the ring rows and the spans of a decode step: they are computed once
per forward (at layer 0, `begin`) for all layers, on the device, in place. A decode step
therefore has no host sync and allocates only inside the kernels' launches: a CUDA graph
can capture it (moa_search.generation).

How a forward of Nq tokens per sequence uses a layer (moa_search.runtime decides which):
  - prompt on an empty cache: the caller runs the plan's attention, then `write_chunk`
    keeps only what each head keeps;
  - chunk on a filled cache (long prompts prefilled in pieces, or a second turn): `window`
    lays out, per (sequence, KV head), the cached tokens in position order followed by the
    chunk, so that the prompt kernels (same contract, a sequence per KV head) serve it; then
    `write_chunk`;
  - decode (one token): `write_one`, then `decode` (the split-K Triton kernel or the
    PyTorch reference over the packed buffers); or both at once as one opaque custom op,
    `decode_step` (torch.ops.moa_search.decode_step), which is what a compiled decode
    forward calls (moa_search.generation): torch.compile sees one node per layer and fuses
    the model's dense work around it.

No transformers import here: moa_search.hf_adapter wraps this in transformers' Cache API.
"""
from __future__ import annotations

import numpy as np
import torch

from . import rules as R
from .attention import LayerRule
from .errors import MoaError
from .kernels import decode as K


class MoaCacheError(MoaError, RuntimeError):
    """The compressed cache cannot serve this request (capacity, batch, usage)."""


class CompressedKV:
    """Packed sink + ring buffers of every layer, for `batch` sequences up to `final` tokens.

    rules: one LayerRule per layer (per query head); devices: each layer's device (the
    buffers of a layer live with its weights); head_dim, dtype: of the keys.
    """

    def __init__(self, rules: list[LayerRule], num_kv_heads: int, batch: int, final: int, head_dim: int,
                 dtype: torch.dtype, devices: list[torch.device]):
        self.rules, self.num_kv_heads, self.batch, self.final = rules, num_kv_heads, batch, final
        self.num_layers = len(rules)
        self.sink = rules[0].sink
        self.s0 = min(self.sink, final)
        hq = rules[0].alpha.numel()
        self.group = hq // num_kv_heads
        dev0 = devices[0]
        self.device = dev0
        caps, self.keys, self.values, self.off, self.cap, self.off32, self.cap32, self.max_slots = [], [], [], [], [], [], [], []
        self.work = []
        for rule, dev in zip(rules, devices):
            # a KV head keeps the widest window of its query heads at the final length (host: no sync)
            span = rule.host_spans(final).reshape(num_kv_heads, self.group).max(-1)
            cap = np.clip(span, 0, final - self.s0).astype(np.int64)
            slots = self.s0 + cap
            off = np.cumsum(slots) - slots
            caps.append(cap)
            self.cap.append(torch.as_tensor(cap, device=dev))
            self.off.append(torch.as_tensor(off, device=dev))
            self.cap32.append(self.cap[-1].to(torch.int32))
            self.off32.append(self.off[-1].to(torch.int32))
            self.max_slots.append(self.s0 + int(cap.max()))
            # the decode kernel's work items for this layer's heads and this batch (host: no sync)
            work, first = K.work_items(slots, K.BLOCK_N, batch, K.sm_count(dev))
            self.work.append((torch.as_tensor(work, device=dev), torch.as_tensor(first, device=dev)))
            self.keys.append(torch.zeros(batch, int(slots.sum()), head_dim, dtype=dtype, device=dev))
            self.values.append(torch.zeros_like(self.keys[-1]))
        # per-forward state, shared by the layers (on layer 0's device)
        self.n = torch.zeros(batch, dtype=torch.int64, device=dev0)        # real tokens after this forward
        self.n_prev = torch.zeros_like(self.n)                              # ... before it
        self.alpha = torch.stack([r.alpha.to(dev0, torch.float64) for r in rules])   # [L, Hq]
        self.beta = torch.stack([r.beta.to(dev0, torch.float64) for r in rules])
        self.cap_all = torch.as_tensor(np.stack(caps), device=dev0)                # [L, Hkv]
        self.off_all = torch.stack([o.to(dev0) for o in self.off])                 # [L, Hkv]
        self.rows = torch.zeros(self.num_layers, batch, num_kv_heads, dtype=torch.int64, device=dev0)
        self.spans = torch.zeros(self.num_layers, batch, hq, dtype=torch.int64, device=dev0)
        self.bidx = torch.arange(batch, device=dev0)[:, None].expand(batch, num_kv_heads)

    # -- per forward (layer 0) ---------------------------------------------------------------
    def begin(self, real: torch.Tensor | int, decode: bool) -> None:
        """Start a forward that brings `real` more real tokens per sequence (int64 [B] or an int).

        For a decode step also the ring row of the new token and the spans at the new length,
        for every layer at once: [L, B, Hkv] and [L, B, Hq]. All in place (graph-safe).
        """
        self.n_prev.copy_(self.n)
        self.n.add_(real)
        if decode:
            self.rows.copy_(self.off_all[:, None, :] + self.ring_slot(self.n_prev[None, :, None], self.cap_all[:, None, :]))
            self.spans.copy_(R.span(self.alpha[:, None, :], self.beta[:, None, :], self.n[None, :, None],
                                    self.rules[0].min_span))

    def ring_slot(self, p: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        """Slot (within its head) of position p: the sink slot p, or its place in the ring."""
        return torch.where(p < self.s0, p, self.s0 + (p - self.s0) % cap.clamp_min(1))

    def _on(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        dev = self.keys[layer].device
        return t if t.device == dev else t.to(dev, non_blocking=True)

    # -- writes --------------------------------------------------------------------------------
    def write_one(self, layer: int, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Decode append of k, v [B, Hkv, 1, D] at position n_prev (rows from `begin`). real: bool [B]
        (None: every sequence brings a real token); a padding token writes the old value back."""
        rows, bidx = self._on(self.rows[layer], layer), self._on(self.bidx, layer)
        keys, values = self.keys[layer], self.values[layer]
        kn, vn = k[:, :, 0], v[:, :, 0]
        if real is not None:
            keep = real.view(-1, 1, 1)
            kn, vn = torch.where(keep, kn, keys[bidx, rows]), torch.where(keep, vn, values[bidx, rows])
        keys.index_put_((bidx, rows), kn)
        values.index_put_((bidx, rows), vn)

    def write_chunk(self, layer: int, k, v, start, end) -> None:
        """Append the real tokens [start, end) of a chunk k, v [B, Hkv, Nq, D] at positions from
        n_prev; keep only the sink and each head's last `cap` positions of the new length n."""
        B, Hkv, Nq, _ = k.shape
        dev = k.device
        n_prev, n = self._on(self.n_prev, layer), self._on(self.n, layer)
        cap = self.cap[layer].view(1, -1, 1)
        j = torch.arange(Nq, device=dev)
        real = (j[None] >= start[:, None]) & (j[None] < end[:, None])         # [B, Nq]
        p = (n_prev[:, None] + j[None] - start[:, None])[:, None, :].expand(B, Hkv, Nq)
        store = real[:, None, :] & ((p < self.s0) | (p >= n[:, None, None] - cap))
        rows = self.off[layer].view(1, -1, 1) + self.ring_slot(p, cap)
        bidx = torch.arange(B, device=dev).view(B, 1, 1).expand(B, Hkv, Nq)
        self.keys[layer][bidx[store], rows[store]] = k[store]
        self.values[layer][bidx[store], rows[store]] = v[store]

    # -- reads -----------------------------------------------------------------------------------
    def window(self, layer: int, k, v, start, end):
        """The keys a chunk's queries can reach, laid out for the prompt kernels.

        k, v: [B, Hkv, Nq, D] the chunk (real tokens [start, end), chunk-relative), not yet
        written. Returns (kw, vw [B*Hkv, 1, W + Nq, D], start_w, end_w int64 [B*Hkv]) with
        W = s0 + the layer's widest ring: per (sequence, KV head), the cached positions in increasing order,
        right-aligned against the chunk. Position counting from start_w is then exact for the
        sink (it holds positions 0..s0-1, all kept) and is the true position minus a constant
        for the window and the chunk, so every query-key distance, hence the kept set
        (rules.kept), is unchanged; keys evicted from the ring are farther than any span at a
        length <= the final one, and padded-away on the left.
        """
        B, Hkv, Nq, D = k.shape
        dev = k.device
        n = self._on(self.n_prev, layer)[:, None, None]                      # [B, 1, 1] cached before
        cap = self.cap[layer].view(1, Hkv, 1)
        W = self.max_slots[layer]                                            # s0 + this layer's widest ring
        held = torch.minimum(n, self.s0 + cap)                               # tokens held per (b, h)
        in_sink = torch.minimum(n, torch.full_like(n, self.s0))
        i = torch.arange(W, device=dev).view(1, 1, W) - (W - held)          # rank among the held, < 0: empty
        first_ring = torch.maximum(torch.full_like(n, self.s0), n - cap)     # oldest position in the ring
        pos = torch.where(i < in_sink, i, first_ring + (i - in_sink))
        slot = self.off[layer].view(1, Hkv, 1) + self.ring_slot(pos.clamp_min(0), cap)
        slot = torch.where(i >= 0, slot, 0)
        bidx = torch.arange(B, device=dev).view(B, 1, 1)
        kw = torch.cat([self.keys[layer][bidx, slot], k], 2).view(B * Hkv, 1, W + Nq, D)
        vw = torch.cat([self.values[layer][bidx, slot], v], 2).view(B * Hkv, 1, W + Nq, D)
        held = held.view(B, Hkv)
        start_w = torch.where(held > 0, W - held, W + start[:, None]).reshape(-1)
        end_w = (W + end)[:, None].expand(B, Hkv).reshape(-1)
        return kw, vw, start_w, end_w

    def decode(self, layer: int, q: torch.Tensor, scale: float, triton: bool) -> torch.Tensor:
        """Attention of one query per sequence, q [B, Hq, 1, D] at position n - 1 (its key already
        written), over the layer's packed cache with the step's spans -> [B, Hq, 1, D]."""
        span, n = self._on(self.spans[layer], layer), self._on(self.n, layer)
        if triton:
            out = K.packed_decode_attention(q[:, :, 0], self.keys[layer], self.values[layer], self.off32[layer],
                                            self.cap32[layer], self.s0, self.sink, span, n, scale,
                                            work=self.work[layer])
        else:
            out = K.packed_decode_reference(q[:, :, 0], self.keys[layer], self.values[layer], self.s0, self.cap[layer],
                                            self.sink, span, n, scale)
        return out[:, :, None]

    def decode_step(self, layer: int, q, k, v, scale: float, triton: bool) -> torch.Tensor:
        """write_one (every sequence brings a real token) + decode as one custom op, for a
        compiled decode forward: q [B, Hq, 1, D], k, v [B, Hkv, 1, D] -> [B, Hq, 1, D]. Needs
        `begin(1, decode=True)` before the model forward (once per step, for every layer)."""
        return torch.ops.moa_search.decode_step(
            q, k, v, self.keys[layer], self.values[layer], self._on(self.rows[layer], layer),
            self._on(self.bidx, layer), self._on(self.spans[layer], layer), self._on(self.n, layer),
            self.off32[layer], self.cap32[layer], self.cap[layer], *self.work[layer], self.s0, self.sink, float(scale),
            bool(triton))

    def kept_positions(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos, valid) [B, T]: the position each slot of a layer holds (inspection and tests)."""
        from moa_search.kernels.decode import slot_positions

        return slot_positions(self._on(self.n, layer), self.s0, self.cap[layer])

    # -- whole-cache operations ----------------------------------------------------------------
    def select(self, index: torch.Tensor) -> None:
        """Keep the sequences `index` (beam search reorders and repeats them); reallocates."""
        for li in range(self.num_layers):
            ix = index.to(self.keys[li].device)
            self.keys[li] = self.keys[li].index_select(0, ix)
            self.values[li] = self.values[li].index_select(0, ix)
        ix = index.to(self.device)
        self.n, self.n_prev = self.n.index_select(0, ix), self.n_prev.index_select(0, ix)
        self.batch = len(index)
        self.rows = torch.zeros(self.num_layers, self.batch, self.num_kv_heads, dtype=torch.int64, device=self.device)
        self.spans = torch.zeros(self.num_layers, self.batch, self.spans.shape[-1], dtype=torch.int64, device=self.device)
        self.bidx = torch.arange(self.batch, device=self.device)[:, None].expand(self.batch, self.num_kv_heads)

    def reset(self) -> None:
        for t in (*self.keys, *self.values, self.n, self.n_prev):
            t.zero_()

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def dense_nbytes(self) -> int:
        """Bytes a dense cache would hold at the final length (same batch and dtype)."""
        return sum(2 * k.shape[0] * self.num_kv_heads * self.final * k.shape[2] * k.element_size() for k in self.keys)


# ----------------------------------------------------------------------------- the custom op
# One layer's decode append + attention as a single opaque op: torch.compile (dynamo, inductor)
# must not trace into the Triton launch, and the cache buffers it writes are declared as
# mutated, so the functionalised graph writes them in place (inductor re-inplaces the op).


@torch.library.custom_op("moa_search::decode_step", mutates_args=("keys", "values"))
def _decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 rows: torch.Tensor, bidx: torch.Tensor, span: torch.Tensor, n: torch.Tensor, off32: torch.Tensor,
                 cap32: torch.Tensor, cap: torch.Tensor, work: torch.Tensor, first: torch.Tensor, s0: int, sink: int,
                 scale: float, triton: bool) -> torch.Tensor:
    """k, v [B, Hkv, 1, D] written at `rows` [B, Hkv] (from CompressedKV.begin) of the packed
    keys/values [B, T, D]; then q [B, Hq, 1, D] attends over them -> [B, Hq, 1, D] (new memory).
    work, first: the layer's decode work items (kernels.decode.work_items)."""
    if triton:
        K.append_kv(keys, values, k[:, :, 0], v[:, :, 0], rows)
        out = K.packed_decode_attention(q[:, :, 0], keys, values, off32, cap32, s0, sink, span, n, scale,
                                        work=(work, first))
    else:
        keys.index_put_((bidx, rows), k[:, :, 0])
        values.index_put_((bidx, rows), v[:, :, 0])
        out = K.packed_decode_reference(q[:, :, 0], keys, values, s0, cap, sink, span, n, scale)
    return out.unsqueeze(2).contiguous()


@_decode_step.register_fake
def _(q, k, v, keys, values, rows, bidx, span, n, off32, cap32, cap, work, first, s0, sink, scale, triton):
    B, Hq, _, D = q.shape
    return q.new_empty(B, Hq, 1, D)


__all__ = ["CompressedKV", "MoaCacheError"]
