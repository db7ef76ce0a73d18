#!/usr/bin/env python3
"""torch.optim.AdamW (foreach and fused) next to sage-bench, on the same tensors, in one run.

Optional (needs torch; not part of CI). Steps torch's AdamW on CPU over exactly the tensor mix
sage-bench uses (`sage-bench --list-tensors`), with the same thread count, then runs sage-bench
in the same process tree and prints every result with its ratio to torch's fused AdamW and to
sage-bench's in-place streaming floor. Timings are the best of --reps steps after one warm-up,
as sage-bench's are.

    cargo build --release -p sage-cpu --bin sage-bench
    python3 bench/compare_torch.py [--params 16.8e6] [--threads 2] [--reps 3]

Bytes per parameter (f32): AdamW 28 (reads θ, g, m, v; writes θ, m, v), SAGE 36 (+ Ī).
"""
import argparse
import json
import os
import subprocess
import sys
import time


def run_bench(bench, args, extra):
    cmd = [bench, "--reps", str(args.reps), "--threads", str(args.threads)] + extra
    if args.params:
        cmd += ["--params", str(args.params)]
    if args.level:
        cmd += ["--level", args.level]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def torch_rows(sizes, args):
    try:
        import torch
    except ImportError:
        print("torch not installed: showing sage-bench alone", file=sys.stderr)
        return []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n) * 0.05) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    for name, kw in (("torch AdamW foreach", {"foreach": True}), ("torch AdamW fused", {"fused": True})):
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)
        except (RuntimeError, TypeError, ValueError) as e:
            print(f"{name}: not available here ({e})", file=sys.stderr)
            continue
        best = float("inf")
        for rep in range(args.reps + 1):  # rep 0 warms up (allocates the state)
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if rep > 0:
                best = min(best, dt)
        rows.append({"algorithm": name, "seconds": best, "bytes": 28})
        del opt
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=None, help="about N parameters (default: BERT-base, 110M)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--level", default=None, help="sage-bench --level")
    ap.add_argument("--bench", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "sage-bench"))
    args = ap.parse_args()
    if args.params:
        args.params = int(args.params)

    sizes = [int(x) for x in run_bench(args.bench, args, ["--list-tensors"]).split()]
    n = sum(sizes)
    print(f"{n} parameters in {len(sizes)} tensors, {args.threads} threads, best of {args.reps}")

    rows = torch_rows(sizes, args)
    sage = [json.loads(l) for l in run_bench(args.bench, args, ["--json", "--precision", "f32"]).splitlines()]
    sage = [r for r in sage if r["threads"] == args.threads]
    floor5 = next((r for r in sage if r["algorithm"] == "floor 5r4w"), None)
    for r in sage:
        if r["algorithm"].startswith("floor") and r is not floor5:
            continue
        rows.append({
            "algorithm": f"{r['backend']} {r['algorithm']}",
            "seconds": r["ns_per_param"] * n * 1e-9,
            "bytes": r["gbps"] * r["ns_per_param"],
            "floor_ratio": r["floor_ratio"],
        })
    fused = next((r["seconds"] for r in rows if r["algorithm"] == "torch AdamW fused"), None)
    floor = floor5["ns_per_param"] * n * 1e-9 if floor5 else None
    print(f"{'implementation':<34} {'ms/step':>9} {'ns/param':>9} {'GB/s':>7} {'vs fused':>9} {'vs floor':>9}")
    for r in rows:
        s = r["seconds"]
        vs_fused = f"{s / fused:.2f}" if fused else "-"
        vs_floor = f"{s / floor:.2f}" if floor else "-"
        print(f"{r['algorithm']:<34} {s * 1e3:>9.2f} {s * 1e9 / n:>9.3f} {r['bytes'] * n / s / 1e9:>7.1f} "
              f"{vs_fused:>9} {vs_floor:>9}")
    print("vs floor: against the 5-read/4-write in-place floor (SAGE's traffic); sage-bench's own "
          "floor_ratio compares each row with the floor of its own buffers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
