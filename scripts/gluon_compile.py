"""Compile the Hopper prefill kernel (kernels/prefill_hopper.py) for sm_90 on a machine without
a GPU, and report what decides its speed before any device time is spent:

    shared memory, registers, spills;
    ptxas's "wgmma ... serialized" warning (C7512): every MMA then waits for the one before,
        so the softmax no longer overlaps the tensor cores (a 13-24% loss, BENCHMARKS.md);
    per loop that issues MMAs: instructions, HGMMAs, WARPGROUP.DEPBAR waits, spill loads.

Triton compiles Gluon for a target without the device; ptxas and cuobjdump come with Triton's
wheel. Use the GPU machine's Triton (3.6) to see what it will run:

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. python scripts/gluon_compile.py                      # D 128, bf16
    PYTHONPATH=/tmp/t36:. python scripts/gluon_compile.py --head-dim 64 --kernel /tmp/other.py

Exit status 1 when ptxas serializes the MMAs.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


def compile_kernel(mod, D, config, dtype, write_lse, consumer_regs=232, maxnreg=168):
    """triton.compile of mod._hopper_fwd for sm_90a with the launcher's signature and constants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    bn, stages, q_bufs = config
    fn = mod._hopper_fwd
    names = fn.arg_names
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(rows):
        box = [1, 1, rows, D]
        return f"tensordesc<{dtype}[{','.join(map(str, box))}],{gl.NVMMASharedLayout.get_default_for(box, gdt)!r}>"

    pointers = {"O": f"*{dtype}", "LSE": "*fp32", "SPAN": "*i64", "START": "*i64", "END": "*i64", "COUNTER": "*i32"}
    consts = dict(D=D, BLOCK_N=bn, STAGES=stages, Q_BUFS=q_bufs, WRITE_LSE=write_lse, CONSUMER_REGS=consumer_regs)
    sig = {}
    for n in names:
        if n == "QD":
            sig[n] = desc(mod.ROWS)
        elif n in ("KD", "VD"):
            sig[n] = desc(bn)
        elif n in pointers:
            sig[n] = pointers[n]
        elif n in consts:
            sig[n] = "constexpr"
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n.startswith("so")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                         attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def mma_loops(sass: str):
    """The innermost loops (backward branches) that issue HGMMAs, i.e. the per-block loops of
    each consumer: their instruction, HGMMA, WARPGROUP.DEPBAR and spill-load counts."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]+)\*/\s+([^;]*);", sass)]
    spans = []
    for addr, text in ins:
        m = re.search(r"BRA[^0-9]*0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))
    loops = []
    for lo, hi in spans:
        body = [t for a, t in ins if lo <= a <= hi]
        ops = collections.Counter(t.split()[1] if t.startswith("@") else t.split()[0] for t in body)
        hgmma = sum(v for k, v in ops.items() if k.startswith("HGMMA"))
        if hgmma:
            loops.append(dict(span=(lo, hi), instructions=len(body), hgmma=hgmma,
                              depbar=ops["WARPGROUP.DEPBAR.LE"], spill_loads=ops["LDL"] + ops["LDL.LU"]))
    inner = [r for r in loops if not any(o is not r and r["span"][0] <= o["span"][0] and o["span"][1] <= r["span"][1]
                                         for o in loops)]
    return sorted(inner, key=lambda r: r["span"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", metavar="FILE", help="a copy of prefill_hopper.py (default: the package's)")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--config", help="BLOCK_N,STAGES,Q_BUFS (default: the launcher's CONFIG for the head dim)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--lse", action="store_true", help="with the row log-sum-exp output (the profiler's path)")
    ap.add_argument("--keep", metavar="DIR", help="also write the PTX and SASS here")
    args = ap.parse_args()

    import triton
    from hopper_probe import load_version  # a kernel copy, imported as hopper_probe --baseline does

    from moa_search.kernels import prefill_hopper
    mod = load_version(args.kernel) if args.kernel else prefill_hopper
    config = tuple(map(int, args.config.split(","))) if args.config else mod.CONFIG[args.head_dim]
    k = compile_kernel(mod, args.head_dim, config, args.dtype, args.lse)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or tmp
        os.makedirs(out, exist_ok=True)
        ptx, cubin = os.path.join(out, "hopper_fwd.ptx"), os.path.join(out, "hopper_fwd.cubin")
        open(ptx, "w").write(k.asm["ptx"])
        open(cubin, "wb").write(k.asm["cubin"])
        ptxas = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                               capture_output=True, text=True)
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True).stdout
        if args.keep:
            open(os.path.join(out, "hopper_fwd.sass"), "w").write(sass)

    print(f"Triton {triton.__version__}, sm_90a, head_dim {args.head_dim}, {args.dtype}, "
          f"(BLOCK_N, STAGES, Q_BUFS) = {config}, shared memory {k.metadata.shared} B")
    info = [line.split("ptxas info    :")[-1].strip() for line in ptxas.stderr.splitlines() if "ptxas info" in line]
    for line in info:
        if "registers" in line or "spill" in line or "stack" in line:
            print("  ptxas:", line)
    warnings = [line for line in info if "Performance Loss" in line or "serialized" in line]
    for line in warnings:
        print("  ptxas WARNING:", line)
    print("  innermost loops issuing MMAs: instructions, HGMMA, DEPBAR waits, spill loads")
    for r in mma_loops(sass):
        print(f"    {hex(r['span'][0]):>9}  {r['instructions']:5d}  {r['hgmma']:3d}  {r['depbar']:3d}  "
              f"{r['spill_loads']:3d}")
    serialized = any("serialized" in w for w in warnings)
    if serialized:
        print("  -> every MMA waits for the previous one: the softmax no longer overlaps the tensor cores")
    return 1 if serialized else 0


if __name__ == "__main__":
    sys.exit(main())
