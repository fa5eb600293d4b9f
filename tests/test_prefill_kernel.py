"""The Triton prefill kernel equals the PyTorch reference (kernels/reference.py).

CPU: under TRITON_INTERPRET=1 (set by conftest), fp16/fp32, tiny shapes; block shapes are
pinned small so that every phase of the kernel (sink blocks, window edge, unmasked interior,
diagonal, padding, tails) runs at these sizes. GPU (marked): bf16 at realistic sizes with
the autotuned configs (TMA loads by default on Hopper, pointers forced), and a model with a
plan applied (its sparse layers through the kernel, its dense layers through SDPA).

Every output buffer is poisoned with NaN before the run, so an element the kernel forgets
to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from moa_search.kernels.reference import sparse_attention_reference


def _prefill():
    from moa_search.kernels import prefill  # imports triton: keep it out of collection

    return prefill


@pytest.fixture
def CALLS(monkeypatch):
    """Launches counted by wrapping the launch seams: "gluon" the Hopper kernel, "kernel" any
    prefill kernel (Gluon or Triton)."""
    from collections import Counter

    prefill = _prefill()
    seen = Counter()
    hopper, launch = prefill.prefill_hopper.hopper_prefill, prefill._launch

    def counted_hopper(*a, **kw):
        seen["gluon"] += 1
        seen["kernel"] += 1
        return hopper(*a, **kw)

    def counted_launch(*a, **kw):
        seen["kernel"] += 1
        return launch(*a, **kw)

    monkeypatch.setattr(prefill.prefill_hopper, "hopper_prefill", counted_hopper)
    monkeypatch.setattr(prefill, "_launch", counted_launch)
    return seen


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, device="cpu", seed=None):
    g = torch.Generator(device="cpu").manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q = torch.randn(B, Hq, Nq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(device, dtype)
    return q, k, v


def _run_and_compare(q, k, v, sink, span, start=None, end=None, scale=None, tol=None, **kw):
    """Kernel (poisoned outputs) vs the float32 reference on the same inputs; returns the kernel's result."""
    prefill = _prefill()
    B, Hq, Nq, D = q.shape
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, Nq), float("nan"), dtype=torch.float32, device=q.device)
    o, l = prefill.sparse_attention_prefill(q, k, v, sink, span, start, end, scale, return_lse=True,
                                            out=out, lse_out=lse, **kw)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    ro, rl = sparse_attention_reference(q.float(), k.float(), v.float(), sink, span, start, end, scale, return_lse=True)
    assert not torch.isnan(o).any(), "kernel left elements unwritten (NaN poison survived)"
    assert not torch.isnan(l).any(), "kernel left lse elements unwritten"
    tol = tol if tol is not None else {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[q.dtype]
    err = (o.float() - ro).norm() / ro.norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.2e} > {tol:.0e}"
    assert (o.float() - ro).abs().max() < 20 * tol * ro.abs().max().clamp_min(1e-6)
    # lse: -inf exactly where the reference has no kept key, close elsewhere
    assert torch.equal(torch.isinf(l), torch.isinf(rl))
    fin = torch.isfinite(rl)
    if fin.any():
        assert (l[fin] - rl[fin]).abs().max() < 50 * tol, f"lse differs by {(l[fin] - rl[fin]).abs().max():.2e}"
    return o, l


# ----------------------------------------------------------------------------- CPU (interpreter)

BLOCKS = [(32, 16), (16, 32)]  # BLOCK_M != BLOCK_N both ways: edges never line up by accident


@pytest.mark.parametrize("n,group,d,dtype", [
    (100, 1, 16, torch.float32),   # tail: 100 is no multiple of 16 or 32
    (131, 2, 32, torch.float16),
    (200, 4, 64, torch.float16),
    (77, 4, 32, torch.float32),
])
@pytest.mark.parametrize("blocks", BLOCKS)
def test_heterogeneous_spans_tails_gqa(n, group, d, dtype, blocks):
    hkv = 2
    hq = hkv * group
    q, k, v = _inputs(1, hq, hkv, n, n, d, dtype)
    # one head per case: span 1, a local window, a window reaching past the sink, dense (span > N)
    span = torch.tensor([[1, 9, n // 2, n + 50, 33, 64, 2, n][:hq]])
    _run_and_compare(q, k, v, 8, span, block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_with_padding(padding):
    n, d = 150, 32
    q, k, v = _inputs(2, 4, 2, n, n, d, torch.float16)
    if padding == "left":   # as generate() produces: real tokens at the end
        start, end = torch.tensor([0, 43]), torch.tensor([n, n])
    else:
        start, end = torch.tensor([0, 0]), torch.tensor([n, 101])
    lengths = end - start
    span = torch.stack([torch.tensor([5, 40, 70, 200]), torch.tensor([3, 17, 60, 1])])
    assert (span[:, 2] < lengths).all()
    o, l = _run_and_compare(q, k, v, 4, span, start, end, block_m=32, block_n=16)
    pad_rows = torch.arange(n)[None, :] < start[:, None] if padding == "left" else torch.arange(n)[None, :] >= end[:, None]
    assert (o.float().abs().sum(-1).permute(1, 0, 2)[:, pad_rows] == 0).all(), "padding rows must be zeros"
    assert torch.isneginf(l.permute(1, 0, 2)[:, pad_rows]).all()


@pytest.mark.parametrize("sink,spans", [
    (40, [1, 3, 10, 39]),        # sink > span: the sink blocks run on their own
    (0, [1, 7, 150, 500]),       # no sink; span > N
    (5, [1, 1, 1, 1]),           # span = 1: diagonal + sink only
])
def test_sink_and_span_extremes(sink, spans):
    q, k, v = _inputs(1, 4, 1, 120, 120, 16, torch.float32)
    _run_and_compare(q, k, v, sink, torch.tensor([spans]), block_m=16, block_n=16)


@pytest.mark.parametrize("nq", [1, 5, 37])
def test_queries_are_the_last_of_the_keys(nq):
    """Decode-like calls: Nq < Nk, queries at positions Nk-Nq .. Nk-1 (with left padding)."""
    nk = 140
    q, k, v = _inputs(2, 4, 2, nq, nk, 32, torch.float16)
    span = torch.tensor([[1, 12, 50, 300], [20, 64, 2, 90]])
    _run_and_compare(q, k, v, 6, span, torch.tensor([0, 25]), torch.tensor([nk, nk]), block_m=16, block_n=32)


def test_tensor_descriptor_variant():
    """The TMA path (K/V through tensor descriptors, zero fill past Nk) computes the same."""
    q, k, v = _inputs(2, 4, 2, 70, 110, 32, torch.float16)
    span = torch.tensor([[1, 12, 50, 300], [20, 64, 2, 90]])
    _run_and_compare(q, k, v, 6, span, torch.tensor([0, 9]), torch.tensor([110, 100]), block_m=32, block_n=16,
                     use_tma=True)


def test_strided_inputs_and_custom_scale():
    """transformers hands over q as a transposed [B, N, H, D] view; the kernel reads strides."""
    n = 90
    q4 = torch.randn(1, n, 4, 32, dtype=torch.float16)
    k4 = torch.randn(1, n, 2, 32, dtype=torch.float16)
    v4 = torch.randn(1, n, 2, 32, dtype=torch.float16)
    q, k, v = q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)
    assert not q.is_contiguous()
    _run_and_compare(q, k, v, 3, torch.tensor([[4, 30, 91, 12]]), scale=0.05, block_m=32, block_n=32)


def test_head_dim_not_a_power_of_two():
    """head_dim 24 (e.g. 80 or 96 in real models) runs zero-padded to the next power of 2."""
    q, k, v = _inputs(1, 4, 2, 60, 60, 24, torch.float16)
    _run_and_compare(q, k, v, 4, torch.tensor([[3, 20, 61, 9]]), block_m=16, block_n=16)


def test_bad_input_is_refused_with_a_clear_error():
    prefill = _prefill()
    q, k, v = _inputs(1, 3, 2, 10, 10, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill.sparse_attention_prefill(q, k, v, 1, torch.ones(1, 3, dtype=torch.long))
    q, k, v = _inputs(1, 2, 1, 10, 10, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="span must be"):
        prefill.sparse_attention_prefill(q, k, v, 1, torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="use_gluon=True needs an sm_90 GPU"):
        prefill.sparse_attention_prefill(q, k, v, 1, torch.ones(1, 2, dtype=torch.long), use_gluon=True)


def test_backend_dispatch_by_device_and_choice():
    from moa_search import attention

    rule = attention.LayerRule(sink=4, alpha=torch.zeros(2, dtype=torch.float64), beta=torch.ones(2, dtype=torch.float64))
    assert {"triton", "cpu_window", "reference"} <= set(attention.BACKENDS)
    assert attention.pick_backend(rule, torch.zeros(1, 2, 3, 16)) == "cpu_window"   # CPU never needs triton
    rule.backend = "reference"
    assert attention.pick_backend(rule, torch.zeros(1, 2, 3, 16)) == "reference"


def test_registered_triton_backend_takes_the_width_hint():
    """The "triton" entry of the backend registry, as attention.attend calls it (with width=),
    runs the kernel (interpreted here) and matches the reference."""
    from moa_search import attention

    q, k, v = _inputs(1, 4, 2, 50, 50, 16, torch.float32, seed=3)
    span, start, end = torch.tensor([[3, 9, 50, 20]]), torch.tensor([0]), torch.tensor([50])
    assert "triton" in attention._TAKES_HINTS
    o = attention.BACKENDS["triton"](q, k, v, 2, span, start, end, 0.25, width=0.1)
    ref = sparse_attention_reference(q, k, v, 2, span, start, end, 0.25)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- GPU


def _llama3_like_spans(n, hq=32, group=4, seed=0):
    """Half the KV groups local (fixed 256..2048 windows), half wide (0.3N..N)."""
    g = torch.Generator().manual_seed(seed)
    hkv = hq // group
    local = torch.randint(256, 2049, (hkv // 2,), generator=g)
    wide = (torch.rand(hkv - hkv // 2, generator=g) * 0.7 + 0.3) * n
    per_kv = torch.cat([local, wide.long()])[torch.randperm(hkv, generator=g)]
    return per_kv.repeat_interleave(group)[None, :]


@pytest.mark.gpu
@pytest.mark.parametrize("n,use_tma", [(4096, None), (8192, False), (8192, None)])
def test_gpu_bf16_realistic(n, use_tma):
    # the Triton kernel (use_gluon=False); the Hopper kernel has its own tests below
    q, k, v = _inputs(1, 32, 8, n, n, 128, torch.bfloat16, device="cuda")
    span = _llama3_like_spans(n).cuda()
    _run_and_compare(q, k, v, 64, span, use_tma=use_tma, use_gluon=False)


def _hopper_or_skip():
    from moa_search.kernels import prefill_hopper

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or not prefill_hopper.HAVE_GLUON:
        pytest.skip("the Gluon kernel needs an sm_90 GPU and Triton's Gluon")
    return prefill_hopper


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("persistent", [True, False])  # one program per SM / per work item
def test_gpu_hopper_kernel_padding_gqa_tails(dtype, d, persistent, CALLS):
    prefill = _prefill()
    _hopper_or_skip()
    n = 3000  # no multiple of any block: tails in queries and keys
    q, k, v = _inputs(2, 16, 4, n, n, d, dtype, device="cuda")
    span = torch.stack([_llama3_like_spans(2000, 16)[0], _llama3_like_spans(2900, 16, seed=1)[0]]).cuda()
    span[0, :3] = torch.tensor([1, 5, n])  # one-token window, tiny window, full span
    before = CALLS["gluon"]
    o, _ = _run_and_compare(q, k, v, 64, span, torch.tensor([1000, 0]).cuda(), torch.tensor([n, 2900]).cuda(),
                            persistent=persistent)
    assert CALLS["gluon"] == before + 1, "the sm_90 prefill did not take the Gluon kernel"
    assert (o[0, :, :1000] == 0).all() and (o[1, :, 2900:] == 0).all()


@pytest.mark.gpu
def test_gpu_hopper_kernel_hands_out_every_item_once_per_launch(CALLS):
    """The persistent programs take items from a counter that each launch must start at zero:
    many more items than SMs, launched back to back, each time on poisoned outputs."""
    prefill = _prefill()
    PH = _hopper_or_skip()
    n = 4100  # 33 query blocks x 48 heads: 12x the SMs of an H100
    q, k, v = _inputs(1, 48, 8, n, n, 128, torch.bfloat16, device="cuda")
    span = _llama3_like_spans(n, 48, group=6).cuda()
    assert -(-n // (2 * PH.ROWS)) * 48 > 10 * torch.cuda.get_device_properties(0).multi_processor_count
    before = CALLS["gluon"]
    for _ in range(3):
        _run_and_compare(q, k, v, 64, span)
    assert CALLS["gluon"] == before + 3


@pytest.mark.gpu
@pytest.mark.parametrize("nq", [17, 700])
@pytest.mark.parametrize("sink", [0, 64, 200])
def test_gpu_hopper_kernel_queries_last_of_keys_and_sinks(nq, sink, CALLS):
    prefill = _prefill()
    _hopper_or_skip()
    q, k, v = _inputs(1, 8, 2, nq, 2500, 128, torch.bfloat16, device="cuda")
    span = torch.tensor([[1, 3, 64, 100, 129, 700, 2000, 2500]]).cuda()
    before = CALLS["gluon"]
    _run_and_compare(q, k, v, sink, span, scale=0.3)
    assert CALLS["gluon"] == before + 1


@pytest.mark.gpu
def test_gpu_hopper_kernel_realistic_and_pinned_shapes_fall_back(CALLS):
    prefill = _prefill()
    _hopper_or_skip()
    n = 8192
    q, k, v = _inputs(1, 32, 8, n, n, 128, torch.bfloat16, device="cuda")
    span = _llama3_like_spans(n).cuda()
    before, kernel = CALLS["gluon"], CALLS["kernel"]
    _run_and_compare(q, k, v, 64, span)
    assert CALLS["gluon"] == before + 1
    # a pinned block shape, decode-shaped queries and fp32 stay on the Triton kernel
    _run_and_compare(q, k, v, 64, span, block_m=128, block_n=64, num_warps=8, num_stages=3)
    _run_and_compare(q[:, :, -16:], k, v, 64, span)
    _run_and_compare(*(t[..., :1024, :].float() for t in (q, k, v)), 64, span.clamp(max=1024), tol=5e-3)  # tf32 dots
    assert CALLS["gluon"] == before + 1 and CALLS["kernel"] == kernel + 4


@pytest.mark.gpu
def test_gpu_bf16_batch_padding_and_d64():
    n = 4096
    q, k, v = _inputs(2, 16, 4, n, n, 64, torch.bfloat16, device="cuda")
    span = torch.stack([_llama3_like_spans(3000, 16)[0], _llama3_like_spans(4000, 16, seed=1)[0]]).cuda()
    o, l = _run_and_compare(q, k, v, 64, span, torch.tensor([1096, 0]).cuda(), torch.tensor([n, 4000]).cuda())
    assert (o[0, :, :1096] == 0).all() and (o[1, :, 4000:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("nq", [1, 64])
def test_gpu_bf16_decode_like(nq):
    q, k, v = _inputs(2, 32, 8, nq, 8192, 128, torch.bfloat16, device="cuda")
    span = torch.cat([_llama3_like_spans(8192), _llama3_like_spans(8000, seed=2)]).cuda()
    _run_and_compare(q, k, v, 64, span, torch.tensor([0, 192]).cuda(), torch.tensor([8192, 8192]).cuda())


@pytest.mark.gpu
def test_gpu_kernel_on_a_dense_layer():
    n = 4096
    q, k, v = _inputs(1, 32, 8, n, n, 128, torch.bfloat16, device="cuda")
    _run_and_compare(q, k, v, 64, torch.full((1, 32), n, dtype=torch.long, device="cuda"))


@pytest.mark.gpu
def test_gpu_model_with_plan_prefills_through_the_kernel(CALLS, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moa_search import apply_plan
    from moa_search import attention
    from moa_search.attention import pick_backend
    from moa_search.plan import ModelShape, Plan

    prefill = _prefill()
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    # layers 0 and 1 sparse, layer 2 dense (every span = N): SDPA, no kernel
    plan = Plan(model=ModelShape.from_config(cfg), alpha=[[64.0, 0.0], [300.0, 16.0], [0.0, 0.0]],
                beta=[[0.0, 0.5], [0.0, 0.25], [1.0, 1.0]], sink=16, granularity="kv_head")
    apply_plan(model, plan)
    q = torch.zeros(1, 4, 1, 64, device="cuda")
    assert all(pick_backend(rule, q) == "triton" for rule in model.moa_runtime.rules)
    dense = attention.dense_causal
    DISPATCH = CALLS

    def counted_sdpa(*a):
        DISPATCH["sdpa"] += 1
        return dense(*a)

    monkeypatch.setattr(attention, "dense_causal", counted_sdpa)
    ids = torch.randint(0, 256, (1, 1500), device="cuda")
    before, before_sdpa, before_gluon = CALLS["kernel"], DISPATCH["sdpa"], CALLS["gluon"]
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits.float()
    assert CALLS["kernel"] == before + 2 and DISPATCH["sdpa"] == before_sdpa + 1
    hopper = torch.cuda.get_device_capability()[0] == 9 and prefill.prefill_hopper.HAVE_GLUON
    assert CALLS["gluon"] == before_gluon + (2 if hopper else 0)
    apply_plan(model, plan, backend="reference")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
    assert CALLS["kernel"] == before + 2 and DISPATCH["sdpa"] == before_sdpa + 1  # reference really ran
    assert (fast - ref).norm() / ref.norm() < 2e-2
