"""Check and time configurations of kernels/prefill_hopper.py beside the Triton kernel and SDPA
(GPU machine, sm_90). Each configuration is first checked in bf16 (and fp16) against the float32
reference on a padded GQA batch, then timed on the llama3-8b attention shape. Rows go to stdout
and $OUT/hopper_probe.jsonl.

    python scripts/hopper_probe.py "128,3,1;64,4,2" 16384,32768    # (BLOCK_N, STAGES, Q_BUFS);...
"""
import json, os, sys
import numpy as np, torch, triton
from moa_search.bench_prefill import hetero_spans, resolve_shape, uniform_spans
from moa_search.kernels import prefill, prefill_hopper as PH
from moa_search.kernels.reference import sparse_attention_reference

OUT = os.environ.get("OUT", "gpu_out"); os.makedirs(OUT, exist_ok=True)
log = open(os.path.join(OUT, "hopper_probe.jsonl"), "a")
def emit(**r):
    print(json.dumps(r), flush=True); log.write(json.dumps(r) + "\n"); log.flush()

def run_h(q, k, v, sink, span, st, en, cfg, lse=False):
    B, Hq, Nq, D = q.shape
    out = torch.full_like(q, float("nan"))
    l = torch.full((B, Hq, Nq), float("nan"), device=q.device) if lse else out
    PH.hopper_prefill(q, k, v, span, st, en, sink, q.shape[-1] ** -0.5, out, l, lse, config=cfg)
    return (out, l) if lse else out

def check(cfg, D=128, dtype=torch.bfloat16, Nq=None):
    g = torch.Generator(device="cuda").manual_seed(1)
    B, Hq, Hkv, N = 2, 8, 2, 1500
    nq = Nq or N
    q = torch.randn(B, Hq, nq, D, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    span = torch.tensor([[5, 40, 1500, 170, 700, 64, 1000, 333], [3, 900, 9, 2000, 128, 129, 1, 1499]], device="cuda")
    st, en = torch.tensor([0, 113], device="cuda"), torch.tensor([1400, 1500], device="cuda")
    o, l = run_h(q, k, v, 64, span, st, en, cfg, lse=True)
    ref, rl = sparse_attention_reference(q.float(), k.float(), v.float(), 64, span, st, en, return_lse=True)
    err = float((o.float() - ref).norm() / ref.norm())
    fin = torch.isfinite(rl)
    lerr = float((l[fin] - rl[fin]).abs().max()) if fin.any() else 0.0
    return err, lerr, bool(torch.isnan(o).any()), bool((torch.isfinite(l) != fin).any())

cfgs = [tuple(map(int, c.split(","))) for c in (sys.argv[1].split(";") if len(sys.argv) > 1 else ["128,3,1"])]
lengths = [int(x) for x in (sys.argv[2].split(",") if len(sys.argv) > 2 else ["16384", "32768"])]
for cfg in cfgs:
    for D in (128, 64):
        for Nq in (None, 700):
            try:
                err, lerr, nan, lmis = check(cfg, D, Nq=Nq)
                emit(kind="check", cfg=cfg, D=D, Nq=Nq, rel_err=err, lse_err=lerr, nan=nan, lse_mismatch=lmis)
            except Exception as e:
                emit(kind="check", cfg=cfg, D=D, error=f"{type(e).__name__}: {str(e)[:500]}")
err, *_ = check(cfgs[0], 128, torch.float16); emit(kind="check", cfg="fp16", rel_err=err)

shape = resolve_shape("llama3-8b"); Hq, Hkv, D, sink = shape.num_query_heads, shape.num_kv_heads, shape.head_dim, 64
bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
from torch.nn.functional import scaled_dot_product_attention as sdpa
for N in lengths:
    q = torch.randn(1, Hq, N, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t_sdpa = bench(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
    flops_dense = 4 * Hq * D * N * (N + 1) / 2
    emit(kind="time", N=N, method="sdpa", ms=t_sdpa, tflops=flops_dense / t_sdpa / 1e9)
    cases = {"dense": np.full(Hq, N), "uniform0.25": uniform_spans(shape, sink, N, 0.25),
             "hetero0.5": hetero_spans(shape, sink, N, 0.5), "hetero0.25": hetero_spans(shape, sink, N, 0.25)}
    from moa_search import rules as R
    for case, sp in cases.items():
        dens = float(np.mean(R.compute_density(sink, np.asarray(sp), N)))
        span = torch.tensor(np.asarray(sp), device="cuda").view(1, Hq)
        ideal = dens * t_sdpa
        t = bench(lambda: prefill.sparse_attention_prefill(q, k, v, sink, span, use_gluon=False))
        emit(kind="time", N=N, case=case, method="triton", ms=t, x_ideal=t / ideal, density=dens)
        st = torch.zeros(1, dtype=torch.long, device="cuda"); en = torch.full((1,), N, dtype=torch.long, device="cuda")
        out = torch.empty_like(q)
        for cfg in cfgs:
            try:
                t = bench(lambda: PH.hopper_prefill(q, k, v, span, st, en, sink, D ** -0.5, out, out, False, config=cfg))
                emit(kind="time", N=N, case=case, method=f"gluon{cfg}", ms=t, x_ideal=t / ideal)
            except Exception as e:
                emit(kind="time", N=N, case=case, method=f"gluon{cfg}", error=f"{type(e).__name__}: {str(e)[:300]}")
