"""Hopper prefill kernel (Gluon): the block-sparse sink + window forward of kernels/prefill.py,
written with explicit TMA, mbarriers, warp specialization and asynchronous warpgroup MMAs so
that the softmax of one key block runs while the tensor cores multiply the previous block's P
by V.

Same contract, same visited blocks (kernels/blocks.py:_key_blocks, compiled into this kernel
too, through _item_blocks), same token masks; the oracle is kernels/reference.py. What differs
is the schedule. One persistent program per SM loops over (query block of 128 rows, batch *
head) work items, last query blocks first, each taking the next item no program has taken yet
(an atomic counter). Inside it, three partitions talk through mbarriers:

    producer     1 warp: TMA the item's Q (two 64-row halves), then its K/V blocks into a
                 ring of STAGES shared-memory slots, each once both consumers released it;
                 it runs on into the next item while the consumers finish this one
    consumer x2  1 warpgroup each, 64 query rows of the item:
                   S0 = Q K0^T; softmax(S0) -> P0
                   block t:  issue S_t = Q K_t^T and O += P_{t-1} V_{t-1} (async);
                             wait for S_t only -> softmax(S_t) -> P_t   (while P V runs)
                             wait for P V, release slot t-1, O *= alpha_t
                   O += P_last V_last; O / l; store O (and the row log-sum-exp)

Two things keep the edge blocks cheap, which at 16k and 25% density are a fifth of the blocks
(measured: without any token mask that case ran 8-10% faster, BENCHMARKS.md):
- the token mask of each block applies only the terms that can drop a pair there
  (kernels/prefill.py:_token_mask, one compare on a window edge);
- a sink block whose kept keys fit in its first half (sink 64) is multiplied at half width.

Triton's own pipeliner on kernels/prefill.py waits for every MMA before the softmax (profiled on
the H100: its tensor pipe is busy 57% of the time on a dense layer; this kernel's 73%); this is
FlashAttention-3's producer/consumer structure with its intra-warpgroup overlap. sm_90 only
(bf16/fp16, head_dim 64/128, 16-byte aligned q/k/v): Gluon has no interpreter, so the CPU suite
checks kernels/prefill.py and the GPU suite checks this kernel against the same reference.
Before timing a change, scripts/gluon_compile.py (no GPU needed) shows its registers, spills and
whether ptxas serialized the MMAs (at the 168-register cap a second live S/P/acc set does that).
"""
from __future__ import annotations

import torch
import triton

try:  # Gluon is experimental and GPU-only; the package must import without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

from .blocks import LOG2E
from .blocks import _block_start as _block_start_tl
from .blocks import _item_blocks as _item_blocks_tl
from .blocks import _mask_kind as _mask_kind_tl
from .blocks import _sink_fits as _sink_fits_tl
from .blocks import _token_mask as _token_mask_tl
from .decode import sm_count

if HAVE_GLUON:
    # the block ranges, visit order and token masks of kernels/prefill.py compiled as Gluon: one
    # definition of each, checked on the CPU (tests/test_prefill_visit.py)
    _item_blocks = gluon.jit(_item_blocks_tl.fn)
    _block_start = gluon.jit(_block_start_tl.fn)
    _mask_kind = gluon.jit(_mask_kind_tl.fn)
    _sink_fits = gluon.jit(_sink_fits_tl.fn)
    _token_mask = gluon.jit(_token_mask_tl.fn)

    @gluon.constexpr_function
    def _mma_layout(n, num_warps):
        """wgmma accumulator layout [rows, n]: 16 rows per warp, warps stacked along the rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _softmax(s, m_i, l_i, n, kind, st, en, span, sink, q_pos, qk_scale,
                 BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Online-softmax step on raw scores s [BLOCK_M, BLOCK_N] (fp32, wgmma layout).

        Returns p (unnormalised, fp32), alpha = exp2(m_old - m_new) and the updated (l, m).
        On edge blocks (kind > 0, _mask_kind) the dropped pairs are -inf first (_token_mask).
        """
        if kind != 0:
            k_pos = n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)) - st
            s = _token_mask(s, kind, k_pos, q_pos, en - st, span, sink)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # a row with nothing kept so far keeps m = -inf; shift by 0 then so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, l_i, m_new

    @gluon.jit
    def _softmax_half(sh, m_i, l_i, n, kind, st, en, span, sink, q_pos, qk_scale, HN: gl.constexpr,
                      sh_layout: gl.constexpr, row_s: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr):
        """_softmax on a half block's scores sh [ROWS, HN]; the row statistics come and go in
        the full block's row layout (the same rows: 16 a warp either way), P as the P V operand."""
        row_sh: gl.constexpr = gl.SliceLayout(1, sh_layout)
        p, alpha, l_h, m_h = _softmax(sh, gl.convert_layout(m_i, row_sh), gl.convert_layout(l_i, row_sh), n, kind,
                                      st, en, span, sink, gl.convert_layout(q_pos, row_sh), qk_scale, HN, sh_layout)
        return (gl.convert_layout(p.to(dtype), p_layout), gl.convert_layout(alpha, row_s),
                gl.convert_layout(l_h, row_s), gl.convert_layout(m_h, row_s))

    @gluon.jit
    def _tile(tile, Nq, Nk, Hq, G, BH, START, END, SPAN, sink,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """Work item number `tile` and the key blocks it visits: the ranges of kernels/prefill.py,
        counted as c_sink sink blocks | leading edge up to c_edge | c_int interior | the diagonal
        up to T. Items go last query block first, then (batch, head) in natural order: the
        programs running side by side share a GQA group's K/V blocks in L2 (an order sorted by
        window length was measured slower, BENCHMARKS.md)."""
        mb = gl.cdiv(Nq, BLOCK_M) - 1 - tile // BH
        bh = tile % BH
        b = bh // Hq
        h = bh % Hq
        st = gl.load(START + b).to(gl.int32)
        en = gl.load(END + b).to(gl.int32)
        span = gl.load(SPAN + bh).to(gl.int32)
        off = Nk - Nq
        q_row = mb * BLOCK_M
        sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_int, T = _item_blocks(
            off + q_row, off + q_row + BLOCK_M - 1, st, en, span, sink, Nk, BLOCK_N)
        return b, h, bh, q_row, st, en, span, off, T, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi

    @gluon.jit
    def _producer(QD, KD, VD, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, tile_smem, COUNTER,
                  Nq, Nk, Hq, G, BH, START, END, SPAN, sink, num_tiles,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr):
        """One warp, over this program's tiles: write the tile's number to tile_smem and TMA its two
        64-row Q halves into Q buffer j % Q_BUFS (both signal q_ready), then its K/V blocks into the
        ring (global block counter g, slot g % STAGES), each once both consumers have released what
        last used the buffer. It runs ahead into the next tile while the consumers finish this
        one, so no tile waits for its first loads.

        Tiles are handed out dynamically: a program's first tile is its program id, each next one
        the next that no program has taken (an atomic counter, taken once this tile's last K/V
        load is issued, so about STAGES blocks before the consumers need it). A static round-robin
        left programs 2-4% apart in work at 16k (every 132nd tile lands on the same program: with
        32 heads, always the same eighth of them); dynamically the busiest program has within 0.2%
        of the mean work (scripts/block_waste.py). Measured on the H100: dense 2% faster at 16k and
        9% at 32k, the sparse cases unchanged within the noise (BENCHMARKS.md, "Prefill kernel")."""
        one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        g = 0
        j = 0
        tile = gl.program_id(0)
        while tile < num_tiles:
            b, h, bh, q_row, st, en, span, off, T, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi = _tile(
                tile, Nq, Nk, Hq, G, BH, START, END, SPAN, sink, BLOCK_M, BLOCK_N)
            qb = j % Q_BUFS
            # a fresh barrier counts as "phase 1 complete": the first waits on each pass at once
            mbarrier.wait(q_empty.index(qb), ((j // Q_BUFS) & 1) ^ 1)
            # every lane stores, so the arrive below (by one lane) releases its own store
            tile_smem.index(qb).store(gl.full([1], tile, gl.int32, one))
            mbarrier.expect(q_ready.index(qb), 2 * QD.block_type.nbytes)
            tma.async_copy_global_to_shared(QD, [b, h, q_row, 0], q_ready.index(qb), q_smem.index(2 * qb))
            tma.async_copy_global_to_shared(QD, [b, h, q_row + QD.block_type.shape[2], 0], q_ready.index(qb),
                                            q_smem.index(2 * qb + 1))
            kvh = h // G
            for t in range(T):
                slot = (g + t) % STAGES
                mbarrier.wait(empty.index(slot), (((g + t) // STAGES) & 1) ^ 1)
                n = _block_start(t, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi, BLOCK_N)
                bar = ready.index(slot)
                mbarrier.expect(bar, KD.block_type.nbytes + VD.block_type.nbytes)
                tma.async_copy_global_to_shared(KD, [b, kvh, n, 0], bar, k_smem.index(slot))
                tma.async_copy_global_to_shared(VD, [b, kvh, n, 0], bar, v_smem.index(slot))
            g += T
            j += 1
            # the first num_programs tiles went out by program id; the counter counts the rest
            tile = gl.atomic_add(COUNTER, 1, sem="relaxed") + gl.num_programs(0)
        # no tile left: tell the consumers (a tile number past the end, and no Q)
        qb = j % Q_BUFS
        mbarrier.wait(q_empty.index(qb), ((j // Q_BUFS) & 1) ^ 1)
        tile_smem.index(qb).store(gl.full([1], num_tiles, gl.int32, one))
        mbarrier.arrive(q_ready.index(qb), count=1)

    @gluon.jit
    def _next_tile(j, q_ready, tile_smem, Q_BUFS: gl.constexpr):
        """The consumers' j-th tile, as the producer announced it with its Q (num_tiles: none)."""
        qb = j % Q_BUFS
        mbarrier.wait(q_ready.index(qb), (j // Q_BUFS) & 1)
        return gl.max(tile_smem.index(qb).load(gl.BlockedLayout([1], [32], [4], [0])), 0)

    @gluon.jit
    def _consumer(O, LSE, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, tile_smem,
                  Nq, Nk, Hq, G, BH, START, END, SPAN, sink, num_tiles, qk_scale, sob, soh, son,
                  HALF: gl.constexpr, D: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, Q_BUFS: gl.constexpr, WRITE_LSE: gl.constexpr):
        """One warpgroup, over this program's tiles: rows [q_row + HALF*ROWS, +ROWS) of each."""
        dtype: gl.constexpr = k_smem.dtype
        s_layout: gl.constexpr = _mma_layout(BLOCK_N, 4)   # S, P: [ROWS, BLOCK_N]
        o_layout: gl.constexpr = _mma_layout(D, 4)         # O: [ROWS, D]
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        HN: gl.constexpr = BLOCK_N // 2                   # a half block: a sink of up to HN keys
        sh_layout: gl.constexpr = _mma_layout(HN, 4)
        sh_zero = gl.zeros([ROWS, HN], gl.float32, sh_layout)

        g = 0
        j = 0
        tile = _next_tile(0, q_ready, tile_smem, Q_BUFS)
        while tile < num_tiles:
            b, h, bh, q_row, st, en, span, off, T, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi = _tile(
                tile, Nq, Nk, Hq, G, BH, START, END, SPAN, sink, 2 * ROWS, BLOCK_N)
            r0 = q_row + HALF * ROWS
            rows = r0 + gl.arange(0, ROWS, layout=row_s)
            q_pos = off + rows - st
            m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
            l_i = gl.zeros([ROWS], gl.float32, row_s)
            acc = gl.zeros([ROWS, D], gl.float32, o_layout)
            p = gl.zeros([ROWS, BLOCK_N], dtype, p_layout)
            qb = j % Q_BUFS
            q_s = q_smem.index(2 * qb + HALF).reshape([ROWS, D])  # its Q landed (_next_tile)

            # Block 0: scores and softmax only (no P V yet). A sink block whose kept keys all lie
            # in its first HN keys is multiplied at half width (S and P V at N = HN): with sink 64
            # and 128-key blocks that is half a block less per item (kept / computed pairs at
            # 16k / 25%: 0.906 -> 0.929, BENCHMARKS.md). Its P has another shape than the loop's,
            # so that path also runs block 1 here.
            t_first = 1
            n0 = _block_start(0, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi, BLOCK_N)
            if T > 0:
                mbarrier.wait(ready.index(g % STAGES), (g // STAGES) & 1)
                if _sink_fits(c_sink, st, sink, a, sink_lo, HN):  # then T >= 2 (the diagonal follows)
                    k_sink = k_smem.index(g % STAGES).reshape([BLOCK_N, D]).slice(0, HN).permute((1, 0))
                    sh_tok = warpgroup_mma(q_s, k_sink, sh_zero, use_acc=False, is_async=True)
                    sh = warpgroup_mma_wait(0, deps=(sh_tok,))
                    ph, alpha, l_i, m_i = _softmax_half(sh, m_i, l_i, n0, 1, st, en, span, sink, q_pos, qk_scale,
                                                        HN, sh_layout, row_s, p_layout, dtype)
                    slot = (g + 1) % STAGES
                    mbarrier.wait(ready.index(slot), ((g + 1) // STAGES) & 1)
                    k_t = k_smem.index(slot).reshape([BLOCK_N, D]).permute((1, 0))
                    s_tok = warpgroup_mma(q_s, k_t, s_zero, use_acc=False, is_async=True)
                    v_sink = v_smem.index(g % STAGES).reshape([BLOCK_N, D]).slice(0, HN)
                    acc_tok = warpgroup_mma(ph, v_sink, acc, is_async=True)
                    s = warpgroup_mma_wait(1, deps=(s_tok,))
                    n = _block_start(1, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi, BLOCK_N)
                    p32, alpha, l_i, m_i = _softmax(s, m_i, l_i, n, _mask_kind(1, n, c_sink, c_edge, c_int, st, sink),
                                                    st, en, span, sink, q_pos, qk_scale, BLOCK_N, s_layout)
                    acc = warpgroup_mma_wait(0, deps=(acc_tok,))
                    mbarrier.arrive(empty.index(g % STAGES), count=1)
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                    t_first = 2
                else:
                    k0 = k_smem.index(g % STAGES).reshape([BLOCK_N, D]).permute((1, 0))
                    s_tok = warpgroup_mma(q_s, k0, s_zero, use_acc=False, is_async=True)
                    s = warpgroup_mma_wait(0, deps=(s_tok,))
                    p32, alpha, l_i, m_i = _softmax(s, m_i, l_i, n0, _mask_kind(0, n0, c_sink, c_edge, c_int, st, sink),
                                                    st, en, span, sink, q_pos, qk_scale, BLOCK_N, s_layout)
                p = gl.convert_layout(p32.to(dtype), p_layout)

            for t in range(t_first, T):
                slot = (g + t) % STAGES
                prev = (g + t - 1) % STAGES
                mbarrier.wait(ready.index(slot), ((g + t) // STAGES) & 1)
                k_t = k_smem.index(slot).reshape([BLOCK_N, D]).permute((1, 0))
                s_tok = warpgroup_mma(q_s, k_t, s_zero, use_acc=False, is_async=True)
                v_prev = v_smem.index(prev).reshape([BLOCK_N, D])
                acc_tok = warpgroup_mma(p, v_prev, acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok,))  # S_t done; P_{t-1} V_{t-1} may still run
                n = _block_start(t, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi, BLOCK_N)
                kind = _mask_kind(t, n, c_sink, c_edge, c_int, st, sink)
                p32, alpha, l_i, m_i = _softmax(s, m_i, l_i, n, kind, st, en, span, sink, q_pos, qk_scale,
                                                BLOCK_N, s_layout)
                acc = warpgroup_mma_wait(0, deps=(acc_tok,))
                mbarrier.arrive(empty.index(prev), count=1)  # this warpgroup is done with block t-1
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                p = gl.convert_layout(p32.to(dtype), p_layout)

            if T > 0:  # the last block's P V
                last = (g + T - 1) % STAGES
                acc_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, D]), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc_tok,))
                mbarrier.arrive(empty.index(last), count=1)
            mbarrier.arrive(q_empty.index(qb), count=1)  # every S of this tile is done with Q
            g += T
            j += 1

            # --- padding rows and rows with nothing kept: zeros and lse -inf
            ok = (rows < Nq) & (q_pos >= 0) & (off + rows < en) & (l_i > 0)
            l_safe = gl.where(ok, l_i, 1.0)
            inv = gl.convert_layout(gl.where(ok, 1.0 / l_safe, 0.0), row_o)
            out = acc * gl.expand_dims(inv, 1)
            rows_o = r0 + gl.arange(0, ROWS, layout=row_o)
            d_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            o_ptrs = (O + b.to(gl.int64) * sob + h.to(gl.int64) * soh
                      + gl.expand_dims(rows_o, 1) * son + gl.expand_dims(d_o, 0))
            gl.store(o_ptrs, out.to(dtype), mask=gl.expand_dims(rows_o < Nq, 1))
            if WRITE_LSE:
                lse = gl.where(ok, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
                gl.store(LSE + bh.to(gl.int64) * Nq + rows, lse, mask=rows < Nq)
            tile = _next_tile(j, q_ready, tile_smem, Q_BUFS)

    @gluon.jit
    def _hopper_fwd(O, LSE, SPAN, START, END, COUNTER, QD, KD, VD,
                    qk_scale, sink, Nq, Nk, Hq, G, BH, sob, soh, son,
                    D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr,
                    WRITE_LSE: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        """Persistent: program p runs tile p of the (query block, head) list, then whichever tiles
        are left when it asks (COUNTER: an int32 zero at launch)."""
        ROWS: gl.constexpr = QD.block_type.shape[2]   # rows per consumer warpgroup (64)
        BLOCK_M: gl.constexpr = 2 * ROWS
        num_tiles = gl.cdiv(Nq, BLOCK_M) * BH
        # shared memory: Q of Q_BUFS tiles (two halves each), a ring of STAGES K/V slots, barriers
        q_smem = gl.allocate_shared_memory(QD.dtype, [2 * Q_BUFS] + QD.block_type.shape, QD.layout)
        k_smem = gl.allocate_shared_memory(KD.dtype, [STAGES] + KD.block_type.shape, KD.layout)
        v_smem = gl.allocate_shared_memory(VD.dtype, [STAGES] + VD.block_type.shape, VD.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        tile_smem = gl.allocate_shared_memory(gl.int32, [Q_BUFS, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        for i in gl.static_range(Q_BUFS):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer warpgroup
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)

        gl.warp_specialize([
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, tile_smem,
                         Nq, Nk, Hq, G, BH, START, END, SPAN, sink, num_tiles, qk_scale, sob, soh, son,
                         0, D, ROWS, BLOCK_N, STAGES, Q_BUFS, WRITE_LSE)),
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, tile_smem,
                         Nq, Nk, Hq, G, BH, START, END, SPAN, sink, num_tiles, qk_scale, sob, soh, son,
                         1, D, ROWS, BLOCK_N, STAGES, Q_BUFS, WRITE_LSE)),
            (_producer, (QD, KD, VD, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, tile_smem, COUNTER,
                         Nq, Nk, Hq, G, BH, START, END, SPAN, sink, num_tiles, BLOCK_M, BLOCK_N, STAGES, Q_BUFS)),
        ], [4, 1], [CONSUMER_REGS, 24])


# ----------------------------------------------------------------------------- launcher

# (BLOCK_N, STAGES, Q_BUFS) by head_dim; a program is 2 consumer warpgroups of 64 query rows.
# From the H100 sweeps in BENCHMARKS.md: 128-key blocks with 3 stages beat 64-key blocks with
# 4-5 stages on every case, narrow windows included (the edge blocks cost less than the extra
# barrier round trips); at head_dim 128 that fills shared memory with one Q buffer.
CONFIG = {128: (128, 3, 1), 64: (128, 4, 2)}
ROWS = 64


def supported(q, k, v) -> bool:
    """Whether this kernel can run these tensors (else use kernels/prefill.py)."""
    if not HAVE_GLUON or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in CONFIG:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in (q, k, v))


def hopper_prefill(q, k, v, span, start, end, sink: int, scale: float, out, lse, write_lse: bool,
                   persistent: bool = True,
                   config=None, consumer_regs: int = 232, maxnreg: int = 168):
    """Launch on checked, prepared arguments (kernels/prefill.py:sparse_attention_prefill does that).

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] (bf16/fp16, unit last stride, 16-B aligned), span int64
    [B,Hq], start/end int64 [B], out [B,Hq,Nq,D], lse fp32 [B,Hq,Nq] (or any tensor when not
    write_lse). persistent: one program per SM, each looping over work items, taking the next free
    one (the producer loads the next item's blocks while the consumers finish this one); False:
    one program per work item, scheduled by the GPU.
    config: (BLOCK_N, STAGES, Q_BUFS); registers: per consumer thread after the producer gives its up.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    bn, stages, q_bufs = config or CONFIG[D]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(t, rows):
        box = [1, 1, rows, D]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box, gl.NVMMASharedLayout.get_default_for(box, gdt))

    BH = B * Hq
    num_tiles = triton.cdiv(Nq, 2 * ROWS) * BH
    grid = (min(num_tiles, sm_count(q.device)) if persistent else num_tiles,)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)  # the items handed out so far
    _hopper_fwd[grid](out, lse, span, start, end, counter, desc(q, ROWS), desc(k, bn), desc(v, bn),
                      scale * LOG2E, int(sink), Nq, Nk, Hq, Hq // Hkv, BH, out.stride(0), out.stride(1), out.stride(2),
                      D=D, BLOCK_N=bn, STAGES=stages, Q_BUFS=q_bufs, WRITE_LSE=write_lse, CONSUMER_REGS=consumer_regs,
                      num_warps=4, maxnreg=maxnreg)
    return out
