#!/usr/bin/env python3
"""Train the embedded demo model (moa_search/demo_model/): tokenizer, model, dense eval.

Two steps, each re-runnable:

  1. Tokenizer (CPU, a minute): byte-level BPE trained with `tokenizers` on Python
     standard-library source plus synthetic long-range task texts; digits are split one
     per token so numbers (passkeys, values) copy token by token.

         python scripts/train_demo_model.py tokenizer -o moa_search/demo_model

  2. Model (one H100, a wall-clock budget): a small Llama with GQA trained on a mix of
     standard-library source (loss on every token) and synthetic long-range tasks from
     calibration_data's builders (key-value retrieval, passkey, variable tracking) at many
     lengths and answer depths, with a length curriculum; then dense retrieval accuracy
     and answer loss at several lengths on freshly built items (another seed).

         python scripts/train_demo_model.py model --tokenizer moa_search/demo_model \
             --minutes 5 -o $OUT/demo_model

Loss on task rows: the prompt tokens carry the ordinary LM loss (part of the "text" term),
and the answer tokens a separate mean (the "answer" term); the objective is
text_loss + answer_weight * answer_loss, so the few answer tokens per long row are not
drowned by the thousands of filler tokens around them.

Only torch, transformers, tokenizers, numpy and safetensors are needed (the GPU machine
has no `datasets`). Everything is seeded; the seeds and the data recipe go into
train_log.json beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ROOT = Path(__file__).resolve().parents[1]


def ensure_package() -> None:
    """Make `moa_search.calibration_data` importable even without `pip install -e .`:
    the repository maps the top-level calibration_data/ folder into the package."""
    try:
        import moa_search.calibration_data.tasks  # noqa: F401
        if not os.environ.get("MOA_FORCE_PATH_IMPORT"):
            return
    except ImportError:
        pass
    import importlib.util

    sys.path.insert(0, str(ROOT))
    import moa_search  # noqa: F401  (the moa_search/ folder sits at the repository root)

    for name, folder in (("calibration_data", "calibration_data"),):
        full = f"moa_search.{name}"
        spec = importlib.util.spec_from_file_location(full, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)


# ----------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The running interpreter's standard library (present on every machine as .py text)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None, max_bytes: int = 24 << 20, seed: int = 0) -> list[Path]:
    """Shuffled .py files of the standard library (site-packages excluded), up to max_bytes."""
    root = root or stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for p in files:
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if size == 0 or size > 1 << 20:
            continue
        out.append(p)
        total += size
        if total >= max_bytes:
            break
    return out


def read_texts(files: list[Path]) -> list[str]:
    out = []
    for p in files:
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def task_texts(count: int, lengths: list[int], seed: int) -> list[str]:
    """Synthetic task prompts + answers (whitespace-counted lengths) for the tokenizer's training."""
    from moa_search.calibration_data import tasks as T

    rng = random.Random(seed)
    names = list(T.TASKS)
    out = []
    for i in range(count):
        item = T.make_item(names[i % len(names)], rng, lengths[i % len(lengths)], T.approx_count_tokens, rng.random())
        out.append(item["prompt"] + " " + item["reference"] + "\n")
    return out


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(out_dir: Path, vocab_size: int = 4096, max_bytes: int = 20 << 20, seed: int = 0,
                    with_tasks: bool = True, model_max_length: int = 32768) -> dict:
    """Byte-level BPE on stdlib source (+ task texts); saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = stdlib_files(max_bytes=max_bytes, seed=seed)
    texts = read_texts(files)
    n_task = 0
    if with_tasks:
        try:
            extra = task_texts(600, [256, 512, 1024], seed)
            texts += extra
            n_task = len(extra)
        except ImportError as e:
            print(f"tokenizer: no task builders ({e}); training on source code only", file=sys.stderr)
    tok = Tokenizer(models.BPE())
    # Digits one per token first, then GPT-2 style byte-level pieces.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    info = {"vocab_size": tok.get_vocab_size(), "stdlib_files": len(files), "task_texts": n_task,
            "stdlib": str(stdlib_root()), "python": sys.version.split()[0], "seed": seed,
            "max_bytes": max_bytes}
    (out_dir / "tokenizer_recipe.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ----------------------------------------------------------------------------- data

# loss kinds per target position
NO_LOSS, TEXT, ANSWER = 0, 1, 2


def encode_code(tok, files: list[Path]) -> np.ndarray:
    """All source files as one token stream (int32), documents separated by EOS."""
    texts = read_texts(files)
    eos = tok.convert_tokens_to_ids(EOS)
    ids = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in ids:
        parts.append(np.asarray(e.ids, dtype=np.int32))
        parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts)


def curriculum_max(progress: float, lengths: list[int], ramp: float) -> int:
    """Longest row length allowed at `progress` in [0, 1]: the ladder is climbed by progress `ramp`."""
    k = 1 + int(min(1.0, progress / max(ramp, 1e-9)) * (len(lengths) - 1) + 1e-9)
    return lengths[min(k, len(lengths)) - 1]


class Mixture:
    """Rows of exactly L tokens: a task item (prompt + answer + EOS) followed by code, or code alone.

    next_batch() -> (ids int64 [B, L], kind int8 [B, L]) where kind[t] says how the token at t
    is scored as a *target* (NO_LOSS / TEXT / ANSWER). B = tokens_per_batch // L.
    """

    def __init__(self, tok, code: np.ndarray, lengths: list[int], tokens_per_batch: int, task_frac: float,
                 seed: int, ramp: float, progress=None):
        from moa_search.calibration_data import tasks as T

        self.T = T
        self.tok = tok
        self.code = code
        self.lengths = sorted(lengths)
        self.tpb = tokens_per_batch
        self.task_frac = task_frac
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.ramp = ramp
        self.shared_progress = progress  # multiprocessing.Value written by the training loop
        self.step = 0
        self.eos = tok.convert_tokens_to_ids(EOS)
        self._enc = tok.backend_tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self._enc.encode(text, add_special_tokens=False).ids)

    def progress(self) -> float:
        return 0.0 if self.shared_progress is None else float(self.shared_progress.value)

    def code_row(self, n: int) -> np.ndarray:
        off = int(self.np_rng.integers(0, max(1, len(self.code) - n)))
        row = self.code[off:off + n]
        if len(row) < n:  # tiny corpora (tests): wrap around
            row = np.resize(self.code, n)
        return row

    def task_row(self, n: int):
        """(ids [n], kind [n]) with one task item first; None if it did not fit."""
        task = self.rng.choice(list(self.T.TASKS))
        # the tokenizer-free estimate keeps item building cheap; the real count is checked below
        target = int(n * self.rng.uniform(0.5, 0.9))
        item = self.T.make_item(task, self.rng, target, self.T.approx_count_tokens, self.rng.random())
        p = self._enc.encode(item["prompt"], add_special_tokens=False).ids
        # prompts end in an answer cue ("... is"); the reference follows after one space
        r = self._enc.encode(" " + item["reference"], add_special_tokens=False).ids + [self.eos]
        if len(p) + len(r) > n:
            return None
        ids = np.asarray(p + r, dtype=np.int32)
        kind = np.full(len(ids), TEXT, dtype=np.int8)
        kind[len(p):] = ANSWER
        rest = n - len(ids)
        if rest:
            ids = np.concatenate([ids, self.code_row(rest)])
            kind = np.concatenate([kind, np.full(rest, TEXT, dtype=np.int8)])
        return ids, kind

    def next_batch(self):
        limit = curriculum_max(self.progress(), self.lengths, self.ramp)
        allowed = [L for L in self.lengths if L <= limit]
        # favour the newest (longest) rung, keep the shorter ones in the mix
        weights = [1.0] * (len(allowed) - 1) + [max(1.0, len(allowed) - 1.0)]
        L = self.rng.choices(allowed, weights=weights)[0]
        B = max(1, self.tpb // L)
        rows, kinds = [], []
        for _ in range(B):
            got = None
            if self.rng.random() < self.task_frac:
                for _try in range(3):
                    got = self.task_row(L)
                    if got is not None:
                        break
            if got is None:
                got = (self.code_row(L), np.full(L, TEXT, dtype=np.int8))
            rows.append(got[0])
            kinds.append(got[1])
        self.step += 1
        return np.stack(rows).astype(np.int64), np.stack(kinds)


def batch_worker(q, stop, progress, kw):
    """Producer process: fills q with batches until `stop` is set."""
    import queue as _queue

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kw.pop("tokenizer"))
    code = np.load(kw.pop("code_path"), mmap_mode="r")
    mix = Mixture(tok, code, progress=progress, **kw)
    while not stop.is_set():
        b = mix.next_batch()
        while not stop.is_set():
            try:
                q.put(b, timeout=0.5)
                break
            except _queue.Full:
                continue


# ----------------------------------------------------------------------------- model


def build_model(tok, hidden=256, layers=8, heads=8, kv_heads=2, intermediate=768, rope_theta=100000.0,
                max_positions=32768, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_positions, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.02,
        bos_token_id=tok.convert_tokens_to_ids(EOS), eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD), attn_implementation="sdpa",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(cfg)


def split_losses(model, ids, kind):
    """(text_loss, answer_loss, n_answer): next-token CE means over TEXT and ANSWER targets. ids/kind [B, L]."""
    import torch
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state
    logits = model.lm_head(hidden).float()
    tgt = ids[:, 1:]
    k = kind[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    t_mask, a_mask = (k == TEXT), (k == ANSWER)
    text = (ce * t_mask).sum() / t_mask.sum().clamp_min(1)
    n_ans = a_mask.sum()
    ans = (ce * a_mask).sum() / n_ans.clamp_min(1)
    return text, ans, n_ans


def train_model(args) -> None:
    import multiprocessing as mp

    import torch
    from transformers import AutoTokenizer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    files = stdlib_files(max_bytes=args.code_bytes, seed=args.seed)
    code = encode_code(tok, files)
    import tempfile

    code_path = Path(tempfile.mkdtemp(prefix="moa_demo_")) / "code_tokens.npy"  # never inside the output
    np.save(code_path, code)
    print(f"code: {len(files)} stdlib files from {stdlib_root()}, {len(code):,} tokens "
          f"({time.time() - t_start:.1f}s)", flush=True)

    # batch builders start first (fork before CUDA is touched); they read the curriculum's
    # progress from a shared value that the training loop writes
    lengths = sorted(int(x) for x in args.lengths.split(","))
    ctx = mp.get_context("fork")
    progress_v = ctx.Value("d", 0.0, lock=False)
    kw = dict(tokenizer=args.tokenizer, code_path=str(code_path), lengths=lengths,
              tokens_per_batch=args.tokens_per_batch, task_frac=args.task_frac, ramp=args.ramp)
    q = ctx.Queue(maxsize=4 * max(1, args.workers))
    stop = ctx.Event()
    procs = []
    if args.workers > 0:
        for w in range(args.workers):
            p = ctx.Process(target=batch_worker, args=(q, stop, progress_v, dict(kw, seed=args.seed * 1000 + w + 1)),
                            daemon=True)
            p.start()
            procs.append(p)

        def get():
            import queue as _queue

            while True:
                try:
                    return q.get(timeout=30)
                except _queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        raise RuntimeError("every batch-building worker died (see their tracebacks above)")
    else:
        mix = Mixture(tok, code, **{k: v for k, v in kw.items() if k not in ("tokenizer", "code_path")},
                      seed=args.seed * 1000 + 1, progress=progress_v)
        get = mix.next_batch

    model = build_model(tok, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                        intermediate=args.intermediate, rope_theta=args.rope_theta,
                        max_positions=args.max_positions, seed=args.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, config {model.config.to_diff_dict()}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=(device == "cuda"))
    duration = args.minutes * 60.0
    t0 = time.time()

    log = []
    step = 0
    tokens = 0
    wait = 0.0
    model.train()
    use_amp = device == "cuda"
    while True:
        elapsed = time.time() - t0
        progress = (step / args.max_steps) if args.max_steps else elapsed / duration
        if progress >= 1.0:
            break
        progress_v.value = progress
        # warmup, then cosine to 10% by progress (wall clock unless --max-steps)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for g in opt.param_groups:
            g["lr"] = lr
        tw = time.time()
        ids, kind = get()
        wait += time.time() - tw
        ids = torch.from_numpy(np.asarray(ids)).to(device, non_blocking=True)
        kind = torch.from_numpy(np.asarray(kind)).to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            text, ans, n_ans = split_losses(model, ids, kind)
            loss = text + args.answer_weight * ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids.numel()
        if step % args.log_every == 0 or step == 1:
            rec = {"step": step, "time": round(time.time() - t0, 1), "lr": round(lr, 6), "L": ids.shape[1],
                   "B": ids.shape[0], "text_loss": round(text.item(), 4), "answer_loss": round(ans.item(), 4),
                   "answer_tokens": int(n_ans), "grad_norm": round(gn.item(), 3), "tokens": tokens,
                   "tok_per_s": int(tokens / max(1e-9, time.time() - t0)), "data_wait_s": round(wait, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    stop.set()
    for p in procs:
        p.terminate()
    train_time = time.time() - t0
    print(f"trained {step} steps, {tokens:,} tokens in {train_time:.0f}s", flush=True)

    model.eval()
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(out), max_shard_size="15MB")
    tok.save_pretrained(str(out))
    code_path.unlink(missing_ok=True)

    recipe = {
        "command": " ".join(sys.argv), "seed": args.seed, "eval_seed": args.eval_seed,
        "parameters": n_params, "steps": step, "tokens": tokens, "train_seconds": round(train_time, 1),
        "total_seconds": round(time.time() - t_start, 1), "device": (torch.cuda.get_device_name() if device == "cuda" else "cpu"),
        "torch": torch.__version__, "stdlib": str(stdlib_root()), "stdlib_files": len(files), "code_tokens": int(len(code)),
        "args": vars(args), "dense_eval": {}, "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(recipe, indent=1) + "\n")
    if args.eval_lengths:
        t_eval = time.time()
        recipe["dense_eval"] = dense_eval(model, tok, [int(x) for x in args.eval_lengths.split(",")],
                                          args.eval_per_length, args.eval_seed, device)
        recipe["eval_seconds"] = round(time.time() - t_eval, 1)
        (out / "train_log.json").write_text(json.dumps(recipe, indent=1) + "\n")


def dense_eval(model, tok, lengths, per_length, seed, device) -> dict:
    """Dense retrieval accuracy and answer loss on fresh items (greedy generation, exact match)."""
    from moa_search.calibration_data import tasks as T
    from moa_search.eval import evaluate_items

    def count_tokens(s):
        return len(tok(s, add_special_tokens=False)["input_ids"])

    items = T.build_items(list(T.TASKS), lengths, per_length, seed, count_tokens)
    rows = evaluate_items(model, tok, items, metrics=("retrieval", "ppl"), batch_size=8 if device == "cuda" else 1,
                          mode="generate", progress=False)
    out = {}
    print(f"{'length':>7} {'task':>10} {'n':>4} {'accuracy':>9} {'ans_loss':>9}")
    for n in lengths:
        for task in ["all"] + sorted({r["task"] for r in rows}):
            sel = [r for r in rows if r["length"] == n and (task == "all" or r["task"] == task)]
            if not sel:
                continue
            acc = sum(r["correct"] for r in sel) / len(sel)
            loss = sum(r["loss"] for r in sel) / len(sel)
            out[f"{n}/{task}"] = {"n": len(sel), "accuracy": acc, "loss": loss}
            print(f"{n:>7} {task:>10} {len(sel):>4} {acc:>9.3f} {loss:>9.3f}", flush=True)
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    t = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer (CPU)")
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-bytes", type=int, default=20 << 20, help="stdlib source bytes to train on")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-tasks", action="store_true", help="source code only (no task texts)")

    m = sub.add_parser("model", help="train the model (GPU), save it and run the dense eval")
    m.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    m.add_argument("--tokenizer", default="moa_search/demo_model", help="directory holding the trained tokenizer")
    m.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    m.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead (tests)")
    m.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="row lengths, the curriculum's ladder")
    m.add_argument("--ramp", type=float, default=0.6, help="fraction of training by which the longest rung is reached")
    m.add_argument("--tokens-per-batch", type=int, default=131072)
    m.add_argument("--task-frac", type=float, default=0.6, help="share of rows that start with a task item")
    m.add_argument("--answer-weight", type=float, default=1.0)
    m.add_argument("--code-bytes", type=int, default=24 << 20)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--intermediate", type=int, default=768)
    m.add_argument("--rope-theta", type=float, default=100000.0)
    m.add_argument("--max-positions", type=int, default=32768)
    m.add_argument("--lr", type=float, default=2e-3)
    m.add_argument("--warmup", type=int, default=150)
    m.add_argument("--weight-decay", type=float, default=0.1)
    m.add_argument("--workers", type=int, default=12, help="batch-building processes (0: in the training loop)")
    m.add_argument("--seed", type=int, default=1234)
    m.add_argument("--eval-lengths", default="1024,2048,4096,8192,16384")
    m.add_argument("--eval-per-length", type=int, default=32, help="items per task and length")
    m.add_argument("--eval-seed", type=int, default=777)
    m.add_argument("--log-every", type=int, default=50)
    m.add_argument("--device", default=None)
    args = p.parse_args(argv)
    ensure_package()
    if args.step == "tokenizer":
        info = train_tokenizer(Path(args.output), args.vocab_size, args.max_bytes, args.seed, not args.no_tasks)
        print(json.dumps(info))
        return 0
    train_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
