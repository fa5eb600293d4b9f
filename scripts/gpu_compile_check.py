"""The compiled decode step against the uncompiled one on a named shape with random bf16 weights
(GPU): both captured as a CUDA graph and replayed from the same prefilled cache; prints, per
batch, the tokens that agree before the first difference and, when all agree, the relative
error of the cache rows the steps wrote (the compiled forward's keys against the eager ones).

    python3 scripts/gpu_compile_check.py --model-shape llama-7b --layers 2 --batches 1,8

bf16 logits of a random-weight model are close together, so a fused kernel's different rounding
can flip an argmax late in a run; the cache rows say whether the forward itself agrees.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from moa_search import apply_plan, make_cache
from moa_search.bench import random_model
from moa_search.generation import GreedyDecoder, prefill
from moa_search.plan import ModelShape, uniform_plan


def run(model, ids, new: int, compile: bool):
    cache = make_cache(model, max_new_tokens=new)
    with torch.no_grad():
        first = prefill(model, cache, ids).argmax(-1)
        before = [k.clone() for k in cache.kv.keys]
        dec = GreedyDecoder(model, cache, first, torch.full_like(first, ids.shape[1]), new, [], 0, compile=compile)
        t0 = time.perf_counter()
        dec.capture()
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
        for _ in range(new - 2):
            dec.replay()
    torch.cuda.synchronize()
    return dec.out.clone(), cache.kv, before, capture_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="llama-7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    model = random_model(args.model_shape, args.layers, args.prompt_len + args.new_tokens, "cuda", torch.bfloat16)
    final = args.prompt_len + args.new_tokens
    apply_plan(model, uniform_plan(ModelShape.from_config(model.config), sink=64, span_fraction=(0.5 * final - 64) / final))
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.randint(0, model.config.vocab_size, (b, args.prompt_len), device="cuda")
        eager, kv_e, before, cap_e = run(model, ids, args.new_tokens, False)
        comp, kv_c, _, cap_c = run(model, ids, args.new_tokens, True)
        same = (eager == comp).all(0)
        agree = int(same.long().cumprod(0).sum())
        errs = []     # over the rows the decode steps wrote (they differ from the prefilled cache)
        for li, (ke, kc) in enumerate(zip(kv_e.keys, kv_c.keys)):
            written = (ke != before[li]).any(-1)
            x, y = ke[written].float(), kc[written].float()
            errs.append(float((x - y).norm() / x.norm().clamp_min(1e-30)))
        # after a token differs, the rows differ by construction: no error measure then
        row = {"batch": b, "tokens": args.new_tokens, "tokens_equal": bool(same.all()), "agree_before_first_diff": agree,
               "cache_rel_err_max": max(errs) if bool(same.all()) else None, "capture_s_eager": cap_e, "capture_s_compiled": cap_c}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.model_shape, "layers": model.config.num_hidden_layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
