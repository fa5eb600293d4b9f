"""Issue 8 benchmark: profiling throughput (samples/s) of a Llama-7B-shaped model on 1 GPU,
on K GPUs with torchrun (data parallel, NCCL), and on K GPUs with --device-map auto (one
model's layers spread over the GPUs), through the `moa profile` command itself.

Model: hidden 4096, 32 layers, 32 heads (MHA), head_dim 128, MLP 11008, vocab 32000, random
weights, bf16, saved once to --work. Samples: random token ids of exactly --length tokens,
loss on the last 128 (the answer span). Throughput = samples / seconds of the profiling
loop as `moa profile` records it (profile extra run_samples / run_seconds: model loading
excluded); the wall time of each command is reported too. A one-sample run first fills
Triton's compile cache so that no timed run compiles.

    NCCL_NVLS_ENABLE=0 python scripts/multi_gpu_bench.py --length 8192 --samples 32 --out $OUT/multi_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def build_model(path: Path, length: int) -> None:
    """The full 32-layer Llama-7B shape of scripts/gpu_profiler_bench.py, saved once."""
    from gpu_profiler_bench import llama7b

    if (path / "config.json").exists():
        return
    model = llama7b(32, length)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def build_calibration(path: Path, length: int, samples: int, answer: int = 128) -> None:
    import datasets

    if path.exists():
        return
    g = torch.Generator().manual_seed(1)
    rows = [{"id": f"r{i}", "task": "random", "length": length, "depth": -1.0, "prompt": "", "reference": "",
             "answer": "", "input_ids": torch.randint(3, 32000, (length,), generator=g).tolist(),
             "response_start": length - answer, "response_end": length, "n_tokens": length} for i in range(samples)]
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def profile(name: str, launcher: list[str], args: list[str], out: Path, env: dict) -> dict:
    t = time.perf_counter()
    res = subprocess.run(launcher + ["-m", "moa_search.cli", "profile", *args, "-o", str(out)], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        print(res.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{name}: moa profile failed ({res.returncode})")
    print(res.stderr.strip().splitlines()[-1], file=sys.stderr)
    return {"name": name, "wall_s": round(wall, 1), "dir": str(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--work", default="/tmp/moa_multi", help="folder for the model, data and profiles")
    ap.add_argument("--out", default="multi_gpu.json")
    a = ap.parse_args()
    from moa_search.profiler.io import load_profile

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "llama7b", work / f"cal_{a.length}"
    t = time.perf_counter()
    build_model(model, a.length)
    build_calibration(data, a.length, a.samples)
    print(f"model and data ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    one_gpu = dict(env, CUDA_VISIBLE_DEVICES="0")
    args = ["--model", str(model), "--data", str(data), "--lengths", str(a.length), "--no-plots", "--restart"]
    py, run = [sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.gpus)]
    profile("warm-up (1 sample)", py, args + ["--max-samples", "1"], work / "warm", one_gpu)
    rows = [profile("1 GPU", py, args, work / "p1", one_gpu),
            profile(f"{a.gpus} GPUs, torchrun (data parallel)", run, args, work / f"p{a.gpus}", env),
            profile(f"{a.gpus} GPUs, --device-map auto (one sharded model)", py, args + ["--device-map", "auto"],
                    work / "pmap", env)]
    base = None
    for r in rows:
        p = load_profile(Path(r.pop("dir")) / f"influence_{a.length}.safetensors")
        r.update(samples=p.extra["run_samples"], loop_s=p.extra["run_seconds"], world_size=p.extra["world_size"])
        r["samples_per_s"] = round(r["samples"] / r["loop_s"], 3)
        if base is None:
            base = p.influence
        r["max_abs_diff_vs_1gpu_over_max"] = float((p.influence - base).abs().max() / base.abs().max())
    one = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup"] = round(r["samples_per_s"] / one, 2)
    result = {"gpu": torch.cuda.get_device_name(0), "gpus": a.gpus, "length": a.length, "samples": a.samples,
              "torch": torch.__version__, "rows": rows}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print("| run | samples/s | speedup | loop s | wall s | max diff vs 1 GPU |")
    for r in rows:
        print(f"| {r['name']} | {r['samples_per_s']} | {r['speedup']}x | {r['loop_s']} | {r['wall_s']} "
              f"| {r['max_abs_diff_vs_1gpu_over_max']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
