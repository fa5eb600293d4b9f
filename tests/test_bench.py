"""`moa bench prefill` parts that run without a GPU: the synthetic rules, the picture, the refusal."""
import json

import numpy as np
import pytest
import torch

from moa_search import rules as R
from moa_search.bench_prefill import hetero_spans, plot_rows, resolve_shape, uniform_spans


def _density(sink, spans, n):
    return float(np.mean(R.compute_density(sink, np.asarray(spans), n)))


@pytest.mark.parametrize("n,d", [(4096, 0.5), (4096, 0.25), (16384, 0.1)])
def test_uniform_spans_is_the_smallest_window_reaching_the_density(n, d):
    shape = resolve_shape("llama3-8b")
    sp = uniform_spans(shape, 64, n, d)
    assert sp.shape == (shape.num_query_heads,) and len(set(sp.tolist())) == 1
    s = int(sp[0])
    # brute force over the kept pairs, one query row at a time
    kept = sum(min(i + 1, 64 + s) if i + 1 > 64 + s else i + 1 for i in range(n))
    assert kept / (n * (n + 1) / 2) == pytest.approx(_density(64, sp, n), rel=1e-12)
    assert _density(64, sp, n) >= d > _density(64, sp - 1, n)


@pytest.mark.parametrize("n,d", [(8192, 0.5), (16384, 0.25)])
def test_hetero_spans_mix_local_and_wide_heads_at_the_density(n, d):
    shape = resolve_shape("llama3-8b")
    sp = hetero_spans(shape, 64, n, d, seed=0)
    per_kv = sp.reshape(shape.num_kv_heads, shape.group)
    assert (per_kv == per_kv[:, :1]).all()                      # a GQA group shares one rule
    # local heads keep their fixed window whatever the density; the wide ones scale with it
    wider = hetero_spans(shape, 64, n, min(1.0, 1.5 * d), seed=0).reshape(shape.num_kv_heads, shape.group)
    local = per_kv[:, 0] == wider[:, 0]
    assert local.sum() == (3 * shape.num_kv_heads) // 8
    assert set(per_kv[local, 0].tolist()) <= {256, 512, 1024, 2048} and (wider[~local, 0] > per_kv[~local, 0]).all()
    assert _density(64, sp, n) == pytest.approx(d, abs=0.01)
    assert np.array_equal(sp, hetero_spans(shape, 64, n, d, seed=0))  # seeded


def test_plot_rows_draws_every_length(tmp_path):
    rows = []
    for n in (1024, 2048):
        rows.append(dict(n=n, case="dense", density=1.0, method="sdpa-default", ms=1.0, tflops=600.0,
                         ideal_ms=1.0, ratio_to_ideal=1.0, spread=0.0))
        for case in ("hetero 0.5", "uniform 0.25"):
            for m, t in (("kernel", 480.0), ("flex", 410.0)):
                rows.append(dict(n=n, case=case, density=0.5, method=m, ms=1.0, tflops=t, ideal_ms=0.5,
                                 ratio_to_ideal=2.0, spread=0.01))
    out = plot_rows(json.loads(json.dumps(rows)), tmp_path / "p.png", "test")
    assert out.stat().st_size > 5000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_prefill_without_cuda_says_so(capsys):
    from moa_search.cli import main

    assert main(["bench", "prefill", "--lengths", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
