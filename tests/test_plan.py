"""Plan file: round trip, validation messages, MoA import, atomic writes, shape checks."""
import json
import os

import numpy as np
import pytest

from moa_search import rules as R
from moa_search.plan import (ModelShape, Plan, PlanError, check_plan_fits, load_plan, plan_from_moa, save_plan,
                             uniform_plan)

SHAPE = ModelShape("LlamaForCausalLM", "llama", num_layers=3, num_query_heads=8, num_kv_heads=2, head_dim=16,
                   fingerprint="f" * 16)


def random_plan(granularity="kv_head", seed=0):
    rng = np.random.default_rng(seed)
    heads = SHAPE.num_kv_heads if granularity == "kv_head" else SHAPE.num_query_heads
    alpha = rng.integers(-64, 512, size=(SHAPE.num_layers, heads)).astype(float).tolist()
    beta = (rng.integers(0, 9, size=(SHAPE.num_layers, heads)) / 8).tolist()
    return Plan(model=SHAPE, alpha=alpha, beta=beta, sink=16, granularity=granularity,
                budget={"kind": "kv", "density": 0.5, "lengths": [1024]}, profiled_lengths=[512, 1024],
                predicted_loss={"1024": 0.25})


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_round_trip(tmp_path, granularity):
    plan = random_plan(granularity)
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    back = load_plan(path)
    assert back == plan
    assert back.to_dict() == json.loads(path.read_text())


def test_query_rules_expand_kv_heads_over_groups():
    plan = random_plan("kv_head")
    a, b = plan.query_rules()
    assert a.shape == (3, 8)
    for layer in range(3):
        for h in range(8):
            assert a[layer, h] == plan.alpha[layer][h // 4] and b[layer, h] == plan.beta[layer][h // 4]


def test_densities_are_averages_of_per_head_formulas():
    plan = random_plan("query_head", seed=3)
    n = 1000
    a, b = plan.query_rules()
    per_head = [R.kv_density(plan.sink, R.span(x, y, n), n) for x, y in zip(a.ravel(), b.ravel())]
    d = plan.densities(n)
    assert d["kv_density"] == pytest.approx(np.mean(per_head))
    # the cache holds, per KV head, the widest query head of the group
    spans = R.span(a, b, n).reshape(3, 2, 4).max(-1)
    assert d["kv_cache_density"] == pytest.approx(np.mean(R.kv_density(plan.sink, spans, n)))
    assert d["kv_cache_density"] >= d["kv_density"]
    cd = [R.compute_density(plan.sink, R.span(x, y, n), n) for x, y in zip(a.ravel(), b.ravel())]
    assert d["compute_density"] == pytest.approx(np.mean(cd))


def test_uniform_plan():
    plan = uniform_plan(SHAPE, sink=64, span_fraction=0.5)
    assert plan.spans(1000).tolist() == [[500] * 8] * 3
    assert plan.densities(1000)["kv_density"] == pytest.approx(0.564)
    fixed = uniform_plan(SHAPE, sink=4, span_tokens=100)
    assert fixed.spans(5000).max() == 100 and fixed.spans(50).max() == 50
    with pytest.raises(PlanError, match="exactly one"):
        uniform_plan(SHAPE, span_fraction=0.5, span_tokens=3)


def test_moa_import_moves_sink_out_of_span():
    rng = np.random.default_rng(1)
    alphas = (rng.integers(1, 9, size=(3, 8)) * 256).astype(float).tolist()
    betas = (rng.integers(0, 9, size=(3, 8)) / 8).tolist()
    plan = plan_from_moa({"alphas": alphas, "betas": betas}, SHAPE)
    assert plan.sink == 64 and plan.granularity == "query_head"
    n = 4096
    for layer in range(3):
        for h in range(8):
            moa_total = min(int(np.floor(alphas[layer][h] + betas[layer][h] * n)), n)
            # MoA keeps 64 sink + (total - 64) recent tokens: the same count of cached tokens
            assert min(plan.sink + plan.spans(n)[layer, h], n) == moa_total


@pytest.mark.parametrize("obj,msg", [
    ({"alphas": [[1.0] * 8] * 2, "betas": [[0.0] * 8] * 3}, r"'alphas' must have one row per layer \(3\), got 2"),
    ({"alphas": [[1.0] * 8] * 3, "betas": [[0.0] * 8, [0.0] * 7, [0.0] * 8]}, r"'betas'\[1\] \(layer 1\) must have 8"),
    ({"alphas": [[1.0] * 8] * 3, "betas": [[0.0] * 8, [0.0] * 8, [0.0] * 7 + ["x"]]}, r"layer 2, head 7"),
    ({"alpha": []}, "official MoA format"),
])
def test_moa_import_errors(obj, msg):
    with pytest.raises(PlanError, match=msg):
        plan_from_moa(obj, SHAPE)


def _edit(d, path, value):
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value


@pytest.mark.parametrize("path,value,msg", [
    (("format",), "other", "field 'format' must be 'moa-search-plan'"),
    (("version",), 99, "newer moa-search"),
    (("version",), "1", "'version' must be an integer"),
    (("granularity",), "layer", "field 'granularity' must be one of"),
    (("sink",), -1, "field 'sink' must be an integer >= 0"),
    (("model", "num_kv_heads"), 3, "must be a multiple of model.num_kv_heads"),
    (("model", "head_dim"), 0, "model.head_dim' must be a positive integer"),
    (("rules", "alpha", 1), [1.0], r"rules.alpha\[1\] \(layer 1\) must have 2 values, one per kv head, got 1"),
    (("rules", "beta", 2, 1), -0.5, r"rules.beta\[2\]\[1\] \(layer 2, head 1\) must be >= 0"),
    (("rules", "alpha", 0, 0), float("nan"), r"rules.alpha\[0\]\[0\] \(layer 0, head 0\) must be a finite number"),
    (("rules", "alpha", 0, 1), None, r"rules.alpha\[0\]\[1\] \(layer 0, head 1\) must be a finite number, got None"),
    (("rules",), KeyError, "missing required field 'rules'"),
    (("budget", "density"), 1.5, r"'budget.density' must be in \(0, 1\]"),
])
def test_validation_names_the_field(tmp_path, path, value, msg):
    d = random_plan().to_dict()
    _edit(d, path, value)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=msg) as e:
        load_plan(p)
    assert str(p) in str(e.value)


def test_malformed_json_and_missing_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"format": "moa-search-plan", "version": 1,,}')
    with pytest.raises(PlanError, match=r"broken.json: not valid JSON \(line 1"):
        load_plan(p)
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "nope.json")
    p.write_text(json.dumps({"alphas": [], "betas": []}))
    with pytest.raises(PlanError, match="moa plan convert"):
        load_plan(p)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    save_plan(random_plan(seed=1), path)
    before = path.read_text()

    def crash(*a, **k):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_plan(random_plan(seed=2), path)
    assert path.read_text() == before                 # the old plan is intact
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]   # no temp file left behind


def test_mismatched_shape_names_fields():
    other = ModelShape("Qwen2ForCausalLM", "qwen2", num_layers=4, num_query_heads=8, num_kv_heads=4, head_dim=16)
    with pytest.raises(PlanError) as e:
        check_plan_fits(random_plan(), other)
    assert "num_layers: plan has 3, model has 4" in str(e.value)
    assert "num_kv_heads: plan has 2, model has 4" in str(e.value)
    assert "num_query_heads" not in str(e.value)


def test_shape_from_config_dict_and_dir(tmp_path):
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = ModelShape.from_pretrained(tmp_path)
    assert (s.architecture, s.num_layers, s.num_query_heads, s.num_kv_heads, s.head_dim) == ("MistralForCausalLM", 2, 8, 2, 8)
    cfg["rope_theta"] = 1e6
    assert ModelShape.from_config(cfg).fingerprint != s.fingerprint
    with pytest.raises(PlanError, match="no config.json"):
        ModelShape.from_pretrained(tmp_path / "missing")


def test_json_schema_accepts_plans_and_rejects_broken_ones():
    jsonschema = pytest.importorskip("jsonschema")
    from moa_search.schema import PLAN_SCHEMA

    jsonschema.Draft202012Validator.check_schema(PLAN_SCHEMA)
    for g in ("kv_head", "query_head"):
        jsonschema.validate(random_plan(g).to_dict(), PLAN_SCHEMA)
    d = random_plan().to_dict()
    d["granularity"] = "layer"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, PLAN_SCHEMA)


@pytest.mark.parametrize("path,value", [
    (("format",), "other"), (("version",), 0), (("granularity",), "layer"), (("sink",), -1), (("sink",), 1.5),
    (("model", "head_dim"), 0), (("model", "architecture"), 3), (("model", "extra"), 1), (("model",), KeyError),
    (("rules", "beta", 2, 1), -0.5), (("rules", "alpha", 0, 1), None), (("rules", "alpha", 1), "row"),
    (("budget", "density"), 1.5), (("budget", "density"), 0), (("budget", "kind"), "flops"), (("budget",), 3),
    (("profiled_lengths",), [512, 0]), (("min_span",), 0), (("block_size",), True),
])
def test_schema_and_the_loader_reject_the_same_plans(path, value):
    """One definition: what the JSON Schema rejects (checked by jsonschema, an independent
    validator) is what first_error, which the loader runs, reports; and plans pass both."""
    jsonschema = pytest.importorskip("jsonschema")
    from moa_search.schema import PLAN_SCHEMA, first_error

    for g in ("kv_head", "query_head"):
        assert first_error(random_plan(g).to_dict()) is None
    d = random_plan().to_dict()
    d["budget"] = {"kind": "kv", "density": 0.5, "lengths": [512]}
    assert first_error(d) is None
    _edit(d, path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, PLAN_SCHEMA)
    error = first_error(d)
    assert error and ".".join(str(k) for k in path if not isinstance(k, int)).split(".")[-1] in error


def test_old_plan_files_without_block_size_still_load(tmp_path):
    d = random_plan().to_dict()
    del d["block_size"], d["min_span"]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    plan = load_plan(p)
    assert plan.block_size == 64 and plan.min_span == 1
