#!/usr/bin/env python3
"""sage-cpu next to what users would pick instead, on the same tensors and threads, in one run.

Rows (f32 parameters and state, CPU), each as a ratio to the in-place streaming floor of its
traffic measured by sage-bench in the same run (28 bytes/parameter for AdamW, 36 for SAGE):

  sage-cpu     adamw, adamw (clipped), adamw-sage, adamw-sage (tensor-clip), adam-sage (clipped)
  torch        torch.optim.AdamW foreach and fused, each alone and after
               torch.nn.utils.clip_grad_norm_(params, 1.0) (what a training loop runs)
  the authors  UnstructAwareAdamW from their SAGE repository's module/bert_optim.py, without
               clipping (max_grad_norm=-1) and with their default per-tensor clipping at 1.0

The authors' code is imported from the path given with --authors (a checkout of their
repository, a bare clone of it, or the bert_optim.py file itself); it is never copied into
this repository. Its
unused import of pytorch_pretrained_bert.optimization (the warm-up schedules, not used with
t_total=-1) is satisfied by a stand-in when that package is not installed.

torch: if this interpreter cannot import it, the script re-runs itself in a virtual
environment under .cache/ (gitignored), creating it and running `pip install torch` there
the first time (PyPI's torch is the CUDA build: several GB, once). --no-install refuses.
Never part of the test command.

    python3 bench/compare_torch.py --authors PATH/TO/SAGE [--params 16777216] [--threads 2]
                                   [--reps 10] [--rounds 3] [--level avx512] [--markdown]

Timings are the best of --reps steps after one warm-up, over --rounds rounds that alternate
torch's rows and a sage-bench run, so a noisy machine slows both alike.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
VENV = os.path.join(ROOT, ".cache", "torch-venv")


def ensure_torch(args):
    """Imports torch, or re-executes this script in the cached venv (made on demand)."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    py = os.path.join(VENV, "bin", "python3")
    if os.path.abspath(sys.executable) == os.path.abspath(py):
        sys.exit("torch is not importable even in " + VENV + ": remove it and run again")
    if not os.path.exists(py) or subprocess.run([py, "-c", "import torch"], capture_output=True).returncode:
        if args.no_install:
            sys.exit("torch is not installed here and --no-install was given")
        print(f"installing torch into {VENV} (once; several GB)", file=sys.stderr)
        if not os.path.exists(py):
            subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "torch"], check=True)
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def load_authors(path):
    """UnstructAwareAdamW from the authors' bert_optim.py at `path` (repository or file)."""
    f = path
    if os.path.isdir(f):
        f = os.path.join(f, "module", "bert_optim.py")
    if not os.path.isfile(f) and os.path.isdir(path):
        # A bare clone (no work tree): read the file from its HEAD into a temporary directory.
        show = subprocess.run(["git", "--git-dir", path, "show", "HEAD:module/bert_optim.py"],
                              capture_output=True)
        if show.returncode == 0:
            import tempfile
            f = os.path.join(tempfile.mkdtemp(prefix="sage-authors-"), "bert_optim.py")
            with open(f, "wb") as out:
                out.write(show.stdout)
    if not os.path.isfile(f):
        sys.exit(f"--authors: no module/bert_optim.py at {path}")
    try:
        import pytorch_pretrained_bert.optimization  # noqa: F401
    except ImportError:
        # Stand-ins for the warm-up schedules bert_optim.py imports (pytorch-pretrained-bert
        # 0.6's formulas); only used with t_total != -1, which this benchmark never sets.
        stub = types.ModuleType("pytorch_pretrained_bert.optimization")

        def warmup_constant(x, warmup=0.002):
            return x / warmup if x < warmup else 1.0

        def warmup_linear(x, warmup=0.002):
            return x / warmup if x < warmup else 1.0 - x

        def warmup_cosine(x, warmup=0.002):
            import math
            return x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))

        stub.warmup_constant, stub.warmup_linear, stub.warmup_cosine = warmup_constant, warmup_linear, warmup_cosine
        pkg = types.ModuleType("pytorch_pretrained_bert")
        pkg.optimization = stub
        sys.modules["pytorch_pretrained_bert"] = pkg
        sys.modules["pytorch_pretrained_bert.optimization"] = stub
    spec = importlib.util.spec_from_file_location("sage_authors_bert_optim", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.UnstructAwareAdamW, f


def bench_cmd(args, extra):
    cmd = [args.bench, "--threads", str(args.threads), "--params", str(args.params)] + extra
    if args.level:
        cmd += ["--level", args.level]
    return cmd


def sage_rows(args):
    out = subprocess.run(
        bench_cmd(args, ["--json", "--precision", "f32", "--small", "0", "--reps", str(args.reps)]),
        check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        r = json.loads(line)
        if r["threads"] == args.threads and r["model"] == "bert":
            key = r["algorithm"] + ("" if r["sage"] or not r["algorithm"].startswith("floor") else " off")
            rows[key] = r["ns_per_param"] * r["params"] * 1e-9
    return rows


def torch_rows(sizes, args, authors):
    import torch
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.rand(n, generator=g) * 2 - 1) * 0.05) for n in sizes]
    grads = [(torch.rand(n, generator=g) * 2 - 1) * 1e-3 for n in sizes]

    def fresh():
        for p, gr in zip(params, grads):
            p.grad = gr.clone()

    def clip():
        torch.nn.utils.clip_grad_norm_(params, 1.0)

    cases = [
        ("torch AdamW foreach", 28, lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True), None),
        ("torch AdamW fused", 28, lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True), None),
        ("torch AdamW foreach + clip_grad_norm_", 28,
         lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True), clip),
        ("torch AdamW fused + clip_grad_norm_", 28,
         lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True), clip),
    ]
    if authors is not None:
        for name, mgn in (("authors UnstructAwareAdamW", -1.0),
                          ("authors UnstructAwareAdamW (tensor-clip 1.0)", 1.0)):
            cases.append((name, 36, (lambda mgn=mgn: authors(
                [{"params": params, "params_type": "sage"}], lr=1e-4, weight_decay=0.01,
                max_grad_norm=mgn)), None))
    out = {}
    for name, nbytes, make, before in cases:
        fresh()
        try:
            opt = make()
        except (RuntimeError, TypeError, ValueError) as e:
            print(f"{name}: not available here ({e})", file=sys.stderr)
            continue
        best = float("inf")
        for rep in range(args.reps + 1):  # rep 0 warms up (allocates the state)
            t0 = time.perf_counter()
            if before:
                before()
            opt.step()
            dt = time.perf_counter() - t0
            if rep > 0:
                best = min(best, dt)
        out[name] = (best, nbytes)
        del opt
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", help="the authors' SAGE repository (or its module/bert_optim.py)")
    ap.add_argument("--params", type=float, default=16777216, help="about N parameters, BERT-base's mix")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--level", default=None, help="sage-bench --level")
    ap.add_argument("--bench", default=None, help="a built sage-bench (default: cargo build --release)")
    ap.add_argument("--no-install", action="store_true", help="never install torch")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()
    args.params = int(args.params)
    ensure_torch(args)
    import warnings
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    if args.bench is None:
        subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "sage-cpu", "--bin", "sage-bench"],
                       cwd=ROOT, check=True)
        args.bench = os.path.join(ROOT, "target", "release", "sage-bench")
    authors, authors_file = (None, None)
    if args.authors:
        authors, authors_file = load_authors(args.authors)
    else:
        print("no --authors PATH: the authors' UnstructAwareAdamW rows are left out", file=sys.stderr)

    sizes = [int(x) for x in subprocess.run(bench_cmd(args, ["--list-tensors"]), check=True,
                                            capture_output=True, text=True).stdout.split()]
    n = sum(sizes)
    best_t, best_s = {}, {}
    for r in range(args.rounds):
        for k, (t, b) in torch_rows(sizes, args, authors).items():
            best_t[k] = (min(t, best_t.get(k, (t, b))[0]), b)
        for k, t in sage_rows(args).items():
            best_s[k] = min(t, best_s.get(k, t))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{n} parameters in {len(sizes)} tensors (BERT-base's mix), f32, {args.threads} threads, "
          f"best of {args.reps} x {args.rounds} rounds; torch {torch.__version__}; CPU {cpu}")
    if authors_file:
        print(f"authors' optimizer: {authors_file}")
    floors = {28: best_s.get("floor 4r3w off"), 36: best_s.get("floor 5r4w")}
    rows = []
    for label, key, nbytes in (
        ("floor 4r3w (AdamW's traffic)", "floor 4r3w off", 28),
        ("floor 5r4w (SAGE's traffic)", "floor 5r4w", 36),
        ("sage-cpu AdamW", "adamw", 28),
        ("sage-cpu AdamW, clipped (global 1.0)", "adamw (clipped)", 28),
        ("sage-cpu AdamW-SAGE", "adamw-sage", 36),
        ("sage-cpu AdamW-SAGE, tensor-clip 1.0", "adamw-sage (tensor-clip)", 36),
        ("sage-cpu Adam-SAGE, clipped (global 1.0)", "adam-sage (clipped)", 36),
    ):
        if key in best_s:
            rows.append((label, best_s[key], nbytes))
    for k, (t, b) in best_t.items():
        rows.append((k, t, b))
    if args.markdown:
        print("\n| implementation | ms/step | ns/param | GB/s | x floor |\n|---|---:|---:|---:|---:|")
    else:
        print(f"{'implementation':<46} {'ms/step':>8} {'ns/param':>9} {'GB/s':>6} {'x floor':>8}")
    for label, t, b in rows:
        f = floors.get(b)
        ratio = f"{t / f:.2f}" if f else "-"
        cells = (label, f"{t * 1e3:.2f}", f"{t * 1e9 / n:.3f}", f"{b * n / t / 1e9:.1f}", ratio)
        if args.markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(f"{cells[0]:<46} {cells[1]:>8} {cells[2]:>9} {cells[3]:>6} {cells[4]:>8}")
    print("x floor: time over sage-bench's in-place streaming pass with the same traffic, same run "
          "(28 B/param for AdamW rows, 36 for SAGE rows); clipped rows include their norm pass.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
