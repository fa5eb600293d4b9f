"""Sparse decode over the packed per-head KV cache: Triton split-K kernel + PyTorch reference.

The packed cache of one layer (built by moa_search.cache.MoaCache) holds, per sequence b
and KV head h, `s0 + cap[h]` slots starting at row `off[h]` of

    keys, values: [B, T, D]      T = sum_h (s0 + cap[h])  (memory = sum of the heads' capacities)

Slots [0, s0) are the sink (slot i holds real position i); slots [s0, s0 + cap[h]) are a
ring buffer of the window: position p >= s0 lives in slot s0 + (p - s0) % cap[h]. With
n[b] real tokens written, ring slot r holds the largest p < n[b] with (p - s0) % cap == r,
i.e. p = s0 + r + cap * floor((n - 1 - s0 - r) / cap), and is empty when n - 1 - s0 - r < 0.
So no position table is stored: positions follow from n, s0 and cap.

A query at position qpos attends to the cached keys of the rule's kept set
(moa_search.rules.kept): pos < sink or qpos - pos < span[b, query head].

Decode (`packed_decode_attention`): one query per sequence at qpos = n - 1 (its own key is
already written). The heads' slots are cut into work items of one size (whole tiles; `work_items`,
sized by a wave model, `chunk_tiles`), so heads of different widths load the GPU evenly. Grid
(items, B): each program walks one item's slots of one head for the G query heads of the group
(GQA without repeating K/V), keeping an online softmax; a second kernel merges each head's items
by their log-sum-exp (flash-decoding). `append_kv` writes a decode step's keys and values in one
launch.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from moa_search.rules import kept

try:  # the CPU reference must import without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# ----------------------------------------------------------------------------- layout helpers


def slot_positions(n: torch.Tensor, s0: int, cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions held by every slot of one layer's packed cache.

    n: int64 [B] real tokens written; s0: sink slots; cap: int64 [Hkv] ring capacities.
    Returns (pos, valid), both [B, T] with T = sum(s0 + cap); pos is meaningless where not valid.
    """
    dev = n.device
    cap = cap.to(dev)
    slots = s0 + cap
    head = head_of_slot(s0, cap)                                                   # [T]
    off = torch.cumsum(slots, 0) - slots
    i = torch.arange(int(slots.sum()), device=dev) - off[head]                      # slot index in its head
    c = cap[head].clamp_min(1)
    r = i - s0
    t = n[:, None] - 1 - s0 - r[None, :]                                           # [B, T]
    in_sink = (i < s0)[None, :]
    pos = torch.where(in_sink, i[None, :], s0 + r[None, :] + c[None, :] * torch.div(t.clamp_min(0), c[None, :], rounding_mode="floor"))
    valid = torch.where(in_sink, i[None, :] < n[:, None], t >= 0)
    return pos, valid


def head_of_slot(s0: int, cap: torch.Tensor) -> torch.Tensor:
    """int64 [T]: the KV head owning each slot."""
    return torch.repeat_interleave(torch.arange(len(cap), device=cap.device), s0 + cap)


# ----------------------------------------------------------------------------- reference


def packed_attention_reference(q, keys, values, s0: int, cap, sink: int, span, n, q_pos,
                               new_k=None, new_v=None, new_pos=None, scale=None):
    """Masked softmax attention over a packed cache (and optional not-yet-cached keys), float32.

    q: [B, Hq, Nq, D]; keys/values: [B, T, D] packed (see module doc); cap: int64 [Hkv];
    span: int64 [B, Hq]; n: int64 [B] tokens in the cache; q_pos: int64 [B, Nq] query
    positions (-1 = padding row, output zeros). new_k/new_v: [B, Hkv, Nn, D] extra keys at
    new_pos int64 [B, Nn] (-1 = padding): a chunk attended before it is written (multi-turn).
    Returns [B, Hq, Nq, D] in q's dtype.
    """
    B, Hq, Nq, D = q.shape
    Hkv = len(cap)
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    cap = cap.to(dev)
    pos, valid = slot_positions(n.to(dev), s0, cap)
    head = head_of_slot(s0, cap)
    out = torch.zeros(B, Hq, Nq, D, dtype=q.dtype, device=dev)
    span = span.to(dev)
    for h in range(Hkv):
        sel = head == h
        k, v, kp, kv = keys[:, sel].float(), values[:, sel].float(), pos[:, sel], valid[:, sel]
        if new_k is not None:
            k = torch.cat([k, new_k[:, h].float()], 1)
            v = torch.cat([v, new_v[:, h].float()], 1)
            kp = torch.cat([kp, new_pos], 1)
            kv = torch.cat([kv, new_pos >= 0], 1)
        qh = q[:, h * G:(h + 1) * G].float()                                  # [B, G, Nq, D]
        s = torch.einsum("bgqd,bkd->bgqk", qh, k) * scale
        m = kept(q_pos[:, None, :, None], kp[:, None, None, :], sink, span[:, h * G:(h + 1) * G, None, None])
        m = m & kv[:, None, None, :] & (q_pos >= 0)[:, None, :, None]
        s = s.masked_fill(~m, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)                              # rows with nothing kept -> 0
        out[:, h * G:(h + 1) * G] = torch.einsum("bgqk,bkd->bgqd", p, v).to(q.dtype)
    return out


def packed_decode_reference(q, keys, values, s0, cap, sink, span, n, scale=None):
    """Decode reference: q [B, Hq, D] at position n - 1 (already cached) -> [B, Hq, D]."""
    q_pos = (n.to(q.device) - 1)[:, None]
    return packed_attention_reference(q[:, :, None], keys, values, s0, cap, sink, span, n, q_pos, scale=scale)[:, :, 0]


# ----------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, OFF, CAP, SPAN, NTOK, WORK, PO, PL,
        s0, sink, scale, P, Hq,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        item = tl.program_id(0)                   # one work item: slots [lo, hi) of KV head h
        b = tl.program_id(1)
        h = tl.load(WORK + item)
        lo = tl.load(WORK + P + item)
        hi = tl.load(WORK + 2 * P + item)
        off = tl.load(OFF + h).to(tl.int64)
        cap = tl.load(CAP + h)
        n = tl.load(NTOK + b)

        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        d = tl.arange(0, D)
        hq = h * G + g
        q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
        span = tl.load(SPAN + b * Hq + hq, mask=gmask, other=0)
        qpos = n - 1
        capc = tl.maximum(cap, 1)

        m_i = tl.full([BLOCK_G], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        kbase = K + b.to(tl.int64) * stride_kb
        vbase = V + b.to(tl.int64) * stride_vb
        for start in range(lo, hi, BLOCK_N):
            i = start + tl.arange(0, BLOCK_N)
            r = i - s0
            t = n - 1 - s0 - r
            in_sink = i < s0
            pos = tl.where(in_sink, i, s0 + r + capc * (tl.maximum(t, 0) // capc))
            valid = (i < hi) & tl.where(in_sink, i < n, t >= 0)
            rows = off + i
            k = tl.load(kbase + rows[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(vbase + rows[:, None] * stride_vt + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale                                # [BLOCK_G, BLOCK_N] fp32
            keep = valid[None, :] & ((pos[None, :] < sink) | (qpos - pos[None, :] < span[:, None]))
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        row = ((b * P + item) * G + g).to(tl.int64)                             # [BLOCK_G]
        tl.store(PO + row[:, None] * D + d[None, :], o, mask=gmask[:, None])
        tl.store(PL + row, lse, mask=gmask)

    @triton.jit
    def _decode_combine_kernel(PO, PL, O, FIRST, P, Hq, G: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)                    # b * Hq + hq: merge the items of its KV head by their LSE
        b = row // Hq
        hq = row % Hq
        h = hq // G
        first = tl.load(FIRST + h)
        last = tl.load(FIRST + h + 1)
        d = tl.arange(0, D)
        m = float("-inf")
        w_sum = 0.0
        acc = tl.zeros([D], tl.float32)
        for it in range(first, last):
            r = ((b * P + it) * G + hq % G).to(tl.int64)
            lse = tl.load(PL + r)
            m_new = tl.maximum(m, lse)
            old = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))      # items with nothing kept weigh 0
            w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m_new))
            acc = acc * old + w * tl.load(PO + r * D + d)
            w_sum = w_sum * old + w
            m = m_new
        tl.store(O + row.to(tl.int64) * D + d, (acc / tl.maximum(w_sum, 1e-30)).to(O.dtype.element_ty))


    @triton.jit
    def _append_kernel(K, V, KN, VN, ROWS, Hkv, stride_kb, stride_kt, stride_vb, stride_vt,
                       stride_nb, stride_nh, stride_mb, stride_mh, D: tl.constexpr):
        bh = tl.program_id(0)                     # one (sequence, KV head): its new key and value row
        b = bh // Hkv
        h = bh % Hkv
        row = tl.load(ROWS + bh).to(tl.int64)
        d = tl.arange(0, D)
        kn = tl.load(KN + b * stride_nb + h * stride_nh + d)
        vn = tl.load(VN + b * stride_mb + h * stride_mh + d)
        tl.store(K + b.to(tl.int64) * stride_kb + row * stride_kt + d, kn)
        tl.store(V + b.to(tl.int64) * stride_vb + row * stride_vt + d, vn)


def append_kv(keys, values, k, v, rows) -> None:
    """keys[b, rows[b, h]] = k[b, h] (and the same for values) in one launch: the decode append
    of every (sequence, KV head) (two index_put_ take four launches and copies).

    keys/values: [B, T, D]; k, v: [B, Hkv, D] (any strides but a contiguous last dim);
    rows: int64 [B, Hkv] contiguous (CompressedKV.begin)."""
    B, Hkv, D = k.shape
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    rows = rows.contiguous()
    _append_kernel[(B * Hkv,)](keys, values, k, v, rows, Hkv, keys.stride(0), keys.stride(1), values.stride(0),
                               values.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), D=D)


BLOCK_N = 64                 # the decode kernel's tile of slots (scripts/decode_sweep.py)
# Programs of the default tile (BLOCK_N=64, 8 warps, 3 stages) that run at once per SM, as
# scripts/decode_sweep.py measured on the H200 (the split count that fits waves of this size wins).
_RESIDENT_PER_SM = 3


def split_count(heads: int, slots: int, block_n: int, sms: int) -> int:
    """Splits of a head of `slots` slots under the wave model of `chunk_tiles` (heads: sequences x
    KV heads, all of that width)."""
    tiles = max(1, math.ceil(slots / block_n))
    return math.ceil(tiles / chunk_tiles([tiles] * heads, 1, sms))


def chunk_tiles(tiles: list[int], batch: int, sms: int) -> int:
    """Tiles per work item that minimise a wave model of the kernel's time: waves of resident
    programs (batch x items, _RESIDENT_PER_SM per SM) x (an item's tiles + 2 tiles of fixed cost:
    its start and its share of the merge). tiles: each KV head's tiles.

    Measured (scripts/decode_sweep.py, H200, uniform 8216 slots): it picks the best split count, or
    one within 1% of it or unmeasured between such, at batch 8 and 32 with 8 KV heads and batch 1,
    27 and 49 with 32 (tests/test_decode_kernel.py), where "fill the GPU twice" was up to 14%
    slower. Items of one size serve heads of any width alike (a plan's heads differ), where a
    fixed number of splits per head makes the widest heads' programs the tail."""
    return _chunk_tiles(tuple(tiles), batch, sms)


@functools.lru_cache(maxsize=256)
def _chunk_tiles(tiles: tuple, batch: int, sms: int) -> int:
    resident = _RESIDENT_PER_SM * sms
    top = max(tiles)

    def cost(c):
        items = sum(-(-t // c) for t in tiles)
        return -(-batch * items // resident) * (c + 2)

    # the chunk sizes that cut the widest head into 1..128 items
    return min({-(-top // s) for s in range(1, 129)}, key=lambda c: (cost(c), -c))


def work_items(slots, block_n: int, batch: int = 1, sms: int | None = None, splits: int | None = None):
    """The decode kernel's work items for heads of `slots` slots each (host ints [Hkv]): every
    head's slots cut into pieces of whole tiles, of one size (chunk_tiles) or, with `splits`, into
    that many pieces per head. Returns (work int32 [3, P]: head, lo, hi of each item; first
    int32 [Hkv + 1]: head h's items are first[h]..first[h + 1] - 1), numpy."""
    slots = np.asarray(slots, dtype=np.int64)
    tiles = np.maximum(1, -(-slots // block_n))
    if splits is not None:
        per = [int(-(-t // splits)) * block_n for t in tiles]     # slots per item, by head
    else:
        c = chunk_tiles([int(t) for t in tiles], batch, sms or 4) * block_n
        per = [c] * len(slots)
    head, lo, hi, first = [], [], [], [0]
    for h, (n, step) in enumerate(zip(slots, per)):
        starts = list(range(0, max(int(n), 1), step))
        head += [h] * len(starts)
        lo += starts
        hi += [min(x + step, int(n)) for x in starts]
        first.append(len(head))
    return np.array([head, lo, hi], dtype=np.int32), np.array(first, dtype=np.int32)


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for anything else: the interpreter's stand-in)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def packed_decode_attention(q, keys, values, off, cap, s0: int, sink: int, span, n, scale=None,
                            work=None, num_splits: int | None = None, block_n: int = BLOCK_N,
                            num_warps: int = 8, num_stages: int = 3):
    """Triton decode attention over a packed cache.

    q: [B, Hq, D] (one query per sequence, at position n - 1, already written to the cache);
    keys/values: [B, T, D] (row stride may differ from D, last dim contiguous);
    off, cap: int32/int64 [Hkv] on q's device; span: int64 [B, Hq]; n: int64 [B];
    work: (work int32 [3, P], first int32 [Hkv + 1]) on q's device, from `work_items` for these
    heads and this batch (CompressedKV keeps one per layer, so a step needs no device sync);
    None builds it here from cap (a device sync), with num_splits pieces per head if given.
    Returns [B, Hq, D] in q's dtype.

    Defaults (BLOCK_N=64, 8 warps, 3 stages, chunk_tiles) from scripts/decode_sweep.py on the
    H200: 1.02-1.03x the HBM bound at batch 32 (Llama-3-8B shape, 16k), where the earlier 128 /
    4 / 2 and "fill the GPU twice" took 1.37x (BENCHMARKS.md, issue 18).
    """
    if triton is None:
        raise RuntimeError("packed_decode_attention needs Triton; use packed_decode_reference")
    B, Hq, D = q.shape
    Hkv = off.shape[0]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the decode kernel, got {D}")
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if work is None:
        w, f = work_items(s0 + cap.cpu().numpy(), block_n, B, sm_count(q.device), num_splits)
        work = (torch.as_tensor(w, device=q.device), torch.as_tensor(f, device=q.device))
    table, first = work
    P = table.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    span = span.contiguous()
    po = torch.empty(B * P * G, D, dtype=torch.float32, device=q.device)
    pl = torch.empty(B * P * G, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(P, B)](
        q, keys, values, off, cap, span, n, table, po, pl,
        s0, sink, scale, P, Hq,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _decode_combine_kernel[(B * Hq,)](po, pl, out, first, P, Hq, G=G, D=D)
    return out


__all__ = ["slot_positions", "head_of_slot", "packed_attention_reference", "packed_decode_reference",
           "packed_decode_attention", "append_kv", "split_count", "chunk_tiles", "work_items", "sm_count"]
