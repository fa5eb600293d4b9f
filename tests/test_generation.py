"""moa_search.generate: the static decode step (the CUDA graph's body, run eagerly on the CPU),
its compiled form (torch.compile of the decode-only forward), chunked prefill into the
compressed cache, and the errors of a cache that is too small.

References: transformers' generate with its dense DynamicCache and the plan's masked attention
(the same rule, every token kept), and a one-shot prefill for the chunked one. Tiny random
Llama with GQA (4 query heads, 2 KV heads), batch 2 with left padding, windows small enough
that the rings wrap.
"""
import warnings

import pytest
import torch

import moa_search
from moa_search import apply_plan, make_cache
from moa_search.cache import MoaCacheError
from moa_search.generation import CompileError, prefill
from test_cache import sparse_plan as plan_for, tiny_model  # the same tiny GQA model and plan

warnings.filterwarnings("ignore", category=FutureWarning)

PROMPT, NEW, PAD = 17, 10, 5


def batch(seed=1, pad=PAD, n=PROMPT, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids.to(device), mask.to(device)


def reference(model, ids, mask, new=NEW, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kw)


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_static_step_equals_eager_generate_and_reference(granularity):
    model = tiny_model()
    apply_plan(model, plan_for(model, granularity))
    ids, mask = batch()
    want = reference(model, ids, mask)                                        # dense cache + masked rule
    eager = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="hf")
    static = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static")
    assert torch.equal(eager, want) and torch.equal(static, want)
    # MHA too (one query head per KV head)
    mha = tiny_model(seed=2, kv_heads=4)
    apply_plan(mha, plan_for(mha, "query_head"))
    assert torch.equal(moa_search.generate(mha, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static"),
                       reference(mha, ids, mask))


def test_static_step_touches_only_buffers_allocated_before_it():
    """What a CUDA graph needs (checked here without one): every step reads and writes the same
    cache buffers and counters, allocated at the prefill, and the host counters are not consulted."""
    from moa_search.generation import GreedyDecoder

    model = tiny_model()
    apply_plan(model, plan_for(model))
    ids, mask = batch()
    cache = make_cache(model, max_new_tokens=NEW)
    first = prefill(model, cache, ids, mask).argmax(-1)
    kv = cache.kv
    before = [t.data_ptr() for t in (*kv.keys, *kv.values, kv.n, kv.n_prev, kv.rows, kv.spans)]
    dec = GreedyDecoder(model, cache, first, mask.sum(-1), NEW, [], 0)
    for _ in range(NEW - 1):
        dec.step()
    assert [t.data_ptr() for t in (*kv.keys, *kv.values, kv.n, kv.n_prev, kv.rows, kv.spans)] == before
    assert kv.n.tolist() == (mask.sum(-1) + NEW - 1).tolist()
    want = reference(model, ids, mask)
    assert torch.equal(dec.out, want[:, PROMPT:])


@pytest.mark.parametrize("compile", [False, "aot_eager"])
def test_static_step_stops_like_transformers_at_eos(compile):
    model = tiny_model()
    apply_plan(model, plan_for(model))
    ids, mask = batch()
    free = reference(model, ids, mask)
    # end-of-sequence = the token row 0 emits third: row 0 stops there and pads, row 1 runs on
    eos = int(free[0, PROMPT + 2])
    want = reference(model, ids, mask, eos_token_id=eos, pad_token_id=0)
    got = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static",
                              compile=compile, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    if compile:
        return
    # every row ends early: the output stops at the step the last row ended
    first = [int(free[0, PROMPT]), int(free[1, PROMPT + 1])]
    want = reference(model, ids, mask, eos_token_id=first, pad_token_id=0)
    got = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static",
                              eos_token_id=first, pad_token_id=0)
    assert got.shape[1] < PROMPT + NEW and torch.equal(got, want)


@pytest.mark.parametrize("chunk", [3, 4, 6, 16])
def test_chunked_prefill_equals_one_shot(chunk):
    """Chunks smaller than the padding (a chunk with no real token in row 1), than the sink + the
    windows, and the whole prompt but one token: same logits, same cache contents."""
    model = tiny_model()
    apply_plan(model, plan_for(model, "query_head"))
    ids, mask = batch()
    one, parts = make_cache(model, max_new_tokens=NEW), make_cache(model, max_new_tokens=NEW)
    with torch.no_grad():
        want = prefill(model, one, ids, mask)
        # the final length is set by the first forward: give the chunked cache the same
        parts.final_length = one.final_length
        got = prefill(model, parts, ids, mask, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(parts.kv.n, one.kv.n)
    for li in range(2):
        torch.testing.assert_close(parts.kv.keys[li], one.kv.keys[li], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts.kv.values[li], one.kv.values[li], rtol=1e-5, atol=1e-5)
    # and generation from it: the same tokens as the reference, through both loops
    want = reference(model, ids, mask)
    for loop in ("static", "hf"):
        got = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop=loop,
                                  prefill_chunk=chunk)
        assert torch.equal(got, want), loop


def test_chunked_prefill_with_the_backends_agrees():
    """The chunk path (CompressedKV.window + the prompt kernels' contract) on each CPU backend."""
    model = tiny_model()
    ids, mask = batch(n=40, pad=9)
    outs = []
    for backend in ("reference", "cpu_window"):
        apply_plan(model, plan_for(model), backend=backend)
        outs.append(moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6, loop="static",
                                        prefill_chunk=7))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], reference(model, ids, mask, new=6))


def test_a_cache_too_small_is_refused_clearly():
    model = tiny_model()
    apply_plan(model, plan_for(model))
    ids, mask = batch()
    cache = make_cache(model, max_length=PROMPT + 2)
    kw = {moa_search.cache_kwarg(model): cache}
    with pytest.raises(MoaCacheError, match=rf"sized for {PROMPT + 2} tokens .* brings the sequence to {PROMPT + 3}"):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **kw)
    cache = make_cache(model, max_length=PROMPT - 1)
    with pytest.raises(MoaCacheError, match="larger max_length"):
        prefill(model, cache, ids, mask, chunk=4)
    cache = make_cache(model, max_new_tokens=2)
    with torch.no_grad():
        prefill(model, cache, ids, mask)
        with pytest.raises(MoaCacheError, match="batch 1 differs from the cache's 2"):
            model(input_ids=ids[:1, :1], use_cache=True, **{moa_search.cache_kwarg(model): cache})


def test_a_cache_outlived_by_its_plan_is_refused():
    """A cache belongs to the plan applied when it was made: after apply_plan again (another plan)
    or remove_plan it refuses to serve, instead of attending over a layout of other rules."""
    model = tiny_model()
    apply_plan(model, plan_for(model))
    ids, mask = batch()
    cache = make_cache(model, max_new_tokens=NEW)
    apply_plan(model, plan_for(model, "query_head"))
    with pytest.raises(MoaCacheError, match="applied again"):
        with torch.no_grad():
            prefill(model, cache, ids, mask)


def test_beam_search_and_sampling_go_through_transformers():
    model = tiny_model()
    apply_plan(model, plan_for(model))
    ids, mask = batch()
    want = reference(model, ids, mask, num_beams=3)
    assert torch.equal(moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=3),
                       want)
    with pytest.raises(ValueError, match="greedy decoding only"):
        moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=3, loop="static")
    with pytest.raises(ValueError, match="needs CUDA"):
        moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="graph")


# ----------------------------------------------------------------------------- compiled step
# torch.compile on the CPU with backend "aot_eager": the graph inductor would get (dynamo's trace,
# the functionalised custom op), without inductor's C++ build, which takes ~30 s here.


def counter():
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("granularity,kv_heads", [("kv_head", 2), ("query_head", 2), ("query_head", 4)])
def test_compiled_step_equals_the_uncompiled_step_and_reference(granularity, kv_heads):
    """GQA (and MHA), batch 2 with left padding, rings that wrap: the compiled step's tokens are
    the uncompiled step's and transformers'; one compile serves every step and layer, and another
    prompt of another length (other cache buffer lengths) reuses it."""
    model = tiny_model(kv_heads=kv_heads)
    apply_plan(model, plan_for(model, granularity))
    ids, mask = batch()
    want = reference(model, ids, mask)
    cnt = counter()
    static = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static")
    compiled = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static",
                                   compile=cnt)
    assert torch.equal(static, want) and torch.equal(compiled, want)
    assert cnt.frame_count == 1
    ids, mask = batch(seed=3, n=29, pad=11)
    got = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, loop="static",
                              compile=cnt, prefill_chunk=8)
    assert torch.equal(got, reference(model, ids, mask))
    assert cnt.frame_count == 1, "recompiled for another prompt length"


def test_compiled_step_leaves_the_cache_as_the_uncompiled_step_does():
    """Same cache contents and counters after the loop (device and host), so the cache can go on
    (a second turn) whichever step made it; and the Triton decode kernel (interpreted) inside the
    custom op gives the same tokens as the PyTorch reference."""
    from moa_search.generation import greedy

    model = tiny_model()
    ids, mask = batch()
    caches = {}
    for backend, compile in (("reference", False), ("reference", counter()), ("triton", counter())):
        apply_plan(model, plan_for(model), backend=backend)
        made = []
        orig = moa_search.generation.MoaCache

        class Spy(orig):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                made.append(self)

        moa_search.generation.MoaCache = Spy
        try:
            out = greedy(model, ids, mask, NEW, graph=False, compile=compile)
        finally:
            moa_search.generation.MoaCache = orig
        caches[backend, compile is False] = (out, made[0])
    (out0, c0) = caches["reference", True]
    for key, (out, c) in caches.items():
        assert torch.equal(out, out0), key
        assert [layer.seen for layer in c.layers] == [layer.seen for layer in c0.layers] == [PROMPT + NEW - 1] * 2
        assert torch.equal(c.kv.n, c0.kv.n)
        for li in range(2):
            torch.testing.assert_close(c.kv.keys[li], c0.kv.keys[li], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(c.kv.values[li], c0.kv.values[li], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_fused_decode_forward_equals_transformers_forward(family):
    """moa_search.fused: the compiled step's own forward for the Llama family (q/k/v and gate/up
    concatenated; Qwen2's q/k/v bias, Qwen3's q/k norms) gives transformers' forward's logits on
    identical caches (fp32), the same greedy tokens compiled, and leaves the weights as they were."""
    from helpers import tiny_model as family_model

    from moa_search.fused import decode_forward, fuse
    from moa_search.generation import greedy
    from moa_search.hf_adapter import runtime_of

    model = family_model(family, layers=2, heads=4, kv_heads=2, head_dim=16, seed=4)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    with torch.no_grad():
        for name, p in model.named_parameters():     # transformers starts biases at zero
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, plan_for(model, "query_head"))
    ids, mask = batch()
    logits = []
    for use_fused in (False, True):
        cache = make_cache(model, max_length=PROMPT + 4)
        with torch.no_grad():
            first = prefill(model, cache, ids, mask).argmax(-1)[:, None]
            pos = mask.sum(-1, keepdim=True)
            cache.kv.begin(1, decode=True)
            with runtime_of(model).decode_only(cache.kv):
                if use_fused:
                    logits.append(decode_forward(model, fuse(model), first, pos))
                else:
                    logits.append(model(input_ids=first, position_ids=pos, use_cache=False).logits[:, -1])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == model.model.layers[0]._moa_fused.qkv.data_ptr()      # a view: no memory added
    want = reference(model, ids, mask)
    for fused in (True, False):
        got = greedy(model, ids, mask, NEW, graph=False, compile=counter(), fuse=fused)
        assert torch.equal(got, want), f"fuse={fused}"
    moa_search.remove_plan(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs) - int(model.config.tie_word_embeddings), "weights still share storage"


def test_a_fused_model_saves_and_loads_its_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from moa_search.fused import fuse

    model = tiny_model()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse(model) is not None
    model.save_pretrained(tmp_path)
    got = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_fused_forward_is_left_out_where_it_does_not_apply():
    from moa_search.fused import fuse

    model = tiny_model()
    model.config.model_type = "gemma"                   # a family decode_forward does not run
    assert fuse(model) is None
    assert all(not hasattr(layer, "_moa_fused") for layer in model.model.layers)


def test_compiled_step_fails_clearly():
    model = tiny_model()
    apply_plan(model, plan_for(model))
    ids, mask = batch()

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    with pytest.raises(CompileError, match="no compiler here.*compile=False"):
        moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3, loop="static", compile=broken)
    with pytest.raises(ValueError, match="not loop='hf'"):
        moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3, loop="hf", compile=True)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_gpu_graph_replay_equals_static_step_and_eager(granularity):
    """CUDA: one graph replay per token (Triton decode kernel) gives the static step's tokens and
    transformers' generate's with the same cache; fp32 so that argmax ties cannot differ."""
    model = tiny_model().cuda()
    apply_plan(model, plan_for(model, granularity))
    ids, mask = batch(device="cuda", n=40, pad=9)
    graph = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, loop="graph")
    static = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, loop="static")
    eager = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, loop="hf")
    assert torch.equal(graph, static) and torch.equal(graph, eager)
    chunked = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, loop="graph",
                                  prefill_chunk=16)
    assert torch.equal(chunked, graph)


@pytest.mark.gpu
def test_gpu_compiled_graph_equals_the_uncompiled_graph():
    """CUDA: the default graph loop (decode step compiled by inductor, then captured) gives the
    uncompiled graph's tokens; fp32 (no argmax ties)."""
    model = tiny_model().cuda()
    apply_plan(model, plan_for(model, "query_head"))
    ids, mask = batch(device="cuda", n=40, pad=9)
    compiled = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, loop="graph")
    plain = moa_search.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=24, loop="graph",
                                compile=False)
    assert torch.equal(compiled, plain)
    assert torch.equal(compiled, reference(model, ids, mask, new=24))


@pytest.mark.gpu
def test_gpu_chunked_prefill_bf16_kernels_match_one_shot():
    """bf16 through the Triton prefill kernel on the chunk layout vs the one-shot prefill."""
    model = tiny_model().to("cuda", torch.bfloat16)
    apply_plan(model, plan_for(model, "query_head"))
    ids, mask = batch(device="cuda", n=300, pad=37)
    one, parts = make_cache(model, max_new_tokens=4), make_cache(model, max_new_tokens=4)
    with torch.no_grad():
        want = prefill(model, one, ids, mask)
        parts.final_length = one.final_length
        got = prefill(model, parts, ids, mask, chunk=64)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    assert torch.equal(parts.kv.n, one.kv.n)
