"""Are the decode step's matmuls at small batch as fast as reading their weights allows? (GPU)

At batch 1 the compiled step's four matmuls per layer (q/k/v, o, gate/up, down: moa_search.fused)
take 3.84 ms on the Llama-3-8B shape against a 3.29 ms floor, and cuBLAS runs them split-K with a
separate reduce launch (BENCHMARKS.md, issue 18, "Session 9"). This probe times, for each matmul
of a shape over all layers (distinct weights, so nothing sits in L2; CUDA graph), at batch M:
  cublas    F.linear (what the step runs today)
  triton    a plain Triton x @ W^T for M <= 16, whole K per program (no split-K), autotuned
  inductor  (--inductor) torch.compile(mode="max-autotune-no-cudagraphs") of F.linear: inductor's
            own matmul templates against cuBLAS (minutes of autotuning)
and prints ms per step and GB/s. A result here is a reason to build (or not) a GEMV path into
moa_search; it is not a number for BENCHMARKS' tables.

    python3 scripts/gemv_probe.py --model-shape llama3-8b --batches 1,8 --json $OUT/gemv_probe.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moa_search.bench import MODEL_SHAPES, graph_ms


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bn in (16, 32, 64) for bk in (128, 256) for w in (4, 8) for s in (3, 4, 5)],
    key=["N", "K", "M"])
@triton.jit
def _small_m_matmul(X, W, Y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[M, N] = X[M, K] @ W[N, K]^T for M <= BLOCK_M (16): one program per BLOCK_N outputs,
    the whole K in its loop (X, W, Y contiguous)."""
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(W + n[:, None].to(tl.int64) * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(Y + m[:, None] * N + n[None, :], acc.to(Y.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


def small_m_matmul(x, w):
    """x [M, K] (M <= 16) @ w [N, K]^T -> [M, N], in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _small_m_matmul[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x, w, y, M, N, K, BLOCK_M=16)
    return y


def shapes(name: str) -> dict:
    c = MODEL_SHAPES[name]
    H, I, hq = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    d = H // hq
    hkv = c.get("num_key_value_heads", hq)
    return {"qkv": (hq * d + 2 * hkv * d, H), "o": (H, hq * d), "gate_up": (2 * I, H), "down": (H, I)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama3-8b", choices=list(MODEL_SHAPES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--bandwidth", type=float, default=4.24e12, help="bytes/s the floor assumes (HBM copy)")
    p.add_argument("--inductor", action="store_true", help="also inductor's max-autotune matmuls (slow to build)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    out = []
    for name, (N, K) in shapes(args.model_shape).items():
        W = [torch.randn(N, K, dtype=dt, device=dev) * 0.02 for _ in range(args.layers)]
        nbytes = N * K * 2 * args.layers
        for M in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(M, K, dtype=dt, device=dev)
            want = F.linear(x, W[0]).float()
            row = {"matmul": name, "N": N, "K": K, "M": M, "floor_ms": 1e3 * nbytes / args.bandwidth}
            row["cublas_ms"] = graph_ms(lambda: [F.linear(x, w) for w in W])
            if M <= 16:
                got = small_m_matmul(x, W[0]).float()
                row["triton_err"] = float((got - want).abs().max() / want.abs().max())
                row["triton_ms"] = graph_ms(lambda: [small_m_matmul(x, w) for w in W])
                row["triton_config"] = str(_small_m_matmul.best_config)
            if args.inductor:
                lin = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                row["inductor_ms"] = graph_ms(lambda: [lin(x, w) for w in W])
            for k in ("cublas", "triton", "inductor"):
                if f"{k}_ms" in row:
                    row[f"{k}_gbps"] = nbytes / (row[f"{k}_ms"] * 1e-3) / 1e9
            out.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del W
        torch.cuda.empty_cache()
    for M in sorted({r["M"] for r in out}):
        rows = [r for r in out if r["M"] == M]
        line = f"M={M}: floor {sum(r['floor_ms'] for r in rows):.3f} ms"
        for k in ("cublas", "triton", "inductor"):
            if all(f"{k}_ms" in r for r in rows):
                line += f", {k} {sum(r[f'{k}_ms'] for r in rows):.3f} ms"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
