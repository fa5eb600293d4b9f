"""`moa bench e2e`'s host-side pieces (the timing itself needs CUDA): the synthetic MoA-format
plan, the bytes a decode step reads, the table."""
import numpy as np
import pytest
from transformers import LlamaConfig

from moa_search import rules as R
from moa_search.bench import MODEL_SHAPES
from moa_search.bench_e2e import format_table, kv_bytes_per_seq, moa_like
from moa_search.plan import ModelShape, plan_from_moa, uniform_plan


class _Model:
    def __init__(self, name):
        self.config = LlamaConfig(**MODEL_SHAPES[name])


@pytest.mark.parametrize("name", ["llama-7b", "llama3-8b"])
def test_moa_like_plan_has_the_density_and_is_heterogeneous(name):
    model = _Model(name)
    shape = ModelShape.from_config(model.config)
    final = 16384 + 32
    plan = plan_from_moa(moa_like(shape, final), shape)
    d = plan.densities(final)
    assert d["kv_cache_density"] == pytest.approx(0.5, abs=2e-3)      # GQA groups share a rule
    spans = plan.spans(final)
    assert len(np.unique(spans)) > 10                                   # many different windows
    # the bytes a decode step reads follow the cache's held slots
    dense = kv_bytes_per_seq(model, None, final, final)
    assert dense == 2 * 32 * shape.num_kv_heads * final * 128 * 2
    assert kv_bytes_per_seq(model, plan, final, final) / dense == pytest.approx(d["kv_cache_density"], rel=1e-3)
    uni = uniform_plan(shape, sink=64, span_fraction=(0.25 * final - 64) / final)
    assert kv_bytes_per_seq(model, uni, final, final) / dense == pytest.approx(0.25, abs=1e-3)
    # early in the sequence a head holds only what exists
    assert kv_bytes_per_seq(model, uni, 100, final) == 2 * 32 * shape.num_kv_heads * 100 * 128 * 2
    assert R.span(0.0, 1.0, 10) == 10


def test_table_lists_every_row_and_the_long_prompt():
    res = {"model": "llama-7b", "layers": 32, "prompt_len": 16384, "new_tokens": 32, "device": "GPU", "hbm_gbps": 4200.0,
           "weight_bytes": 13 * 2**30, "repeats": 1,
           "rows": [{"path": "moa-graph", "plan": "uniform 0.5", "kv_density": 0.5, "batch": 1, "ttft_ms": 600.0,
                     "decode_ms": 6.0, "tokens_per_s": 166.0, "floor_ms": 4.0, "x_floor": 1.5, "peak_gib": 20.0}],
           "long": [{"path": "moa-graph", "plan": "uniform 0.5", "prompt_len": 131072, "fits": True, "ttft_ms": 9000.0,
                     "peak_gib": 30.0}]}
    text = format_table(res)
    assert "| moa-graph | uniform 0.5 (0.50) | 1 | 600 | 6.00 | 166 | 4.00 | 1.50 | 20.0 |" in text
    assert "prompt of 131072 tokens, batch 1, moa-graph (uniform 0.5): first token after 9.00 s, peak 30.0 GiB" in text


def test_from_json_redraws_earlier_runs_and_names_a_bad_file(tmp_path, capsys):
    import json

    from moa_search.bench_e2e import replot
    from moa_search.errors import MoaError

    row = {"path": "moa-compiled", "plan": "uniform 0.5", "kv_density": 0.5, "batch": 1, "ttft_ms": 600.0,
           "decode_ms": 5.5, "tokens_per_s": 182.0, "floor_ms": 3.8, "x_floor": 1.45, "peak_gib": 17.0}
    dense = dict(row, path="hf-static", plan="dense", kv_density=1.0, batch=9, decode_ms=44.0, x_floor=2.06)
    base = {"model": "llama3-8b", "layers": 32, "prompt_len": 16384, "new_tokens": 32, "device": "GPU",
            "hbm_gbps": 4200.0, "weight_bytes": 14 * 2**30, "repeats": 3}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dict(base, rows=[row, dense, dict(row, batch=4, decode_ms=7.0)])))
    b.write_text(json.dumps(dict(base, rows=[dict(row, decode_ms=5.2), dict(row, batch=8, decode_ms=9.0)])))
    png = tmp_path / "e2e.png"
    assert replot([str(a), str(b)], str(png), keep=["moa-compiled"]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "| moa-compiled | uniform 0.5 (0.50) | 1 | 600 | 5.50 |" in out and "5.20" in out
    assert "hf-static" not in out                                   # --paths keeps the rows drawn
    assert "| 8 | 600 | 9.00 |" in out and "| 4 | 600 |" not in out  # 'max': batch 8 of b replaces a's 4
    assert replot([str(a), str(b)], None, keep=["moa-compiled"], batches=["4"]) == 0
    out = capsys.readouterr().out
    assert "| 4 | 600 | 7.00 |" in out and "| 1 | 600 |" not in out and "| 8 | 600 |" not in out
    both = tmp_path / "both.png"                                    # a batch-1 panel and a tokens/s panel
    assert replot([str(a)], str(both)) == 0 and both.read_bytes()[:4] == b"\x89PNG"
    assert "| hf-static | dense (1.00) | 9 |" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(MoaError, match="bad.json"):
        replot([str(bad)], None)
