"""`moa bench e2e`: whole-model generation speed as a user measures it, every path in one run.

A model of a named shape with random bf16 weights (or a checkpoint folder, --model) generates
greedily from a random prompt of --prompt-len tokens, through each path:

  hf-default    transformers' generate, its default DynamicCache, SDPA attention
  hf-static     cache_implementation="static", eager (disable_compile=True)
  hf-compiled   cache_implementation="static", compiled (transformers' own torch.compile of the
                decode forward; warmed up by one full run first)
  moa-eager     moa_search.generate(loop="hf"): the plan, its compressed cache, transformers' loop
  moa-graph     moa_search.generate(loop="graph", compile=False): the plan, prompt prefilled in
                chunks into the compressed cache, one CUDA graph replay per token of the
                uncompiled step (transformers' eager decoder layers under the graph)
  moa-compiled  moa_search.generate(loop="graph"), its default: the same with the decode step's
                forward compiled by torch.compile (inductor fuses the layers' elementwise work
                around the cache's decode op; Llama-family models run moa_search.fused's forward,
                q/k/v and gate/up as one matmul each), then captured in the same CUDA graph

at batch 1 and at the largest batch that fits (estimated from the bytes a sequence needs, then
lowered on out-of-memory; capped by --max-batch). Reported per row: time to first token (the
prefill and the first token, ms), decode ms per token and tokens/s (median over --repeats runs;
per token: transformers' loops, the median gap between consecutive tokens (compilation and
graph recording fall in the first gaps); moa-graph and moa-compiled, the replays' total / their
number, the capture reported apart, and the untimed first run's capture, which holds the
compilation, as warm_capture_ms in the JSON), peak GPU memory,
and the decode floor: the bytes a step must read (the weights, less the input embedding, plus
the KV cache it attends to) / the measured HBM bandwidth (a large device copy).

Examples:
    moa bench e2e --model-shape llama-7b --plans 0.5,0.25,moa --prompt-len 16384 --plot e2e.png
    moa bench e2e --model-shape llama3-8b --paths hf-static,moa-graph --batches 1
    moa bench e2e --from-json a.json b.json --plot all.png      # redraw earlier runs, no GPU
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .bench import MODEL_SHAPES, random_model

PATHS = ("hf-default", "hf-static", "hf-compiled", "moa-eager", "moa-graph", "moa-compiled")


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-shape", default="llama-7b", choices=list(MODEL_SHAPES),
                     help="architecture shape with random weights (default llama-7b)")
    src.add_argument("--model", help="a checkpoint folder instead of a named shape")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape (say so when reporting)")
    p.add_argument("--plans", default="0.5",
                   help="comma-separated plans for the moa paths: a number = uniform StreamingLLM plan of that KV "
                        "density at prompt + new tokens; 'moa' = a heterogeneous plan in the official MoA format "
                        "(KV density 0.5, converted like `moa plan convert`); or a plan file (default 0.5)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma-separated subset of {','.join(PATHS)} (with --from-json: the rows drawn)")
    p.add_argument("--prompt-len", type=int, default=16384, help="prompt tokens (default 16384)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per run (default 32)")
    p.add_argument("--batches", default="1,max",
                   help="batches to run: integers and/or 'max' (default 1,max); with --from-json, the rows shown: "
                        "those batches, 'max' = each model, path and plan at its largest batch in the runs read")
    p.add_argument("--max-batch", type=int, default=64, help="cap of the largest batch (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported (default 3)")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="moa-graph and moa-compiled prefill the prompt into the compressed cache in chunks of this "
                        "many tokens")
    p.add_argument("--moa-eager-max", action="store_true", help="also run moa-eager at the largest batch (slow)")
    p.add_argument("--long", type=int, default=0,
                   help="also prefill one prompt of this many tokens (e.g. 131072) at batch 1: the first plan's "
                        "moa-graph (chunked into the compressed cache) and hf-default (dense cache); time and peak")
    p.add_argument("--json", help="write the results here (updated after every row)")
    p.add_argument("--plot", metavar="PNG", help="draw decode ms/token of every row beside its floor")
    p.add_argument("--from-json", metavar="JSON", nargs="+",
                   help="run nothing: read earlier --json results (several runs, several shapes), print their "
                        "tables and draw them with --plot (no GPU needed)")


# ----------------------------------------------------------------------------- model, plans


def build_model(args, device, dtype):
    """The model folder (or GGUF file) of --model, else a random-weight model of --model-shape."""
    if args.model:
        from .models import load_model

        model, _ = load_model(args.model, str(device), str(dtype).removeprefix("torch."), tokenizer=False)
        model = model.requires_grad_(False)
    else:
        model = random_model(args.model_shape, args.layers, args.prompt_len + args.new_tokens, device, dtype)
    gc_ = model.generation_config
    gc_.eos_token_id, gc_.pad_token_id = None, 0           # a benchmark decodes every token: never stop early
    return model


def moa_like(shape, final: int, density: float = 0.5, seed: int = 0) -> dict:
    """A heterogeneous plan in the official MoA format (per query head; alpha counts the 64 sink
    tokens): elastic and fixed heads drawn at random, scaled so the mean KV density at `final`
    is `density`. The query heads of a GQA group share a rule, so the cache keeps that density
    too (a group's cache is its widest head's)."""
    rng = np.random.default_rng(seed)
    L, G = shape.num_layers, shape.group
    a = rng.choice([512.0, 1024.0, 2048.0, 4096.0], size=(L, shape.num_kv_heads)).repeat(G, 1)
    b = rng.choice([0.0, 0.0, 0.125, 0.25, 0.5, 0.75], size=(L, shape.num_kv_heads)).repeat(G, 1)
    lo, hi = 0.0, 8.0
    for _ in range(60):
        s = (lo + hi) / 2
        got = np.mean(np.minimum(s * (a + b * final), final)) / final
        lo, hi = (s, hi) if got < density else (lo, s)
    s = (lo + hi) / 2
    return {"alphas": np.round(s * a).tolist(), "betas": (s * b).tolist()}


def build_plans(model, args) -> list[tuple[str, object]]:
    from .plan import ModelShape, load_plan, plan_from_moa, uniform_plan

    shape = ModelShape.from_config(model.config)
    final = args.prompt_len + args.new_tokens
    out = []
    for item in [x.strip() for x in args.plans.split(",") if x.strip()]:
        if item == "moa":
            out.append(("MoA-format hetero 0.5", plan_from_moa(moa_like(shape, final), shape, source="synthetic")))
            continue
        try:
            d = float(item)
        except ValueError:
            out.append((item, load_plan(item)))
            continue
        sink = 64
        out.append((f"uniform {d:g}", uniform_plan(shape, sink=sink, span_fraction=(d * final - sink) / final)))
    return out


# ----------------------------------------------------------------------------- measuring


def free():
    gc.collect()
    torch.cuda.empty_cache()


def stamps():
    """A stopping criterion that only records when each token was ready (synchronising): its `t`."""
    from transformers import StoppingCriteria

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kw):
            torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Stamps()


def run_once(model, path: str, ids, args) -> tuple[float, float, float]:
    """One generate through `path`: (time to first token s, decode s per token, graph capture s)."""
    from transformers import StoppingCriteriaList

    from . import generation

    new = args.new_tokens
    mask = torch.ones_like(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if path in ("moa-graph", "moa-compiled"):
        timings = {}
        generation.greedy(model, ids, None, new, prefill_chunk=args.prefill_chunk, graph=True, timings=timings,
                          compile=path == "moa-compiled")
        return timings["first_token_s"], timings["decode_s"] / max(1, timings["decode_steps"]), timings["capture_s"]
    stamp = stamps()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, stopping_criteria=StoppingCriteriaList([stamp]))
    with torch.no_grad():
        if path == "hf-default":
            model.generate(input_ids=ids, attention_mask=mask, **kw)
        elif path in ("hf-static", "hf-compiled"):
            model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                           disable_compile=path == "hf-static", **kw)
        elif path == "moa-eager":
            generation.generate(model, input_ids=ids, attention_mask=mask, loop="hf", **kw)
        else:
            raise ValueError(path)
    # per token: the median gap between tokens, so that torch.compile's first decode steps (the
    # compile, the CUDA-graph recording) do not count as decoding
    gaps = [b - a for a, b in zip(stamp.t, stamp.t[1:])]
    return stamp.t[0] - t0, statistics.median(gaps) if gaps else float("nan"), 0.0


def measure(model, path, batch, args, log, warm: bool = True, prompt_len: int | None = None) -> dict | None:
    """Median of --repeats runs at `batch`, after one untimed run if `warm` (Triton's autotuning,
    torch.compile, cuBLAS's choices happen there); None on out-of-memory."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len or args.prompt_len), device="cuda")
    try:
        free()
        torch.cuda.reset_peak_memory_stats()
        first = run_once(model, path, ids, args) if warm else None
        runs = [run_once(model, path, ids, args) for _ in range(args.repeats)]
    except torch.OutOfMemoryError:
        free()
        return None
    ttft = statistics.median(r[0] for r in runs)
    step = statistics.median(r[1] for r in runs)
    res = {"batch": batch, "ttft_ms": 1e3 * ttft, "decode_ms": 1e3 * step, "tokens_per_s": batch / step,
           "capture_ms": 1e3 * statistics.median(r[2] for r in runs),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "decode_ms_runs": [1e3 * r[1] for r in runs]}
    if first is not None:
        res["warm_capture_ms"] = 1e3 * first[2]     # moa-compiled: holds torch.compile's first build
    log(f"  {path} batch {batch}: ttft {res['ttft_ms']:.0f} ms, decode {res['decode_ms']:.2f} ms/token "
        f"({res['tokens_per_s']:.0f} tok/s), peak {res['peak_gib']:.1f} GiB")
    free()
    return res


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: all of them but the input embedding (it
    gathers B rows)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    return total if tied else total - emb.numel() * emb.element_size()


def kv_bytes_per_seq(model, plan, length: int, final: int) -> int:
    """KV bytes one sequence's decode step reads at `length` tokens: dense, or the plan's kept set
    (the compressed cache's slots in use)."""
    from . import rules as R

    cfg = model.config
    L, hq = cfg.num_hidden_layers, cfg.num_attention_heads
    hkv = cfg.num_key_value_heads or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    if plan is None:
        return 2 * L * hkv * length * d * 2
    alpha, beta = plan.query_rules()
    span = R.span(alpha, beta, final, plan.min_span).reshape(L, hkv, hq // hkv).max(-1)
    s0 = min(plan.sink, final)
    held = np.minimum(s0 + np.minimum(span, final - s0), length)
    return int(2 * held.sum() * d * 2)


def largest_batch(model, plan, args) -> int:
    """Batch that should fit: free memory after the weights / (cache + prefill working set) per sequence."""
    cfg = model.config
    final = args.prompt_len + args.new_tokens
    free_b = torch.cuda.mem_get_info()[0] - 3 * 2**30
    tokens = args.prompt_len if plan is None else min(args.prompt_len, args.prefill_chunk)
    work = tokens * (3 * cfg.intermediate_size + 8 * cfg.hidden_size) * 2     # MLP + residual streams, bf16
    per_seq = kv_bytes_per_seq(model, plan, final, final) + work
    return int(max(1, min(args.max_batch, free_b // per_seq)))


def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    import triton

    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    del x, y
    free()
    return 2 * 2 * 2**30 / (ms * 1e-3)


# ----------------------------------------------------------------------------- main


def run(args) -> int:
    from .apply import apply_plan, remove_plan
    from .bench_decode import _versions

    if args.from_json:
        return replot(args.from_json, args.plot, [p.strip() for p in args.paths.split(",") if p.strip()],
                      [b.strip() for b in args.batches.split(",") if b.strip()])
    if not torch.cuda.is_available():
        print("moa bench e2e: needs a CUDA device (or --from-json to redraw earlier results)", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = sorted(set(paths) - set(PATHS))
    if bad:
        print(f"moa bench e2e: unknown paths {bad}; choose from {list(PATHS)}", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    dtype = torch.bfloat16
    model = build_model(args, "cuda", dtype)
    plans = build_plans(model, args)
    final = args.prompt_len + args.new_tokens
    bw = hbm_bandwidth()
    wbytes = weight_bytes(model)
    res = {"model": args.model or args.model_shape, "layers": model.config.num_hidden_layers,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
           "prefill_chunk": args.prefill_chunk, "device": torch.cuda.get_device_name(), "versions": _versions(),
           "hbm_gbps": bw / 1e9, "weight_bytes": wbytes, "command": "moa bench e2e " + " ".join(sys.argv[3:]),
           "rows": []}

    def save():
        res["rows"].sort(key=lambda r: (PATHS.index(r["path"]), r["plan"], r["batch"]))
        if args.json:
            from .files import atomic_write_text

            atomic_write_text(args.json, json.dumps(res, indent=1) + "\n")

    def batches(plan):
        out = []
        for b in args.batches.split(","):
            b = b.strip()
            out.append(largest_batch(model, plan, args) if b == "max" else int(b))
        return out

    def row(path, label, plan, kv_density):
        for i, b in enumerate(batches(plan)):
            if path == "moa-eager" and i > 0 and not args.moa_eager_max:
                continue
            r = None
            try:
                while b >= 1:
                    # the first batch warms the kernels up for the others
                    r = measure(model, path, b, args, log, warm=i == 0)
                    if r is not None:
                        break
                    log(f"  {path} batch {b}: out of memory")
                    b = int(b * 0.75)
            except Exception as e:  # one failing path must not lose the others' rows
                log(f"  {path} batch {b}: failed: {type(e).__name__}: {e}")
                res.setdefault("errors", []).append(f"{path} {label} batch {b}: {type(e).__name__}: {e}")
                free()
                continue
            if r is None:
                continue
            kv = b * kv_bytes_per_seq(model, plan, args.prompt_len + args.new_tokens // 2, final)
            r.update(path=path, plan=label, kv_density=kv_density, floor_ms=1e3 * (wbytes + kv) / bw)
            r["x_floor"] = r["decode_ms"] / r["floor_ms"]
            res["rows"].append(r)
            save()

    if args.long:
        res["long"] = long_prefill(model, plans[0], args, log)
        save()
    # the plan's paths first, transformers' compiled path (the longest to warm up) last
    for label, plan in plans:
        apply_plan(model, plan)
        dens = kv_bytes_per_seq(model, plan, final, final) / kv_bytes_per_seq(model, None, final, final)
        for path in [p for p in paths if p.startswith("moa-")]:
            log(f"{path} ({label}, KV density {dens:.3f}):")
            row(path, label, plan, dens)
        remove_plan(model)
    for path in [p for p in paths if p.startswith("hf-")]:
        log(f"{path}:")
        row(path, "dense", None, 1.0)
    print(format_table(res))
    save()
    if args.plot:
        print(f"wrote {plot_rows([res], args.plot)}")
    return 0


def replot(paths: list[str], png: str | None, keep: list[str] = PATHS, batches: list[str] = ("1", "max")) -> int:
    """--from-json: the tables of earlier runs, and their rows in one picture: the rows of the
    paths in `keep` (--paths) at `batches` (--batches: integers, and 'max' for each model, path
    and plan's largest batch across all the runs, so a later run at a larger batch replaces the
    smaller one in the picture)."""
    from .errors import MoaError

    runs = []
    for path in paths:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            raise MoaError(f"{path}: not a `moa bench e2e --json` result ({e})") from e
        if not isinstance(res, dict) or "rows" not in res:
            raise MoaError(f"{path}: not a `moa bench e2e --json` result (no 'rows')")
        runs.append(dict(res, rows=[r for r in res["rows"] if r.get("path") in keep], source=Path(path).stem))
    key = lambda run, r: (run.get("model"), r.get("path"), r.get("plan"))     # noqa: E731
    largest = {}
    for run in runs:
        for r in run["rows"]:
            largest[key(run, r)] = max(largest.get(key(run, r), 0), r["batch"])
    wanted = {int(b) for b in batches if b != "max"}
    for run in runs:
        run["rows"] = [r for r in run["rows"]
                       if r["batch"] in wanted or ("max" in batches and r["batch"] == largest[key(run, r)])]
        print(format_table(run) + "\n")
    if png:
        print(f"wrote {plot_rows(runs, png)}")
    return 0


def plot_rows(runs: list[dict], path) -> str:
    """One bar per row of every run, its floor as a black tick and x floor written beside: batch 1
    on the left as decode ms per token (latency is what a batch-1 user waits on), larger batches
    on the right as tokens/s (rows there differ in batch, so ms per token would not compare).
    Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(run, r) for run in runs for r in run["rows"]]
    panels = [("batch 1", [x for x in rows if x[1]["batch"] == 1]),
              ("largest batch", [x for x in rows if x[1]["batch"] > 1])]
    panels = [p for p in panels if p[1]]
    height = max(len(p[1]) for p in panels) if panels else 1
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(7.5 * max(1, len(panels)), 1.2 + 0.42 * height),
                             squeeze=False)
    for ax, (title, items) in zip(axes[0], panels):
        labels = [f"{run['model']} {r['path']} {r['plan']} b{r['batch']}" for run, r in items]
        labels = [f"{x} ({run['source']})" if labels.count(x) > 1 and run.get("source") else x
                  for x, (run, _) in zip(labels, items)]                      # the same row from two runs
        ys = range(len(items))
        if title == "batch 1":
            val = [r["decode_ms"] for _, r in items]
            floor = [r["floor_ms"] for _, r in items]
            note = [f" {r['decode_ms']:.2f} ms, {r['x_floor']:.2f}x" for _, r in items]
            xlabel = "decode ms per token (lower is better)"
        else:
            val = [r["tokens_per_s"] for _, r in items]
            floor = [1e3 * r["batch"] / r["floor_ms"] for _, r in items]      # the most tokens/s its bytes allow
            note = [f" {r['tokens_per_s']:.0f} tok/s, {r['x_floor']:.2f}x" for _, r in items]
            xlabel = "decode tokens/s at that batch (higher is better)"
        colors = ["tab:blue" if r["path"].startswith("moa") else "tab:gray" for _, r in items]
        ax.barh(ys, val, color=colors)
        ax.scatter(floor, ys, marker="|", s=300, color="k", zorder=3, label="floor (bytes / HBM bandwidth)")
        for y, v, f, t in zip(ys, val, floor, note):
            ax.text(max(v, f), y, t, va="center", fontsize=8)                  # right of the bar and its tick
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(val + floor) * 1.35)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    dev = sorted({run.get("device", "?") for run in runs})
    fig.suptitle(f"moa bench e2e: whole-model decode, {', '.join(dev)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def long_prefill(model, plan, args, log) -> list[dict]:
    """One prompt of --long tokens at batch 1, to its first token: the plan's chunked prefill into
    the compressed cache (kernels compiled first on a short prompt), then transformers' default
    (dense cache)."""
    from .apply import apply_plan, remove_plan

    out = []
    short = type(args)(**{**vars(args), "new_tokens": 2, "repeats": 1})
    for path, label in (("moa-graph", plan[0]), ("hf-default", "dense")):
        if path == "moa-graph":
            apply_plan(model, plan[1])
        try:
            if path == "moa-graph":  # compiles the kernels on a short prompt (first chunk + one chunk on the cache)
                measure(model, path, 1, short, log, warm=False, prompt_len=2 * args.prefill_chunk)
            r = measure(model, path, 1, short, log, warm=False, prompt_len=args.long)
        except Exception as e:
            log(f"  long {path}: failed: {type(e).__name__}: {e}")
            r = None
        if path == "moa-graph":
            remove_plan(model)
        if r is None:
            out.append({"path": path, "plan": label, "prompt_len": args.long, "fits": False})
            continue
        out.append({"path": path, "plan": label, "prompt_len": args.long, "fits": True, "ttft_ms": r["ttft_ms"],
                    "peak_gib": r["peak_gib"]})
        save_note = f"  long prompt {args.long}: {path} ({label}) first token {r['ttft_ms'] / 1e3:.2f} s, peak {r['peak_gib']:.1f} GiB"
        log(save_note)
    return out


def format_table(res) -> str:
    lines = [f"{res['model']} ({res['layers']} layers), prompt {res['prompt_len']}, {res['new_tokens']} new tokens, "
             f"{res['device']}, HBM copy {res['hbm_gbps']:.0f} GB/s, weights {res['weight_bytes'] / 2**30:.1f} GiB read "
             f"per step; medians of {res['repeats']}",
             "",
             "| path | plan (KV density) | batch | TTFT (ms) | decode ms/token | tokens/s | floor ms | x floor | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['path']} | {r['plan']} ({r['kv_density']:.2f}) | {r['batch']} | {r['ttft_ms']:.0f} | "
                     f"{r['decode_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                     f"{r['peak_gib']:.1f} |")
    for r in res.get("long", []):
        lines.append(f"\nprompt of {r['prompt_len']} tokens, batch 1, {r['path']} ({r['plan']}): " +
                     (f"first token after {r['ttft_ms'] / 1e3:.2f} s, peak {r['peak_gib']:.1f} GiB" if r["fits"]
                      else "out of memory"))
    for e in res.get("errors", []):
        lines.append(f"\nerror: {e}")
    return "\n".join(lines)
