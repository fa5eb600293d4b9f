"""How much of the prefill kernel's work is waste at the window edges, and how evenly its work
items spread over the SMs (CPU, no GPU needed).

For every (query block, head) work item of `moa bench prefill`'s synthetic cases, counts the key
blocks the kernels visit, with the kernels' own `_item_blocks` (run under the Triton
interpreter), and compares the computed (row, key) pairs with the kept ones (moa_search.rules),
also with the Gluon kernel's half-width sink blocks (_sink_fits).

The last two columns model the Gluon kernel's persistent schedule with an item costing its
blocks (a half-width sink block as half) plus one block of fixed cost: the busiest program's work
over the mean, when items go round-robin (item i to program i % SMs) and when each program takes
the next free item as it finishes one (the kernel's schedule: an atomic counter).

    python scripts/block_waste.py --lengths 16384,32768 --block 128 --sms 132
"""
import argparse
import heapq
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: _item_blocks runs on the CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moa_search import rules as R  # noqa: E402
from moa_search.bench_prefill import hetero_spans, resolve_shape, uniform_spans  # noqa: E402
from moa_search.kernels.prefill import _item_blocks, _sink_fits  # noqa: E402


@triton.jit
def _count(SPAN, OUT, sink, N, BLOCK: tl.constexpr):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.minimum(tl.load(SPAN + h), N)
    sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_int, T = _item_blocks(mb * BLOCK, mb * BLOCK + BLOCK - 1, 0, N, s,
                                                                    sink, N, BLOCK)
    o = OUT + (h * tl.num_programs(0) + mb) * 3
    tl.store(o, T)
    tl.store(o + 1, T - c_int)  # the blocks that need a token mask
    tl.store(o + 2, _sink_fits(c_sink, 0, sink, a, sink_lo, BLOCK // 2).to(tl.int32))  # Gluon: half a block


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--block", type=int, default=128, help="query and key block size (the Gluon kernel's: 128)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--sms", type=int, default=132, help="persistent programs (an H100 SXM has 132 SMs)")
    args = ap.parse_args()
    shape = resolve_shape("llama3-8b")
    print("    N | case         | kept / computed | with half sink | masked blocks | blocks per item "
          "| round-robin max / mean | next-free max / mean")
    for n in (int(x) for x in args.lengths.split(",")):
        cases = [(f"{kind} {d:g}", spans(shape, args.sink, n, d))
                 for d in (0.5, 0.25) for kind, spans in (("hetero", hetero_spans), ("uniform", uniform_spans))]
        for name, sp in cases + [("dense", np.full(shape.num_query_heads, n))]:
            num_m = triton.cdiv(n, args.block)
            out = torch.zeros(len(sp), num_m, 3, dtype=torch.int32)
            _count[(num_m, len(sp))](torch.as_tensor(sp), out, args.sink, n, BLOCK=args.block)
            blocks, masked, halves = (int(out[..., i].sum()) for i in range(3))
            kept = float(np.sum(R.kept_pairs(args.sink, sp, n)))
            static, dynamic = _balance(out, args.sms)
            print(f"{n:5d} | {name:<12} | {kept / (blocks * args.block ** 2):15.3f} | "
                  f"{kept / ((blocks - halves / 2) * args.block ** 2):14.3f} | {masked / blocks:13.3f} | "
                  f"{blocks / out[..., 0].numel():15.1f} | {static:22.3f} | {dynamic:20.3f}")


def _balance(counts, sms: int, item_cost: float = 1.0) -> tuple[float, float]:
    """Busiest program's work / mean work, round-robin and next-free, for _count's counts
    [H, M, 3] taken in the Gluon kernel's item order (last query block first, then head)."""
    work = counts[..., 0].double() - counts[..., 2].double() / 2 + item_cost  # [H, M]
    items = work.flip(1).T.flatten().numpy()  # item i: query block M-1 - i // H, head i % H
    static = np.bincount(np.arange(len(items)) % sms, weights=items, minlength=sms)
    free = [(0.0, p) for p in range(sms)]  # (work so far, program): the first to finish takes the next
    for w in items:
        t, p = heapq.heappop(free)
        heapq.heappush(free, (t + w, p))
    mean = items.sum() / sms
    return static.max() / mean, max(t for t, _ in free) / mean


if __name__ == "__main__":
    main()
