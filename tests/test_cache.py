"""The compressed per-head KV cache (moa_search.cache) on a tiny random Llama with GQA.

References: transformers' dense DynamicCache with the plan's masked reference attention
(same rule, all tokens kept), and plain SDPA for a full-span plan. Batch 2 with left
padding throughout; small windows so that the ring buffers wrap during decoding.
"""
import warnings

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from moa_search import ModelShape, MoaCache, Plan, apply_plan, cache_kwarg, make_cache, remove_plan, uniform_plan
from moa_search.cache import MoaCacheError

warnings.filterwarnings("ignore", category=FutureWarning)

SINK = 2
PROMPT = 14
NEW = 12


def tiny_model(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=256, pad_token_id=0, eos_token_id=None,
                      bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def sparse_plan(model, granularity="kv_head"):
    shape = ModelShape.from_config(model.config)
    if granularity == "kv_head":
        alpha = [[3.0, 0.0], [5.0, 2.0]]
        beta = [[0.0, 0.25], [0.1, 0.0]]
    else:  # per query head: the cache keeps each group's max
        alpha = [[3.0, 1.0, 0.0, 2.0], [5.0, 1.0, 2.0, 2.0]]
        beta = [[0.0, 0.0, 0.25, 0.1], [0.1, 0.2, 0.0, 0.0]]
    return Plan(model=shape, alpha=alpha, beta=beta, sink=SINK, granularity=granularity)


def batch(seed=1, pad=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


def gen(model, ids, mask, cache=None, **kw):
    kw.setdefault("do_sample", False)
    if cache is not None:
        kw[cache_kwarg(model)] = cache
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **kw)


def test_capacity_and_bytes_follow_the_plan():
    model = tiny_model()
    plan = sparse_plan(model, "query_head")
    apply_plan(model, plan)
    ids, mask = batch()
    cache = make_cache(model, max_new_tokens=NEW)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
    final = PROMPT + NEW
    assert cache.final_length == final
    kv_spans = plan.kv_spans(final)                        # [L, Hkv]: group max of the query heads' spans
    for layer in range(len(cache.layers)):
        assert cache.kv.cap[layer].tolist() == np.minimum(kv_spans[layer], final - SINK).tolist()
    dense = 2 * 2 * model.config.num_hidden_layers * 2 * final * 16 * 4     # K+V, batch, layers, Hkv, N, D, fp32
    assert cache.dense_nbytes() == dense
    assert cache.nbytes() == pytest.approx(plan.densities(final)["kv_cache_density"] * dense, rel=1e-12)


def expected_positions(n, s0, cap):
    return sorted(set(range(min(s0, n))) | set(range(max(s0, n - cap), n)))


def test_contents_equal_the_kept_set_after_prefill_and_decode_across_a_wrap():
    model = tiny_model()
    apply_plan(model, sparse_plan(model))
    ids, mask = batch()
    cache = make_cache(model, max_new_tokens=NEW)
    dense = DynamicCache(config=model.config)
    real = mask.sum(1)
    start = PROMPT - real
    tok = ids
    m = mask
    with torch.no_grad():
        for step in range(NEW):
            pos = (m.cumsum(-1) - 1).clamp_min(0)[:, -tok.shape[1]:]
            ck = cache_kwarg(model)
            a = model(input_ids=tok, attention_mask=m, position_ids=pos, **{ck: cache}, use_cache=True).logits
            b = model(input_ids=tok, attention_mask=m, position_ids=pos, **{ck: dense}, use_cache=True).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            kv = cache.kv
            for li in range(len(cache.layers)):
                kpos, valid = cache.kept_positions(li)
                head = torch.repeat_interleave(torch.arange(2), kv.s0 + kv.cap[li])
                dk = dense.layers[li].keys                      # [B, Hkv, N, D] padded, all tokens
                dv = dense.layers[li].values
                for bi in range(2):
                    n = int(real[bi]) + step
                    assert int(kv.n[bi]) == n
                    for h in range(2):
                        sel = (head == h) & valid[bi]
                        got = kpos[bi, sel]
                        assert sorted(got.tolist()) == expected_positions(n, kv.s0, int(kv.cap[li][h]))
                        src = start[bi] + got                   # padded index of each cached position
                        torch.testing.assert_close(kv.keys[li][bi, sel], dk[bi, h, src], atol=1e-5, rtol=1e-5)
                        torch.testing.assert_close(kv.values[li][bi, sel], dv[bi, h, src], atol=1e-5, rtol=1e-5)
            wrapped = any(int(kv.n.max()) - kv.s0 > int(c.min()) for c in kv.cap)
            tok = a[:, -1:].argmax(-1)
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
    assert wrapped


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_generate_sparse_plan_equals_reference_masked_path(granularity):
    model = tiny_model()
    apply_plan(model, sparse_plan(model, granularity))
    ids, mask = batch()
    want = gen(model, ids, mask)                                   # dense DynamicCache + masked reference
    cache = make_cache(model, max_new_tokens=NEW)
    got = gen(model, ids, mask, cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    # sampling with the same seed draws the same tokens
    torch.manual_seed(3)
    want_s = gen(model, ids, mask, do_sample=True, top_k=0)
    torch.manual_seed(3)
    got_s = gen(model, ids, mask, make_cache(model, max_new_tokens=NEW), do_sample=True, top_k=0)
    assert torch.equal(got_s, want_s)


def test_beam_search_equals_reference():
    model = tiny_model()
    apply_plan(model, sparse_plan(model))
    ids, mask = batch()
    want = gen(model, ids, mask, num_beams=3)
    got = gen(model, ids, mask, make_cache(model, max_new_tokens=NEW), num_beams=3)
    assert torch.equal(got, want)


def test_full_span_plan_equals_dense_sdpa():
    model = tiny_model()
    ids, mask = batch()
    want = gen(model, ids, mask)                                   # plain transformers, SDPA
    apply_plan(model, uniform_plan(ModelShape.from_config(model.config), sink=SINK, span_fraction=1.0))
    cache = make_cache(model, max_new_tokens=NEW)
    got = gen(model, ids, mask, cache)
    assert torch.equal(got, want)
    assert cache.nbytes() == cache.dense_nbytes()
    remove_plan(model)


def test_second_turn_on_a_filled_cache_equals_reference_and_overflow_is_refused():
    model = tiny_model()
    apply_plan(model, sparse_plan(model))
    ids, mask = batch()
    turn2 = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    total = PROMPT + NEW + 5 + NEW
    cache = make_cache(model, max_length=total)
    dense = DynamicCache(config=model.config)
    out1 = gen(model, ids, mask, cache)
    ref1 = gen(model, ids, mask, dense)
    assert torch.equal(out1, ref1)
    ids2 = torch.cat([out1, turn2], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - PROMPT, dtype=mask.dtype)], 1)
    out2 = gen(model, ids2, mask2, cache)                           # a 6-token chunk on the filled cache
    ref2 = gen(model, ids2, mask2, dense)
    assert torch.equal(out2, ref2)
    # a third turn would go past the length the cache was sized for: refused, not silently wrong
    ids3 = torch.cat([out2, turn2], 1)
    mask3 = torch.cat([mask2, torch.ones(2, ids3.shape[1] - ids2.shape[1], dtype=mask.dtype)], 1)
    with pytest.raises(MoaCacheError, match="sized for"):
        gen(model, ids3, mask3, cache)


def test_misuse_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="apply_plan"):
        MoaCache(model, max_new_tokens=4)
    apply_plan(model, sparse_plan(model))
    with pytest.raises(ValueError, match="exactly one"):
        MoaCache(model)
    cache = make_cache(model, max_new_tokens=NEW)
    ids, mask = batch()
    gen(model, ids, mask, cache)
    with pytest.raises(MoaCacheError, match="cropped"):
        cache.crop(1)
    # attention switched away from "moa": the staged keys are never consumed; the next forward refuses
    model.set_attn_implementation("sdpa")
    c = make_cache(model, max_new_tokens=NEW)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): c}, use_cache=True)
        with pytest.raises(MoaCacheError, match="never consumed"):
            model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **{cache_kwarg(model): c},
                  use_cache=True)


@pytest.mark.gpu
def test_generate_on_gpu_bf16_triton_decode_matches_reference():
    """CUDA, bf16: prefill + teacher-forced decode steps through the Triton decode kernel vs the
    dense-cache masked reference; logits close (bf16), and the greedy generate of a full-span plan
    keeps the cache at dense size."""
    model = tiny_model().to("cuda", torch.bfloat16)
    plan = sparse_plan(model)
    ids, mask = (t.cuda() for t in batch())
    apply_plan(model, plan, backend="reference")
    ref_cache = DynamicCache(config=model.config)
    apply_plan(model, plan)                               # auto: Triton on CUDA
    cache = make_cache(model, max_new_tokens=NEW)
    tok, m = ids, mask
    with torch.no_grad():
        for step in range(NEW):
            pos = (m.cumsum(-1) - 1).clamp_min(0)[:, -tok.shape[1]:]
            for rule in model.moa_runtime.rules:  # decode steps through the Triton kernel; the prefill is not this test's
                rule.backend = "auto" if step else "reference"
            ck = cache_kwarg(model)
            a = model(input_ids=tok, attention_mask=m, position_ids=pos, **{ck: cache}, use_cache=True).logits
            for rule in model.moa_runtime.rules:
                rule.backend = "reference"
            b = model(input_ids=tok, attention_mask=m, position_ids=pos, **{ck: ref_cache}, use_cache=True).logits
            torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
            tok = b[:, -1:].argmax(-1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    apply_plan(model, plan)
    out = gen(model, ids, mask, make_cache(model, max_new_tokens=NEW))
    assert out.shape == (2, PROMPT + NEW)
