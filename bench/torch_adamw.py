#!/usr/bin/env python3
"""torch.optim.AdamW(fused=True) on the tensors sage-cuda-bench steps, for the GPU check.

Same model sizes, split the same way (tensors of at most --tensor elements), timed the same
way (CUDA events around each step, median of --iters after --warmup). Prints one
tab-separated line per measurement, in sage-cuda-bench's format:
    ROW  impl  storage  params  median_ms  bytes_per_param
Fused AdamW keeps its state in the parameters' dtype, so bf16 here means bf16 state too
(14 bytes per parameter; f32 moves 28).
"""
import argparse
import sys


def size(s):
    s = s.strip()
    mul = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1].lower(), None)
    return int(float(s[:-1]) * mul) if mul else int(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16M,110M,350M")
    ap.add_argument("--tensor", type=size, default=4 << 20)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch not installed: skipped", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        print("torch: no CUDA device: skipped", file=sys.stderr)
        return 0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", file=sys.stderr)
    for n in [size(s) for s in a.sizes.split(",")]:
        shapes = [a.tensor] * (n // a.tensor) + ([n % a.tensor] if n % a.tensor else [])
        for dtype, name, nbytes in ((torch.float32, "f32", 28), (torch.bfloat16, "bf16", 14)):
            g = torch.Generator(device=dev).manual_seed(1)
            params = [torch.nn.Parameter(torch.rand(k, device=dev, dtype=dtype, generator=g) * 2 - 1)
                      for k in shapes]
            for p in params:
                p.grad = (torch.rand(p.numel(), device=dev, dtype=dtype, generator=g) * 2 - 1) * 1e-2
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
            for _ in range(a.warmup):
                opt.step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ms = []
            for _ in range(a.iters):
                start.record()
                opt.step()
                end.record()
                end.synchronize()
                ms.append(start.elapsed_time(end))
            ms.sort()
            print(f"ROW\ttorch-adamw-fused\t{name}\t{n}\t{ms[len(ms) // 2]:.6f}\t{nbytes}", flush=True)
            del opt, params
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
