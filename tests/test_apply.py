"""apply_plan on tiny Llama / Qwen2 / Mistral models: dense equality, sparse vs brute force, generate."""
import copy
from collections import Counter

import pytest
import torch

import moa_search
from moa_search.plan import ModelShape, PlanError, uniform_plan

from helpers import brute_mask, eager_with_masks, random_plan, tiny_model

FAMILIES = ["llama", "qwen2", "mistral"]


def batch(vocab=97, n=23, pads=(0, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(pads), n), generator=g)
    am = torch.ones(len(pads), n, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
    return ids, am


@pytest.mark.parametrize("family", FAMILIES)
def test_full_span_plan_reproduces_dense_logits(family):
    model = tiny_model(family)
    ids, am = batch()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=am).logits
    moa_search.apply_plan(model, uniform_plan(ModelShape.from_config(model.config), sink=4, span_fraction=1.0))
    assert model.config._attn_implementation == "moa"
    with torch.no_grad():
        sparse = model(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(sparse[real], dense[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sparse_plan_equals_brute_force_masked_attention(family, granularity, backend):
    model = tiny_model(family, attn="eager")
    # a fixed seed per case (str hashes change between runs), windows well under the 23 tokens
    plan = random_plan(model, granularity, seed=2 * FAMILIES.index(family) + (granularity == "kv_head"), max_alpha=12)
    pads = [0, 6]
    ids, am = batch(pads=pads)
    total = ids.shape[1]
    masks = [brute_mask(plan, layer, pads, total, lambda b, r: total - pads[b]) for layer in range(2)]
    ref = eager_with_masks(model, ids, am, masks)
    sparse_model = moa_search.apply_plan(copy.deepcopy(model), plan, backend=backend)
    with torch.no_grad():
        got = sparse_model(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-5)
    # and the plan really is sparse here: dense logits differ
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=am).logits
    assert (dense[real] - ref[real]).abs().max() > 1e-3


def test_right_padding_prefill_matches_brute_force():
    model = tiny_model("llama", attn="eager")
    plan = random_plan(model, seed=5)
    ids, am = batch(pads=(0, 0))
    am[1, -5:] = 0                                   # right padding
    total = ids.shape[1]
    lens = [total, total - 5]
    masks = [brute_mask(plan, layer, [0, 0], total, lambda b, r: lens[b]) for layer in range(2)]
    ref = eager_with_masks(model, ids, am, masks)
    moa_search.apply_plan(model, plan)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_sparse_plan_equals_incremental_reference(family):
    """Greedy generate vs a brute-force reference in which every row uses the span at the
    length it was computed at (prompt rows: the prompt length; generated rows: r + 1)."""
    model = tiny_model(family, attn="eager", vocab=50)
    plan = random_plan(model, seed=7, max_alpha=10)
    pads = [0, 4]
    ids, am = batch(vocab=50, n=18, pads=pads, seed=3)
    steps = 6
    seq, mask = ids.clone(), am.clone()
    prompt_len = [ids.shape[1] - p for p in pads]
    for _ in range(steps):
        total = seq.shape[1]
        row_len = lambda b, r: prompt_len[b] if r < prompt_len[b] else r + 1  # noqa: E731
        masks = [brute_mask(plan, layer, pads, total, row_len) for layer in range(2)]
        logits = eager_with_masks(model, seq, mask, masks)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    moa_search.apply_plan(model, plan)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == seq[:, ids.shape[1]:].tolist()


def test_generate_full_span_equals_dense_and_remove_plan_restores():
    model = tiny_model("mistral")
    ids, am = batch(pads=(0, 3))
    dense = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    moa_search.apply_plan(model, uniform_plan(ModelShape.from_config(model.config), sink=2, span_fraction=1.0))
    moa = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert moa.tolist() == dense.tolist()
    moa_search.remove_plan(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "moa_runtime") for m in model.modules())


def test_sampling_generate_runs_with_plan():
    model = tiny_model("llama")
    moa_search.apply_plan(model, random_plan(model))
    ids, am = batch(pads=(0, 2))
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 5)


def test_mismatched_plan_is_refused():
    model = tiny_model("llama", layers=2)
    other = tiny_model("llama", layers=3, kv_heads=4)
    with pytest.raises(PlanError, match=r"num_layers: plan has 3, model has 2; num_kv_heads: plan has 4, model has 2"):
        moa_search.apply_plan(model, random_plan(other))
    assert model.config._attn_implementation == "sdpa"     # untouched


def test_attention_without_rule_errors_clearly():
    model = tiny_model("llama")
    moa_search.apply_plan(model, random_plan(model))
    del moa_search.apply.attention_modules(model)[1].moa_runtime
    with pytest.raises(RuntimeError, match="layer 1.*has no plan attached"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_holes_in_the_padding_mask_are_refused():
    model = tiny_model("llama")
    moa_search.apply_plan(model, random_plan(model))
    am = torch.tensor([[1, 1, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="contiguous"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=am)


def test_unknown_backend_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        moa_search.apply_plan(model, random_plan(model), backend="fast")


def count_paths(monkeypatch):
    """Count the attention paths taken ("sdpa" for dense layers, else the backend's name) by
    wrapping attention.dense_causal and every registered backend."""
    from moa_search import attention

    seen = Counter()

    def wrap(name, fn):
        def counted(*a, **kw):
            seen[name] += 1
            return fn(*a, **kw)
        return counted

    monkeypatch.setattr(attention, "dense_causal", wrap("sdpa", attention.dense_causal))
    for name, fn in list(attention.BACKENDS.items()):
        monkeypatch.setitem(attention.BACKENDS, name, wrap(name, fn))
    return seen


def test_dense_layers_without_padding_go_to_sdpa(monkeypatch):
    """A layer whose every span reaches N, unpadded, runs SDPA (decided on the host); any
    narrow head, padding or a pinned backend keeps it on the sparse path."""
    from moa_search.attention import LayerRule
    from moa_search.plan import Plan

    DISPATCH = count_paths(monkeypatch)
    model = tiny_model("llama", layers=3, attn="eager")
    shape = ModelShape.from_config(model.config)
    ids, _ = batch(pads=(0, 0))
    total = ids.shape[1]
    # layer 1 has one fixed 5-token window on KV head 0: sparse at 23 tokens; the others are full
    alpha = [[0.0, 0.0], [5.0, 0.0], [0.0, 0.0]]
    beta = [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    plan = Plan(model=shape, alpha=alpha, beta=beta, sink=2, granularity="kv_head")
    masks = [brute_mask(plan, layer, [0, 0], total, lambda b, r: total) for layer in range(3)]
    ref = eager_with_masks(model, ids, torch.ones_like(ids), masks)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    model = moa_search.apply_plan(model, plan)
    before = DISPATCH.copy()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert DISPATCH["sdpa"] - before["sdpa"] == 2 and DISPATCH["cpu_window"] - before["cpu_window"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # layer 1 really is sparse
    # the compressed cache's prefill takes the same decision, and greedy decoding agrees
    before = DISPATCH.copy()
    with_cache = moa_search.generate(model, input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert DISPATCH["sdpa"] - before["sdpa"] == 2
    assert with_cache.tolist() == model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0).tolist()

    ids, am = batch(pads=(0, 6))
    before = DISPATCH.copy()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert DISPATCH["sdpa"] == before["sdpa"] and DISPATCH["cpu_window"] - before["cpu_window"] == 3

    moa_search.apply_plan(model, plan, backend="reference")
    before = DISPATCH.copy()
    with torch.no_grad():
        model(input_ids=batch(pads=(0, 0))[0])
    assert DISPATCH["sdpa"] == before["sdpa"] and DISPATCH["reference"] - before["reference"] == 3

    # the dense test follows rules.span exactly: a fixed window of 100 covers N <= 100 only
    rule = LayerRule(sink=4, alpha=torch.tensor([100.0, 0.0]), beta=torch.tensor([0.0, 1.0]))
    assert (rule.host_spans(100) >= 100).all() and not (rule.host_spans(101) >= 101).all()


def test_backends_registered_with_hints_get_the_layer_width():
    """attend() hands hint-taking backends the layer's mean window / N, computed on the host
    from the plan (rules.span at that length), and leaves the others' signature alone."""
    from moa_search import attention
    from moa_search import rules as R

    seen = {}

    def fake(q, k, v, sink, span, start, end, scale, **hints):
        seen.update(hints, span=span.clone())
        return attention.BACKENDS["reference"](q, k, v, sink, span, start, end, scale)

    attention.register_backend("fake-hints", fake, hints=True)
    try:
        alpha, beta = torch.tensor([3.0, 0.0, 100.0, 7.0]), torch.tensor([0.0, 0.5, 0.0, 0.25])
        rule = attention.LayerRule(sink=2, alpha=alpha, beta=beta, backend="fake-hints")
        q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
        start, end = torch.zeros(1, dtype=torch.long), torch.full((1,), 40, dtype=torch.long)
        attention.attend(rule, q, k, v, start, end, 8 ** -0.5, unpadded=True)
        want = [min(max(int(a + b * 40), 1), 40) for a, b in zip(alpha.tolist(), beta.tolist())]
        assert seen["span"][0].tolist() == want
        assert seen["width"] == pytest.approx(sum(want) / 4 / 40)
        assert rule.host_spans(40).tolist() == R.span(alpha, beta, 40).tolist()
    finally:
        attention.BACKENDS.pop("fake-hints")
        attention._TAKES_HINTS.discard("fake-hints")
    seen.clear()
    attention.register_backend("fake-plain", lambda *a: attention.BACKENDS["reference"](*a))
    try:
        rule.backend = "fake-plain"
        attention.attend(rule, q, k, v, start, end, 8 ** -0.5, unpadded=True)  # 8 positional args, no hints
    finally:
        attention.BACKENDS.pop("fake-plain")


def test_padding_bounds_once_per_forward():
    """Every layer of a forward gets the same mask tensor: the runtime computes the bounds for the
    first and reuses them (same tensors) for the others; another key count or a new mask recomputes."""
    from moa_search.runtime import Runtime

    rt = Runtime([])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    start, end = rt.bounds(mask, 2, 6, torch.device("cpu"))
    assert start.tolist() == [2, 0] and end.tolist() == [6, 4]
    again = rt.bounds(mask, 2, 6, torch.device("cpu"))
    assert again[0] is start and again[1] is end
    s4, e4 = rt.bounds(mask, 2, 4, torch.device("cpu"))      # the last 4 keys of the same mask
    assert s4.tolist() == [0, 0] and e4.tolist() == [4, 2]
    fresh = rt.bounds(mask.clone(), 2, 6, torch.device("cpu"))
    assert fresh[0] is not start and fresh[0].tolist() == [2, 0]
