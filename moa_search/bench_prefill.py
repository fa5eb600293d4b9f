"""`moa bench prefill`: the block-sparse prefill kernel against dense SDPA and FlexAttention.

One attention layer of the model shape, timed in one run on the current GPU with
triton.testing.do_bench (medians), on fresh random inputs:

    kernel     moa-search's Triton kernel (kernels/prefill.py), even on the all-dense case
               (which a model with a plan runs through SDPA instead: moa_search.attention)
    sdpa       dense causal SDPA: torch's default pick (cuDNN on H100; the ideal's yardstick)
               and the flash backend (FlashAttention-2)
    flex       FlexAttention (torch.compile'd) with the same kept set as a BlockMask
               (create_block_mask with a mask_mod built from moa_search.rules.kept)

Cases at each length: the layer of a plan (--plan), or synthetic rules at each --density:
"hetero" (a realistic plan shape: 3 of 8 KV heads local with fixed 256..2048-token windows,
the others wide elastic windows, scaled to hit the compute density) and "uniform" (every head
the same window, StreamingLLM-like); plus "dense" (every span = N) unless --no-dense.

Columns: compute density (kept pairs / causal pairs), time, effective TFLOP/s on the kept
pairs (4 * D * kept_pairs * heads * batch / time), the ideal time (compute density x the
fastest dense SDPA time, i.e. the default pick) and each method's ratio to it.

Examples:
    moa bench prefill --model-shape llama3-8b --density 0.5,0.25 --lengths 8192,16384,32768
    moa bench prefill --plan plan.json --lengths 16k,32k --json bench.json
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from . import rules as R
from .bench import MODEL_SHAPES
from .files import atomic_write_text
from .plan import ModelShape, load_plan


def add_arguments(p) -> None:
    p.add_argument("--model-shape", default="llama3-8b",
                   help=f"attention shape: one of {', '.join(MODEL_SHAPES)}, or a model directory / config.json "
                        "(default llama3-8b: 32 query heads, 8 KV heads, head_dim 128)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--plan", help="time one layer of this plan (its model shape wins over --model-shape)")
    src.add_argument("--density", default="0.5,0.25",
                     help="comma-separated compute densities for the synthetic hetero/uniform rules (default 0.5,0.25)")
    p.add_argument("--layer", type=int, default=None,
                   help="with --plan: which layer (default: the one whose compute density is closest to the plan's mean)")
    p.add_argument("--lengths", default="8192,16384,32768", help="comma-separated input lengths, e.g. 8k,16k,32k")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="input dtype")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of the synthetic rules (default 64)")
    p.add_argument("--no-dense", action="store_true", help="skip the all-dense case")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles for each length)")
    p.add_argument("--variants", action="store_true",
                   help="also time the Triton kernel with programs in natural head order instead of widest first, "
                        "and (Gluon, sm_90) the kernel with one program per work item instead of one per SM")
    p.add_argument("--tma-variant", action="store_true",
                   help="also time the Triton kernel with K/V loaded through pointers instead of tensor descriptors (TMA)")
    p.add_argument("--no-triton", action="store_true",
                   help="on sm_90, skip the row of the portable Triton kernel (kernel-triton) beside the Gluon one")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    p.add_argument("--rounds", type=int, default=3,
                   help="time every method this many times, interleaved, and report the median (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rules and inputs")
    p.add_argument("--json", dest="json_out", default=None, help="also write every row as JSON to this file")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the effective TFLOP/s of each method per case against the ideal and the 1.2x line")


# ----------------------------------------------------------------------------- spans


def resolve_shape(name: str) -> ModelShape:
    from .errors import MoaError

    if name in MODEL_SHAPES:
        shape = ModelShape.from_config(dict(MODEL_SHAPES[name], model_type="preset"))
        return replace(shape, architecture=name)
    try:
        return ModelShape.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - turn any failure into one clear message
        raise MoaError(f"--model-shape {name!r}: not a preset ({', '.join(MODEL_SHAPES)}) and not a model "
                         f"directory ({e})") from None


def _mean_density(sink, spans, n) -> float:
    return float(np.mean(R.compute_density(sink, np.asarray(spans), n)))


def uniform_spans(shape: ModelShape, sink: int, n: int, density: float) -> np.ndarray:
    """One window for every head, the smallest whose compute density reaches `density`. [Hq]"""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if _mean_density(sink, mid, n) >= density:
            hi = mid
        else:
            lo = mid + 1
    return np.full(shape.num_query_heads, lo, dtype=np.int64)


def hetero_spans(shape: ModelShape, sink: int, n: int, density: float, seed: int = 0) -> np.ndarray:
    """A realistic plan's mix, per KV head (GQA groups share a rule): 3/8 of the KV heads local
    (fixed windows of 256..2048 tokens), the rest wide with spans f * r_h * N (r_h in [0.5, 1]),
    f found by bisection so that the mean compute density is `density` (as close as the
    local heads allow). [Hq]"""
    rng = np.random.default_rng(seed)
    hkv = shape.num_kv_heads
    n_local = max(1, (3 * hkv) // 8)
    local = rng.choice([256, 512, 1024, 2048], size=n_local)
    shares = rng.uniform(0.5, 1.0, size=hkv - n_local)

    def spans(f):
        wide = np.clip(np.floor(f * shares * n), 1, n).astype(np.int64)
        kv = np.concatenate([np.minimum(local, n), wide])[rng_perm]
        return np.repeat(kv, shape.group)

    rng_perm = rng.permutation(hkv)
    lo, hi = 0.0, 2.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if _mean_density(sink, spans(mid), n) >= density:
            hi = mid
        else:
            lo = mid
    return spans(hi)


def plan_layer_spans(plan, n: int, layer: int | None) -> tuple[np.ndarray, int]:
    spans = plan.spans(n)  # [layers, Hq]
    if layer is None:
        dens = R.compute_density(plan.sink, spans, n).mean(-1)
        layer = int(np.argmin(np.abs(dens - dens.mean())))
    if not 0 <= layer < spans.shape[0]:
        raise SystemExit(f"--layer {layer}: the plan has layers 0..{spans.shape[0] - 1}")
    return spans[layer], layer


# ----------------------------------------------------------------------------- timing


@dataclass
class Row:
    n: int
    case: str
    density: float
    method: str
    ms: float
    tflops: float
    ideal_ms: float
    ratio_to_ideal: float
    spread: float = 0.0  # max / min - 1 over the rounds


class _FlexCase:
    """Compiled FlexAttention on the kept set as a BlockMask (positions = indices: no padding).

    The mask_mod reads the spans from one persistent buffer that each case overwrites, so
    torch.compile sees the same function and tensor every time and compiles once per length
    instead of once per case.
    """

    def __init__(self, sink: int, batch: int, heads: int, device):
        from torch.nn.attention.flex_attention import flex_attention

        self.span = torch.zeros(batch, heads, dtype=torch.long, device=device)
        span, self.sink = self.span, sink

        def mask_mod(b, h, q_idx, kv_idx):
            return R.kept(q_idx, kv_idx, sink, span[b, h])

        self.mask_mod = mask_mod
        self.flex = torch.compile(flex_attention, dynamic=False)

    def runner(self, q, k, v, span: torch.Tensor, scale: float):
        from torch.nn.attention.flex_attention import create_block_mask

        B, Hq, N, _ = q.shape
        self.span.copy_(span)
        block_mask = create_block_mask(self.mask_mod, B, Hq, N, N, device=q.device, _compile=True)
        gqa = q.shape[1] != k.shape[1]
        return lambda: self.flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def run(args) -> int:
    from .errors import MoaError, check_counts

    # the arguments first: a typo is reported on any machine, before the GPU is looked for
    lengths = R.lengths_arg("--lengths", args.lengths)
    try:
        densities = [] if args.plan else [float(x) for x in args.density.split(",") if x.strip()]
    except ValueError:
        raise MoaError(f"--density: expected numbers like 0.5,0.25, got {args.density!r}") from None
    densities = [R.check_density(d, "--density") for d in densities]
    check_counts(("--batch", args.batch), ("--rounds", args.rounds))
    if args.sink < 0:
        raise MoaError(f"--sink must be >= 0, got {args.sink}")
    plan = load_plan(args.plan) if args.plan else None
    shape = plan.model if plan else resolve_shape(args.model_shape)
    sink = plan.sink if plan else args.sink
    if not torch.cuda.is_available():
        print("moa bench prefill needs a CUDA GPU (it times Triton kernels, SDPA flash and FlexAttention)", file=sys.stderr)
        return 2
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tqdm import tqdm

    from moa_search.kernels import prefill
    dtype = getattr(torch, args.dtype)
    B, Hq, Hkv, D = args.batch, shape.num_query_heads, shape.num_kv_heads, shape.head_dim
    scale = D ** -0.5
    dev = torch.device("cuda")
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))  # noqa: E731

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"kernel: {'Gluon (sm_90)' if prefill.prefill_hopper.HAVE_GLUON and torch.cuda.get_device_capability()[0] == 9 else 'Triton'} | "
          f"{shape.architecture}: {Hq} query heads, {Hkv} KV heads, head_dim {D} | batch {B} | {args.dtype} | sink {sink}")
    from torch import _dynamo

    _dynamo.config.cache_size_limit = max(64, _dynamo.config.cache_size_limit)
    flex_case = None if args.no_flex else _FlexCase(sink, B, Hq, dev)
    rows: list[Row] = []
    t_start = time.time()
    for n in lengths:
        cases = []
        if plan:
            sp, layer = plan_layer_spans(plan, n, args.layer)
            cases.append((f"plan L{layer}", sp))
        for d in densities:
            cases.append((f"hetero {d:g}", hetero_spans(shape, sink, n, d, args.seed)))
            cases.append((f"uniform {d:g}", uniform_spans(shape, sink, n, d)))
        if not args.no_dense:
            cases.append(("dense", np.full(Hq, n, dtype=np.int64)))

        g = torch.Generator(device=dev).manual_seed(args.seed + n)
        q = torch.randn(B, Hq, n, D, device=dev, dtype=dtype, generator=g)
        k = torch.randn(B, Hkv, n, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, n, D, device=dev, dtype=dtype, generator=g)
        hopper = prefill.prefill_hopper.supported(q, k, v)
        causal_flops = 4 * D * B * Hq * n * (n + 1) / 2

        def sdpa(kk=k, vv=v):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale,
                                                                    enable_gqa=Hq != kk.shape[1])

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                t_flash = float(np.median([bench(sdpa) for _ in range(args.rounds)]))
            except RuntimeError as e:  # an older flash path without GQA: give it repeated K/V
                print(f"# sdpa flash refused enable_gqa ({str(e)[:80]}); timing it on repeated K/V", file=sys.stderr)
                kr, vr = (t.repeat_interleave(Hq // Hkv, 1) for t in (k, v))
                t_flash = bench(lambda: sdpa(kr, vr))
                del kr, vr
        t_default = float(np.median([bench(sdpa) for _ in range(args.rounds)]))
        t_dense = min(t_flash, t_default)  # the ideal's yardstick: the fastest dense causal attention
        rows.append(Row(n, "dense", 1.0, "sdpa-default", t_default, causal_flops / t_default / 1e9, t_dense,
                        t_default / t_dense))
        rows.append(Row(n, "dense", 1.0, "sdpa-flash", t_flash, causal_flops / t_flash / 1e9, t_dense, t_flash / t_dense))
        print(f"  [{time.time() - t_start:5.0f}s] N={n} sdpa-flash {t_flash:.3f} ms ({causal_flops / t_flash / 1e9:.0f} "
              f"TFLOP/s), sdpa-default {t_default:.3f} ms", file=sys.stderr)

        for case, sp in tqdm(cases, desc=f"N={n}", leave=False, file=sys.stderr):
            span = torch.as_tensor(np.broadcast_to(sp, (B, Hq)).copy(), dtype=torch.long, device=dev)
            dens = _mean_density(sink, sp, n)
            kept = float(np.sum(R.kept_pairs(sink, sp, n))) * B
            flops = 4 * D * kept
            ideal = dens * t_dense
            width = float(np.mean(np.minimum(sp, n))) / n  # the host hint a model's layer passes (attention.attend)
            # "kernel" is what a model's layer runs: the Gluon kernel on sm_90, else the Triton one
            methods = {"kernel": lambda: prefill.sparse_attention_prefill(q, k, v, sink, span, scale=scale, width=width)}
            if hopper and not args.no_triton:
                methods["kernel-triton"] = lambda: prefill.sparse_attention_prefill(
                    q, k, v, sink, span, scale=scale, width=width, use_gluon=False)
            if args.variants:
                methods["kernel-natural-order"] = lambda: prefill.sparse_attention_prefill(
                    q, k, v, sink, span, scale=scale, sort_heads=False, width=width, use_gluon=False if hopper else None)
                if hopper:
                    methods["kernel-per-item"] = lambda: prefill.sparse_attention_prefill(
                        q, k, v, sink, span, scale=scale, width=width, persistent=False)
            if args.tma_variant:
                methods["kernel-pointers"] = lambda: prefill.sparse_attention_prefill(
                    q, k, v, sink, span, scale=scale, use_tma=False, width=width, use_gluon=False)
            if not args.no_flex:
                try:
                    methods["flex"] = flex_case.runner(q, k, v, span, scale)
                except Exception as e:  # noqa: BLE001 - report and keep timing the others
                    print(f"flex unavailable at N={n} ({case}): {type(e).__name__}: {e}", file=sys.stderr)
            # rounds: every method once per round, in a rotated order, so that clock and cache
            # drift during the run do not favour whichever method happens to be timed first
            times: dict[str, list[float]] = {name: [] for name in methods}
            for r in range(args.rounds):
                names = list(methods)
                for name in names[r % len(names):] + names[: r % len(names)]:
                    if name not in times:
                        continue
                    try:
                        times[name].append(bench(methods[name]))
                    except Exception as e:  # noqa: BLE001 - one failing method must not lose the others
                        print(f"{name} failed at N={n} ({case}): {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                        del times[name]
            for name, ts in times.items():
                t = float(np.median(ts))
                rows.append(Row(n, case, dens, name, t, flops / t / 1e9, ideal, t / ideal, max(ts) / min(ts) - 1))
                tqdm.write(f"  [{time.time() - t_start:5.0f}s] N={n} {case:<13} {name:<21} {t:8.3f} ms  {flops / t / 1e9:6.1f} TFLOP/s  "
                           f"x{t / ideal:.2f} ideal  (rounds spread {max(ts) / min(ts) - 1:.1%})", file=sys.stderr)
            torch.cuda.empty_cache()
        for key, tuned in prefill._TUNED.items():
            if getattr(tuned, "best_config", None) is not None:
                print(f"# N={n}: kernel config (decode, tma)={key}: {tuned.best_config}", file=sys.stderr)
        del q, k, v
        torch.cuda.empty_cache()

    _print_table(rows)
    if args.plot:
        plot_rows([asdict(r) for r in rows], args.plot, f"{torch.cuda.get_device_name()}, {shape.architecture}, "
                                                         f"batch {B}, {args.dtype}")
    if args.json_out:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "shape": asdict(shape), "batch": B, "dtype": args.dtype, "sink": sink, "argv": sys.argv[1:]}
        atomic_write_text(args.json_out, json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


def _print_table(rows: list[Row]) -> None:
    by = {(r.n, r.case, r.method): r for r in rows}
    print(f"{'N':>6} {'case':<14} {'density':>7} {'method':<21} {'ms':>8} {'TFLOP/s':>8} {'ideal ms':>8} "
          f"{'x ideal':>7} {'flex/kernel':>11} {'spread':>7}")
    for r in rows:
        flex = by.get((r.n, r.case, "flex"))
        speedup = f"{flex.ms / r.ms:11.2f}" if (flex and r.method == "kernel") else " " * 11
        print(f"{r.n:>6} {r.case:<14} {r.density:>7.3f} {r.method:<21} {r.ms:>8.3f} {r.tflops:>8.1f} "
              f"{r.ideal_ms:>8.3f} {r.ratio_to_ideal:>7.2f} {speedup} {r.spread:>7.1%}")


def plot_rows(rows: list[dict], path, title: str = ""):
    """Effective TFLOP/s (kept pairs) of each method per case, one panel per length, with the
    ideal (the fastest dense SDPA's rate: time = compute density x its time) and the 1.2x-ideal
    line of the target. rows: Row dicts (a run's --json "rows"). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["n"] for r in rows})
    methods = [m for m in ("kernel", "kernel-natural-order", "kernel-pointers", "flex")
               if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        at = [r for r in rows if r["n"] == n]
        cases = list(dict.fromkeys(r["case"] for r in at if not r["method"].startswith("sdpa")))
        by = {(r["case"], r["method"]): r for r in at}
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(cases))]
            ys = [by[(case, m)]["tflops"] if (case, m) in by else 0.0 for case in cases]
            ax.bar(xs, ys, width, label=m)
        dense = [r for r in at if r["method"].startswith("sdpa")]
        if dense:
            best = max(r["tflops"] for r in dense)
            ax.axhline(best, color="k", lw=1, label="ideal (dense SDPA rate)")
            ax.axhline(best / 1.2, color="k", lw=1, ls="--", label="ideal / 1.2 (target)")
        ax.set_xticks(range(len(cases)), cases, rotation=20)
        ax.set_ylabel("TFLOP/s on kept pairs")
        ax.set_title(f"N = {n}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"block-sparse prefill vs FlexAttention{': ' + title if title else ''}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
