"""One launch of the prefill kernel for Nsight Compute (GPU machine):

    ncu -k regex:_prefill_fwd --launch-skip 2 --launch-count 1 --section ComputeWorkloadAnalysis \\
        --section WarpStateStats python3 scripts/ncu_prefill.py dense 16384
    ncu -k regex:_hopper_fwd ... python3 scripts/ncu_prefill.py dense 16384 gluon

Cases as in `moa bench prefill` (llama3-8b attention shape, bf16, sink 64). The Triton kernel's
block shape is pinned (128x64, 8 warps, 3 stages, TMA) so that no autotuning launches are
counted; with `gluon` the sm_90 kernel (kernels/prefill_hopper.py) runs instead.
"""
import sys

import numpy as np
import torch

from moa_search.bench_prefill import hetero_spans, resolve_shape, uniform_spans
from moa_search.kernels import prefill

case, n = sys.argv[1], int(sys.argv[2])
shape = resolve_shape("llama3-8b")
spans = {"dense": np.full(shape.num_query_heads, n), "hetero0.25": hetero_spans(shape, 64, n, 0.25),
         "uniform0.25": uniform_spans(shape, 64, n, 0.25), "hetero0.5": hetero_spans(shape, 64, n, 0.5)}[case]
g = torch.Generator(device="cuda").manual_seed(n)
q = torch.randn(1, shape.num_query_heads, n, shape.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
k, v = (torch.randn(1, shape.num_kv_heads, n, shape.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(2))
span = torch.as_tensor(spans[None].copy(), dtype=torch.long, device="cuda")
gluon = sys.argv[3:] == ["gluon"]
pin = {} if gluon else dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
for _ in range(3):  # two warm-up launches, then the profiled one
    prefill.sparse_attention_prefill(q, k, v, 64, span, use_gluon=gluon, **pin)
torch.cuda.synchronize()
