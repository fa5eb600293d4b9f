"""Why MoA plans lose passkey retrieval on SmolLM2-135M-Instruct (issue 19): the numbers behind
docs/smollm2_h200/why_retrieval.md, on the CPU.

Stages (each writes OUT/<stage>.json and prints a table; later stages read earlier ones):

  attn     Q1: on dense (eager attention), the attention mass every query head puts on the
           needle's key tokens from the answer rows (teacher forcing with the reference), for
           passkey items at 1024 with the needle at depth <= 0.6.
  spans    Q2: the window every plan gives those heads at N = the item's length, and whether it
           reaches the needle (sink + window, the kept set of rules.kept).
  profile  Q3: loss tables from `moa profile` output(s) (--profiles DIR, repeatable): per KV head,
           the predicted loss of shrinking it to each plan's span, its rank, and where the
           retrieval heads' influence sits (which query rows, which layers).
  profile_subset  `moa profile` at 1024 on one task's rows of a calibration set (--task passkey).
  search1k the search's 0/1 program on one profile folder alone (--budget, default 0.5).
  confidence  per calibration answer token: p(target); d loss/d logits = p - onehot, so
           saturated tokens send no gradient to any head.
  ablate   Q3 check: the measured answer-loss increase (teacher forced, correct reference) of
           narrowing ONE KV head to a 128-token window, for the top retrieval heads and the heads
           the profile ranks highest, next to the profile's prediction.
  counter  Q4: passkey accuracy (greedy generation, is_correct) and forced answer loss at 1024 of
           the searched MoA@0.5 plan vs the same plan with the top retrieval KV heads at full span
           (optionally other heads narrowed to keep the KV density), --seed for held-out items.
  plot     the figure of docs/smollm2_h200/why_retrieval.md.

Full command list: docs/smollm2_h200/why_retrieval.md ("Reproduce").

    pip install -e ".[gguf]"     # repository root; model: moa convert-gguf X.gguf -o /tmp/smol_model --dtype float32
    python scripts/why_retrieval.py attn --out /tmp/wr
    python scripts/why_retrieval.py spans --out /tmp/wr --plan moa0.5=docs/smollm2_h200/table/plan_moa0.5.json ...
    python scripts/why_retrieval.py profile --out /tmp/wr --profiles /tmp/wr/prof1k --plan ...
    python scripts/why_retrieval.py ablate --out /tmp/wr --profiles /tmp/wr/prof1k
    python scripts/why_retrieval.py counter --out /tmp/wr --plan moa0.5=docs/smollm2_h200/table/plan_moa0.5.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "/tmp/smol_model"
GROUP = 3          # query heads per KV head (9 / 3)


# ----------------------------------------------------------------------------- helpers


def load(model_dir: str, eager: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"attn_implementation": "eager"} if eager else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True, **kw).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def passkey_items(tok, n_items: int, max_depth: float, length: int = 1024, per_length: int = 16,
                  seed: int | None = None):
    """Eval-recipe passkey items at `length` (the held-out seed, as `moa eval`; `seed` another), depth <= max_depth."""
    from moa_search.eval import eval_items

    items = eval_items(tok, [length], per_length, None, seed, ["passkey"], None, 48)
    items = [it for it in items if it["depth"] <= max_depth + 1e-9]
    return items[:n_items]


def locate(tok, item: dict):
    """(prompt ids, reference ids, key token positions, needle-line token positions)."""
    from moa_search.calibrate import prompt_ids
    from moa_search.calibration_data.tasks import split_answer_cue
    from moa_search.eval import _tokenize

    p, r = _tokenize(tok, item["prompt"], item["reference"])
    body, cue = split_answer_cue(item["prompt"])
    text = tok.apply_chat_template([{"role": "user", "content": body.rstrip("\n") or body}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc.input_ids) == p[: len(enc.input_ids)], "offsets do not match prompt_ids"
    assert p == prompt_ids(tok, item["prompt"])
    key = item["reference"]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    c0 = text.find(needle)
    assert c0 >= 0, "needle not found"
    key_chars = [(c0 + needle.find(key), c0 + needle.find(key) + len(key)),
                 (c0 + needle.rfind(key), c0 + needle.rfind(key) + len(key))]
    off = enc.offset_mapping
    line = [t for t, (a, b) in enumerate(off) if a < c0 + len(needle) and b > c0]
    keys = [t for t, (a, b) in enumerate(off) if any(a < y and b > x for x, y in key_chars)]
    return p, r, keys, line


def plans_arg(values):
    from moa_search.plan import load_plan

    out = {}
    for v in values or []:
        name, _, path = v.partition("=")
        out[name] = load_plan(path)
    return out


def save(out: Path, name: str, obj) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(obj, indent=1))
    print(f"wrote {out / name}.json")


def read(out: Path, name: str):
    return json.loads((out / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- Q1


@torch.no_grad()
def stage_attn(args):
    model, tok = load(args.model, eager=True)
    items = passkey_items(tok, args.items, args.max_depth)
    key_mass, line_mass, rows_info = [], [], []
    t0 = time.time()
    for it in items:
        p, r, keys, line = locate(tok, it)
        ids = torch.tensor([p + r])
        out = model(input_ids=ids, output_attentions=True, logits_to_keep=len(r) + 1)
        rows = list(range(len(p) - 1, len(p) + len(r) - 1))       # the rows that predict the reference
        pred = out.logits[0, :-1].argmax(-1).tolist()
        km = torch.stack([a[0][:, rows][:, :, keys].sum(-1).mean(-1) for a in out.attentions])   # [L, H]
        lm = torch.stack([a[0][:, rows][:, :, line].sum(-1).mean(-1) for a in out.attentions])
        key_mass.append(km.numpy())
        line_mass.append(lm.numpy())
        rows_info.append({"id": it["id"], "depth": it["depth"], "n_prompt": len(p), "n_ref": len(r),
                          "keys": keys, "line": [line[0], line[-1]], "distance": len(p) - 1 - keys[0],
                          "forced_correct": pred == r})
        del out
        print(f"{it['id']} depth {it['depth']:.3f}: {len(p)} tokens, key tokens {keys}, distance "
              f"{len(p) - 1 - keys[0]}, forced correct {pred == r}  ({time.time() - t0:.0f} s)")
    km, lm = np.mean(key_mass, 0), np.mean(line_mass, 0)                 # [L, H]
    res = {"items": rows_info, "key_mass": km.tolist(), "line_mass": lm.tolist(),
           "key_mass_per_item": np.array(key_mass).tolist()}
    save(args.out, "attn", res)
    print_attn(res)


def kv_mass(km: np.ndarray) -> np.ndarray:
    """[L, Hq] -> [L, Hkv]: the largest of the group (one retrieval head makes the KV head needed)."""
    return km.reshape(km.shape[0], -1, GROUP).max(-1)


def print_attn(res, top: int = 15):
    km = np.array(res["key_mass"])
    lm = np.array(res["line_mass"])
    n_key = np.mean([len(x["keys"]) for x in res["items"]])
    print(f"\nmass on the {n_key:.0f} key tokens from the answer rows (uniform over ~1000 keys would be "
          f"{n_key / 1000:.4f}); mean over {len(res['items'])} items")
    order = np.argsort(-km.ravel())[:top]
    print(" rank  layer  qhead  kvhead  key_mass  needle_line_mass")
    for k, f in enumerate(order):
        l, h = divmod(int(f), km.shape[1])
        print(f" {k + 1:4d}  {l:5d}  {h:5d}  {h // GROUP:6d}  {km[l, h]:8.3f}  {lm[l, h]:8.3f}")
    per_layer = km.max(1)
    print("layer max key mass:", " ".join(f"{l}:{v:.2f}" for l, v in enumerate(per_layer)))


# ----------------------------------------------------------------------------- Q2


def top_kv_heads(km: np.ndarray, k: int):
    kv = kv_mass(km)
    order = np.argsort(-kv.ravel())[:k]
    return [divmod(int(f), kv.shape[1]) for f in order], kv


def reaches(it: dict, q: int, sink: int, span: int) -> bool:
    """Row q keeps every token of at least one of the needle's two copies of the key."""
    from moa_search import rules as R

    keys = np.array(it["keys"])
    half = len(keys) // 2
    return any(bool(R.kept(q, k, sink, span).all()) for k in (keys[:half], keys[half:]))


def stage_spans(args):
    att = read(args.out, "attn")
    km = np.array(att["key_mass"])
    heads, kv = top_kv_heads(km, args.top)
    plans = plans_arg(args.plan)
    items = att["items"]
    res = {"heads": [], "plans": list(plans)}
    print(f"\ntop {args.top} retrieval KV heads; window at N (sink {next(iter(plans.values())).sink} always kept); "
          "reach = share of items where the first answer row keeps one whole copy of the key (sink + window)")
    print(" layer kv  mass  " + "  ".join(f"{n:>16s}" for n in plans))
    for l, g in heads:
        row = {"layer": l, "kv_head": g, "key_mass": float(kv[l, g]), "plans": {}}
        cells = []
        for name, plan in plans.items():
            reach, spans = [], []
            for it in items:
                n = it["n_prompt"] + 1                     # length when the first answer token is decoded
                s = int(plan.kv_spans(n)[l, g])
                spans.append(s)
                q = it["n_prompt"] - 1 + 1                 # that token's row
                reach.append(reaches(it, q, plan.sink, s))
            row["plans"][name] = {"span": int(np.median(spans)), "reach": float(np.mean(reach))}
            cells.append(f"{int(np.median(spans)):5d} reach {np.mean(reach):4.0%}")
        res["heads"].append(row)
        print(f" {l:5d} {g:2d}  {kv[l, g]:.3f}  " + "  ".join(f"{c:>16s}" for c in cells))
    # all-heads view: how much of the total key mass (sum over heads) each plan's windows still see
    for name, plan in plans.items():
        seen, total = 0.0, 0.0
        kept_heads = 0
        for it, per in zip(items, att["key_mass_per_item"]):
            per = np.array(per)                             # [L, Hq]
            n = it["n_prompt"] + 1
            spans = plan.spans(n)                           # [L, Hq]
            ok = np.array([[reaches(it, it["n_prompt"], plan.sink, int(spans[l, h]))
                            for h in range(spans.shape[1])] for l in range(spans.shape[0])])
            seen += float((per * ok).sum())
            total += float(per.sum())
            kept_heads += int(ok.sum())
        res.setdefault("mass_seen", {})[name] = seen / total
        res.setdefault("heads_reaching", {})[name] = kept_heads / len(items)
        print(f"{name}: the windows still see {seen / total:.1%} of the dense key mass (summed over heads); "
              f"{kept_heads / len(items):.1f} of 270 query heads reach the needle per item")
    save(args.out, "spans", res)


# ----------------------------------------------------------------------------- Q3


def influence_of(path):
    from moa_search.profiler.io import load_profile

    prof = load_profile(path)
    return prof, prof.influence.double().numpy()


def stage_profile(args):
    from moa_search import rules as R
    from moa_search.loss_tables import loss_table

    att = read(args.out, "attn")
    km = np.array(att["key_mass"])
    heads, kv = top_kv_heads(km, args.top)
    plans = plans_arg(args.plan)
    res = {"profiles": {}}
    for pdir in args.profiles:
        for f in sorted(Path(pdir).glob("influence_*.safetensors")):
            prof, infl = influence_of(f)
            n, bs = prof.length, prof.block_size
            Lh, Hq, nb, _ = infl.shape
            tag = f"{pdir}:{n}"
            # predicted loss of every KV head at the spans of interest (sum of its query heads)
            spans = [128, 256, 384, 512, 768]
            rules = [R.Rule(float(s), 0.0) for s in spans]
            lt = loss_table(infl, n, bs, 64, rules).reshape(Lh, Hq // GROUP, GROUP, len(rules)).sum(2)  # [L, Hkv, S]
            kvtot = infl.reshape(Lh, Hq // GROUP, GROUP, nb, nb).sum((2, 3, 4))                          # [L, Hkv]
            # far influence: keys more than 256 tokens (4 blocks) behind the query block, sink excluded
            bq, bk = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
            far = ((bq - bk) >= 4) & (bk >= 1)
            far_kv = (infl * far).reshape(Lh, Hq // GROUP, GROUP, nb, nb).sum((2, 3, 4))
            # which query rows carry it: the last block row (where the answer sits) vs the others
            last = np.zeros((nb, nb), bool)
            last[nb - 1] = True
            far_last = (infl * (far & last)).reshape(Lh, Hq // GROUP, GROUP, nb, nb).sum((2, 3, 4))
            flat = lt[..., 0].ravel()                                        # shrink to 128
            ranks = (-flat).argsort().argsort().reshape(lt.shape[:2]) + 1    # 1 = most costly
            entry = {"length": n, "samples": prof.samples, "block_size": bs,
                     "loss_mean": prof.extra.get("loss_mean"), "spans": spans, "heads": []}
            print(f"\nprofile {tag} ({prof.samples} samples): predicted loss of a 128-token window, per KV head")
            print(" layer kv  keymass  loss@128 rank/90  far_infl  far_last_row_share  total_infl")
            for l, g in heads:
                d = {"layer": l, "kv_head": g, "key_mass": float(kv[l, g]),
                     "loss": lt[l, g].tolist(), "rank128": int(ranks[l, g]), "far": float(far_kv[l, g]),
                     "far_last_share": float(far_last[l, g] / max(far_kv[l, g], 1e-30)), "total": float(kvtot[l, g])}
                entry["heads"].append(d)
                print(f" {l:5d} {g:2d}  {kv[l, g]:7.3f}  {lt[l, g, 0]:8.4f}  {ranks[l, g]:3d}/90  {far_kv[l, g]:8.4f}  "
                      f"{d['far_last_share']:18.2f}  {kvtot[l, g]:10.4f}")
            order = np.argsort(-flat)[:12]
            print(" the 12 KV heads the profile says cost most at 128:")
            top = []
            for f_ in order:
                l, g = divmod(int(f_), lt.shape[1])
                top.append({"layer": l, "kv_head": g, "loss128": float(lt[l, g, 0]), "key_mass": float(kv[l, g]),
                            "far_last_share": float(far_last[l, g] / max(far_kv[l, g], 1e-30))})
                print(f"   L{l:02d} kv{g}: loss@128 {lt[l, g, 0]:.4f}  key mass {kv[l, g]:.3f}  "
                      f"far share from the last row block {top[-1]['far_last_share']:.2f}")
            entry["top_by_profile"] = top
            # per layer: share of the total predicted loss@128 by layer band
            per_layer = lt[..., 0].sum(1)
            entry["loss128_per_layer"] = per_layer.tolist()
            print(" predicted loss@128 per layer:", " ".join(f"{l}:{v:.3f}" for l, v in enumerate(per_layer)))
            # rank correlation between retrieval mass and profile cost, over the 90 KV heads
            from scipy.stats import spearmanr

            rho = spearmanr(kv.ravel(), flat).correlation
            entry["spearman_keymass_vs_loss128"] = float(rho)
            print(f" Spearman(key mass, predicted loss@128) over 90 KV heads: {rho:.2f}")
            # the same, counting only the influence of the last row block (the answer rows)
            lt_last = np.einsum("lhqk,rqk->lhr", infl * last, R.block_drop_fraction(n, bs, 64, spans))
            lt_last = lt_last.reshape(Lh, Hq // GROUP, GROUP, len(spans)).sum(2)
            rho2 = spearmanr(kv.ravel(), lt_last[..., 0].ravel()).correlation
            entry["spearman_keymass_vs_loss128_lastrow"] = float(rho2)
            ranks_last = (-lt_last[..., 0].ravel()).argsort().argsort().reshape(lt.shape[:2]) + 1
            entry["rank128_lastrow"] = {f"L{l}kv{g}": int(ranks_last[l, g]) for l, g in heads}
            print(f" answer-row block only: Spearman {rho2:.2f}; ranks of the retrieval heads "
                  + ", ".join(f"L{l}kv{g}:{ranks_last[l, g]}" for l, g in heads))
            for name, plan in plans.items():
                s = plan.kv_spans(n)
                pl = {}
                for l, g in heads:
                    pl[f"L{l}kv{g}"] = int(s[l, g])
                entry.setdefault("plan_spans", {})[name] = pl
            res["profiles"][tag] = entry
    save(args.out, "profile_" + "_".join(Path(d).name for d in args.profiles), res)


def stage_profile_subset(args):
    """`moa profile` at 1024 on the rows of a calibration set whose task is --task (e.g. the 4
    passkey items, all answered right): is the retrieval signal there when nothing else dilutes it?"""
    from moa_search.calibrate import load_calibration
    from moa_search.profiler.profile import profile_influence

    model, _ = load(args.model)
    ds = load_calibration(args.calibration[0])
    keep = [i for i, t in enumerate(ds["task"]) if t == args.task]
    profile_influence(model, ds.select(keep), [1024], args.out / f"prof1k_{args.task}", plots=False)


@torch.no_grad()
def stage_confidence(args):
    """Per calibration sample: the answer loss the profiler differentiates and how saturated its
    softmax is. d loss / d logits = p - onehot, so a token the model predicts with p ~ 1 sends
    (almost) no gradient back to any head: mean (1 - p_target) is the scale of the influence."""
    from moa_search.calibrate import load_calibration
    from moa_search.calibration_data.tasks import is_correct

    model, tok = load(args.model)
    res = []
    for cdir in args.calibration:
        ds = load_calibration(cdir)
        for row in ds:
            ids = torch.tensor([row["input_ids"]])
            rs, re_ = row["response_start"], row["response_end"]
            logits = model(input_ids=ids, logits_to_keep=re_ - rs + 1).logits[0, : re_ - rs].float()
            tgt = ids[0, rs:re_]
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]
            p = lp.exp()
            toks = [tok.decode([t]) for t in tgt.tolist()]
            digit = torch.tensor([t.strip().isdigit() for t in toks])
            d = {"calibration": cdir, "id": row["id"], "task": row["task"], "correct": is_correct(row["answer"], row["reference"]),
                 "n_answer": re_ - rs, "loss": float(-lp.mean()), "one_minus_p": float((1 - p).mean()),
                 "digit_one_minus_p": float((1 - p[digit]).mean()) if digit.any() else None,
                 "format_one_minus_p": float((1 - p[~digit]).mean()) if (~digit).any() else None,
                 "tokens": toks, "p": p.tolist()}
            res.append(d)
            print(f"{row['id']:22s} correct {d['correct']!s:5s} tokens {d['n_answer']:2d}  loss {d['loss']:.3f}  "
                  f"mean(1-p) {d['one_minus_p']:.3f}  digits {d['digit_one_minus_p']}  "
                  f"other {d['format_one_minus_p']}")
    save(args.out, "confidence", res)


# ----------------------------------------------------------------------------- Q3: search at 1k alone


def stage_search1k(args):
    """The same 0/1 program as `moa search`, on the 1024 profile alone (the GPU plans minimised
    the loss at 4096, the longest profiled length, with 1e-4 weight on 1024): which spans does
    the 1024 profile itself ask for?"""
    from moa_search import milp
    from moa_search.loss_tables import load_tables, make_problem, plan_from_choice
    from moa_search.plan import save_plan

    att = read(args.out, "attn")
    heads, kv = top_kv_heads(np.array(att["key_mass"]), args.top)
    for pdir in args.profiles:
        tables = load_tables(pdir, sink=64, progress=False)
        problem = make_problem(tables, args.budget, "kv", "kv_head")
        sol = milp.solve(problem, np.ones(len(tables.lengths)))
        plan = plan_from_choice(tables, sol.choice, "kv_head", profiled_lengths=list(tables.lengths),
                                budget={"kind": "kv", "density": args.budget, "lengths": list(tables.lengths)},
                                predicted_loss={str(n): float(v) for n, v in zip(tables.lengths, sol.losses)})
        path = args.out / f"plan_{Path(pdir).name}_{args.budget:g}.json"
        save_plan(plan, path)
        n = 967
        s = plan.kv_spans(n)
        print(f"{path}: status {sol.status}, kv density@{n} {plan.densities(n)['kv_cache_density']:.3f}, "
              f"predicted loss {sol.losses}")
        print("  retrieval heads' windows at N=967: " + ", ".join(f"L{l}kv{g}:{s[l, g]}" for l, g in heads))
        print("  windows per layer at N=967:\n  " + "\n  ".join(f"L{l:02d} {s[l].tolist()}" for l in range(len(s))))


# ----------------------------------------------------------------------------- Q3 check: ablation


def narrowed_plan(shape, spans_kv: np.ndarray, sink: int = 64):
    """A plan with fixed windows (beta 0) per KV head: alpha = span."""
    from moa_search.plan import Plan

    return Plan(model=shape, alpha=spans_kv.astype(float).tolist(), beta=np.zeros_like(spans_kv, float).tolist(),
                sink=sink, granularity="kv_head")


@torch.no_grad()
def forced_loss(model, tok, items):
    """Mean answer loss (correct reference, teacher forced) and forced exact-match rate."""
    from moa_search.eval import score_batch

    rows = score_batch(model, tok, items, metrics=("retrieval", "ppl"), mode="forced")
    return float(np.mean([r["loss"] for r in rows])), float(np.mean([r["correct"] for r in rows]))


def stage_ablate(args):
    from moa_search.apply import apply_plan, remove_plan
    from moa_search.plan import ModelShape

    att = read(args.out, "attn")
    km = np.array(att["key_mass"])
    heads, kv = top_kv_heads(km, args.top)
    prof = read(args.out, "profile_" + Path(args.profiles[0]).name)["profiles"]
    entry = next(iter(v for v in prof.values() if v["length"] == 1024))
    by_prof = [(h["layer"], h["kv_head"]) for h in entry["top_by_profile"][: args.top]]
    model, tok = load(args.model)
    shape = ModelShape.from_config(model.config)
    items = passkey_items(tok, args.items, args.max_depth)
    base_loss, base_acc = forced_loss(model, tok, items)
    print(f"dense: answer loss {base_loss:.4f}, forced exact match {base_acc:.2f} ({len(items)} items)")
    pred = {}
    for d in entry["heads"]:
        pred[(d["layer"], d["kv_head"])] = d["loss"][0]
    for d in entry["top_by_profile"]:
        pred[(d["layer"], d["kv_head"])] = d["loss128"]
    res = {"dense": {"loss": base_loss, "acc": base_acc}, "heads": []}
    seen = set()
    for group, lst in (("retrieval", heads), ("profile", by_prof)):
        for l, g in lst:
            if (l, g) in seen:
                continue
            seen.add((l, g))
            spans = np.full((shape.num_layers, shape.num_kv_heads), 4096)
            spans[l, g] = 128
            apply_plan(model, narrowed_plan(shape, spans), backend="cpu_window")
            loss, acc = forced_loss(model, tok, items)
            remove_plan(model)
            row = {"group": group, "layer": l, "kv_head": g, "key_mass": float(kv[l, g]),
                   "predicted": pred.get((l, g)), "measured": loss - base_loss, "acc": acc}
            res["heads"].append(row)
            print(f"{group:9s} L{l:02d} kv{g}: key mass {kv[l, g]:.3f}  predicted +{row['predicted']:.4f}  "
                  f"measured {loss - base_loss:+.4f}  forced acc {acc:.2f}")
    # all top retrieval heads narrowed together
    spans = np.full((shape.num_layers, shape.num_kv_heads), 4096)
    for l, g in heads:
        spans[l, g] = 128
    apply_plan(model, narrowed_plan(shape, spans), backend="cpu_window")
    loss, acc = forced_loss(model, tok, items)
    remove_plan(model)
    res["all_retrieval_128"] = {"measured": loss - base_loss, "acc": acc,
                                "predicted": float(sum(pred[h] for h in heads))}
    print(f"all {len(heads)} retrieval heads at 128: predicted +{res['all_retrieval_128']['predicted']:.4f}, "
          f"measured {loss - base_loss:+.4f}, forced acc {acc:.2f}")
    save(args.out, "ablate", res)


# ----------------------------------------------------------------------------- Q4


def stage_counter(args):
    from moa_search.apply import apply_plan, remove_plan
    from moa_search.eval import score_batch
    from moa_search.plan import Plan

    att = read(args.out, "attn")
    km = np.array(att["key_mass"])
    tops = [int(x) for x in args.tops.split(",")]
    heads_all, _ = top_kv_heads(km, max(tops))
    plans = plans_arg(args.plan)
    model, tok = load(args.model)
    items = passkey_items(tok, args.items, args.max_depth, seed=args.seed)
    n = 1024
    res = {"seed": args.seed, "heads": heads_all, "items": [it["id"] for it in items], "configs": {}}

    def variant(plan, heads, a=None, b=None):
        a = np.array(plan.alpha, float) if a is None else a.copy()
        b = np.array(plan.beta, float) if b is None else b.copy()
        for l, g in heads:
            a[l, g], b[l, g] = 0.0, 1.0                    # full span at every N
        return Plan(model=plan.model, alpha=a.tolist(), beta=b.tolist(), sink=plan.sink,
                    granularity=plan.granularity, min_span=plan.min_span)

    for name, plan in plans.items():
        configs = {"dense": None, name: plan} if args.dense else {name: plan}
        for k in tops:
            configs[f"{name}+top{k}full"] = variant(plan, heads_all[:k])
        if args.keep_density:
            # pay for the widened heads: narrow the widest other heads to 1/8 N, widest first, until the
            # KV density at N=1024 is back to the plan's
            k = max(tops)
            heads = heads_all[:k]
            target = plan.densities(n)["kv_cache_density"]
            a3, b3 = np.array(plan.alpha, float), np.array(plan.beta, float)
            order = np.argsort(-plan.kv_spans(n).ravel(), kind="stable")
            narrowed = []
            for f in order:
                if variant(plan, heads, a3, b3).densities(n)["kv_cache_density"] <= target + 1e-9:
                    break
                l, g = divmod(int(f), a3.shape[1])
                if (l, g) in heads:
                    continue
                a3[l, g], b3[l, g] = 0.0, 0.125
                narrowed.append((l, g))
            configs[f"{name}+top{k}full-samedensity"] = variant(plan, heads, a3, b3)
            res["narrowed"] = narrowed
            print(f"same density: narrowed {len(narrowed)} other KV heads to N/8: {narrowed}")
        if args.doc_ppl:
            from moa_search.eval import doc_items, score_document

            docs = doc_items(tok, [n], args.doc_ppl)
        for cname, p in configs.items():
            from moa_search.plan import save_plan

            dens = 1.0
            if p is not None:
                dens = p.densities(n)["kv_cache_density"]
                save_plan(p, args.out / f"plan_{cname}.json")
                apply_plan(model, p, backend="cpu_window")
            t0 = time.time()
            dppl = None
            if args.doc_ppl:
                with torch.no_grad():
                    dloss = [score_document(model, d)["loss"] for d in docs]
                dppl = float(np.exp(np.mean(dloss)))
            loss, facc = forced_loss(model, tok, items)
            rows = []
            if args.generate:
                for it in items:
                    rows += score_batch(model, tok, [it], metrics=("retrieval",), mode="generate",
                                        max_new_tokens=args.max_new_tokens)
            remove_plan(model)
            gacc = float(np.mean([r["correct"] for r in rows])) if rows else None
            res["configs"][cname] = {"kv_density_1024": dens, "forced_loss": loss, "forced_acc": facc, "doc_ppl": dppl,
                                     "generate_acc": gacc, "answers": [r["answer"] for r in rows]}
            print(f"{cname}: kv density@1024 {dens:.3f}  answer loss {loss:.3f}  forced acc {facc:.2f}  doc ppl {dppl}  "
                  f"generated acc {gacc}  ({time.time() - t0:.0f} s)", flush=True)
    save(args.out, "counter" + args.tag, res)


# ----------------------------------------------------------------------------- figure


def stage_plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moa_search import rules as R
    from moa_search.loss_tables import loss_table
    from moa_search.plan import load_plan
    from moa_search.profiler.io import load_profile

    att = read(args.out, "attn")
    kv = kv_mass(np.array(att["key_mass"]))
    prof = load_profile(Path(args.profiles[0]) / "influence_1024.safetensors")
    lt = loss_table(prof.influence.double().numpy(), 1024, prof.block_size, 64, [R.Rule(128.0, 0.0)])
    lt = lt.reshape(30, 3, GROUP, 1).sum(2)[..., 0]
    plan = load_plan(args.plan[0].partition("=")[2])
    frac = plan.kv_spans(967) / 967
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    sc = ax[0].scatter(kv.ravel(), lt.ravel(), c=frac.ravel(), cmap="viridis", vmin=0, vmax=1, s=28)
    for l in range(30):
        for g in range(3):
            if kv[l, g] >= 0.4 or lt[l, g] >= 0.3:
                ax[0].annotate(f"L{l}kv{g}", (kv[l, g], lt[l, g]), fontsize=7, xytext=(3, 2),
                               textcoords="offset points")
    fig.colorbar(sc, ax=ax[0], label="MoA@0.5 window / N at N=967")
    ax[0].set_xlabel("dense: attention on the passkey digits from the answer rows")
    ax[0].set_ylabel("profile: predicted loss of a 128-token window")
    ax[0].set_title("90 KV heads: what retrieves vs what the profile protects", fontsize=10)
    d = read(args.out, "ablate")["dense"]
    names, loss, acc, seen = ["dense\nkv 1.00"], [d["loss"]], [d["acc"]], set()
    for tag in ("counter", "counter_21"):
        if (args.out / f"{tag}.json").exists():
            for k, v in read(args.out, tag)["configs"].items():
                if k in seen:
                    continue
                seen.add(k)
                names.append(k.replace("moa0.5", "MoA@0.5") + f"\nkv {v['kv_density_1024']:.2f}")
                loss.append(v["forced_loss"])
                acc.append(v["forced_acc"])
    x = np.arange(len(names))
    ax[1].bar(x - 0.2, acc, 0.4, label="passkey accuracy (forced, 10 items)")
    ax2 = ax[1].twinx()
    ax2.bar(x + 0.2, loss, 0.4, color="tab:orange", label="answer loss (nats)")
    ax[1].set_xticks(x, names, fontsize=7, rotation=20, ha="right")
    ax[1].set_ylim(0, 1.05)
    ax[1].set_ylabel("accuracy")
    ax2.set_ylabel("answer loss")
    ax[1].set_title("MoA@0.5 with the top-K retrieval KV heads at full span (1024, depth <= 0.6)", fontsize=10)
    h1, l1 = ax[1].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax[1].legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


# ----------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["attn", "spans", "profile", "search1k", "confidence", "profile_subset", "ablate",
                                      "counter", "plot"])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", type=Path, default=Path("/tmp/wr"))
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--max-depth", type=float, default=0.6)
    p.add_argument("--top", type=int, default=6, help="retrieval KV heads to follow")
    p.add_argument("--plan", action="append", metavar="NAME=PATH")
    p.add_argument("--profiles", action="append", metavar="DIR")
    p.add_argument("--calibration", action="append", metavar="DIR")
    p.add_argument("--png", type=Path, default=Path("docs/smollm2_h200/why_retrieval.png"))
    p.add_argument("--task", default="passkey", help="profile_subset: the task kept")
    p.add_argument("--keep-density", action="store_true")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--generate", action="store_true")
    p.add_argument("--tops", default="1,3,6", help="counter: widen the top K retrieval KV heads, for each K")
    p.add_argument("--dense", action="store_true", help="counter: dense too")
    p.add_argument("--doc-ppl", type=int, default=0, metavar="K", help="counter: also stdlib-source perplexity, K docs")
    p.add_argument("--seed", type=int, default=None, help="counter: items of another seed (held out from attn)")
    p.add_argument("--tag", default="", help="suffix of the output json")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    {"attn": stage_attn, "spans": stage_spans, "profile": stage_profile, "search1k": stage_search1k, "confidence": stage_confidence, "profile_subset": stage_profile_subset, "plot": stage_plot,
     "ablate": stage_ablate,
     "counter": stage_counter}[args.stage](args)


if __name__ == "__main__":
    main()
