#!/usr/bin/env python3
"""Records golden trajectories (`sage-vectors/1`, `"source": "reference"`) from the authors' code.

Each file is one run of the authors' PyTorch optimizers (`UnstructAwareAdamW`,
`UnstructAwareAdamax` from `module/bert_optim.py` of their SAGE repository), written exactly as
`shared/vectors/FORMAT.md` says:

  * `init` and `grads` hold float32-representable numbers;
  * the authors' optimizer runs on float64 tensors, and `params` are its float64 results after
    every step;
  * the same run is repeated on float32 tensors, and `tolerance` is 20x the spread between the
    two: `abs = 20 * max|p32 - p64|`, `rel = 20 * max(1e-6, max |p32 - p64| / max(|p64|, 1e-3))`
    over every element of every step. That rule reproduces the abs of every reference file in
    shared/vectors bit for bit, and their rel bit for bit for three of the five; for the other two
    it gives a slightly smaller (stricter) rel (their float32 runs were made on a machine whose
    vector kernels round a few elements differently: torch's float32 results change with
    ATEN_CPU_CAPABILITY).

How the format maps onto the authors' code (the reference preset; SAGE.md "Base optimizers and the
two presets"): algorithm `adamw` -> `UnstructAwareAdamW(correct_bias=bias_correction)`, `adamax`
-> `UnstructAwareAdamax` (which has no bias correction: files say `bias_correction: false`); a group
with `sage: false` has `params_type: 'common'` (the plain base step), one with `sage: true` has
`params_type: 'mask'` (as the authors' mt_dnn/model.py names it); `beta0` -> `beta3`;
`per_tensor_clip` -> `max_grad_norm` (null -> -1); schedule `constant` -> `t_total=-1`,
`warmup_linear_ppb` -> `schedule='warmup_linear', warmup, t_total` (pytorch-pretrained-bert
0.6.0's `warmup_linear`); `global_clip` -> `torch.nn.utils.clip_grad_norm_` over the tensors that
have a gradient, before `optimizer.step()`, as the authors' training loop (mt_dnn/model.py) does;
a null gradient -> `p.grad = None` at that step.

The authors' code is imported at run time from the path given with --authors (a checkout of their
repository, a bare clone of it, or the bert_optim.py file itself), through bench/compare_torch.py's
`load_authors`; it is never copied into this repository. bert_optim.py imports
`pytorch_pretrained_bert.optimization`: with --ppb PATH (that package's optimization.py, e.g.
unpacked from the pytorch-pretrained-bert 0.6.0 wheel) the real module is used, otherwise
compare_torch.py's stand-in, whose `warmup_linear` is 0.6.0's formula. torch comes from the
interpreter, or from compare_torch.py's cached venv under .cache/ (this script re-runs itself
there).

Usage:

    # N random files. File i is drawn from random.Random("SEED:i"); a draw that is not finite or
    # in which nothing moves by more than 2x the tolerance's abs is redrawn from "SEED:i:1",
    # "SEED:i:2", ... (the description says which draw). Any one file can be regenerated alone
    # with --only i; the same seed, count and authors' code give byte-identical files.
    python3 bench/record_vectors.py --authors PATH/TO/SAGE --out DIR --count N --seed S [--only I]

    # one configuration given as JSON: a sage-vectors/1 object without `params` in its steps
    # (and without `tolerance`); `params` and `tolerance` are filled in
    python3 bench/record_vectors.py --authors PATH --config CFG.json --out DIR

    # re-run existing files' configurations (their init and grads) and report how far this
    # recorder's float64 params and tolerance are from theirs
    python3 bench/record_vectors.py --authors PATH --check FILE.json [FILE.json ...]

    # the edge-case set (fixed configurations, see edge_cases())
    python3 bench/record_vectors.py --authors PATH --out DIR --edge

Random files cover: adamw and adamax; 1-4 groups with SAGE on or off and weight decays 0 to 0.1;
AdamW bias correction on and off; constant and warmup_linear_ppb schedules (warmup 0 to 0.6,
t_total sometimes shorter than the run, where ppb's rate goes negative); per-tensor and global
clipping off or at values that do and do not bite; absent gradients (random, leading, trailing,
gaps); gradients sometimes repeated from the previous step; shapes from 1 element through odd
lengths and 2-3 dimensions to > 4096 elements (several chunks of the project's norm grid);
zero-initialised tensors (SAGE's θ = 0 elements), LayerNorm-like ones (all 1), near-zero ones
(|θ| ~ 1e-8..1e-4), exact zeros and zero gradients mixed in; 1-150 steps; beta1 0-0.99, beta2
0.9-0.9999, beta0 0.1-0.99, eps 1e-8-1e-4, lr 1e-4-3e-2. The edge-case set adds a step where no
tensor has a gradient, shapes [] and [0], an empty group, a tensor never stepped, beta0 = 0,
beta1 = 0, warmup 0 with t_total 1, rates past t_total, subnormal sensitivities, eps 1e-2,
huge clipped gradients, 400-step runs and lr 0.5.
"""
import argparse
import copy
import json
import math
import os
import random
import struct
import sys
import warnings

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing compare_torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_torch  # noqa: E402  (load_authors and the venv's path, shared with the benchmark)

FORMAT = "sage-vectors/1"
REL_FLOOR = 1e-6      # rel is never below 20 * this
REL_SCALE_FLOOR = 1e-3  # relative spread is measured against max(|p64|, this)
FACTOR = 20.0


# --------------------------------------------------------------------------- the authors' code

def load_authors_module(path, ppb=None):
    """The namespace of the authors' bert_optim.py (its classes by name), imported from `path`."""
    if ppb:
        import importlib.util
        import types
        spec = importlib.util.spec_from_file_location("pytorch_pretrained_bert.optimization", ppb)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        pkg = types.ModuleType("pytorch_pretrained_bert")
        pkg.optimization = mod
        sys.modules["pytorch_pretrained_bert"] = pkg
        sys.modules["pytorch_pretrained_bert.optimization"] = mod
    cls, where = compare_torch.load_authors(path)
    # load_authors returns one class; the module's other classes live in its globals.
    return cls.step.__globals__, where


def ensure_torch(args):
    """Imports torch, or re-executes this script in compare_torch.py's cached venv (made on demand,
    as compare_torch.py does, unless --no-install)."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    import subprocess
    py = os.path.join(compare_torch.VENV, "bin", "python3")
    if os.path.abspath(sys.executable) == os.path.abspath(py):
        sys.exit("torch is not importable even in " + compare_torch.VENV)
    if not os.path.exists(py) or subprocess.run([py, "-c", "import torch"], capture_output=True).returncode:
        if args.no_install:
            sys.exit("torch is not installed here and --no-install was given")
        print(f"installing torch into {compare_torch.VENV} (once; several GB)", file=sys.stderr)
        if not os.path.exists(py):
            subprocess.run([sys.executable, "-m", "venv", compare_torch.VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "torch"], check=True)
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def f32(x):
    """x rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def run_authors(A, spec, dtype):
    """Runs `spec` (a sage-vectors/1 object; only init and grads are read) through the authors'
    optimizer on `dtype` tensors. Returns params after every step: [step][tensor] -> flat list."""
    import torch
    o = spec["optimizer"]
    if o.get("preset") != "reference":
        raise ValueError("only the reference preset is recorded from the authors' code")
    params = [torch.nn.Parameter(torch.tensor(t["init"], dtype=dtype).reshape(t["shape"]))
              for t in spec["tensors"]]
    groups = [{"params": [params[i] for i in g["tensors"]],
               "weight_decay": g["weight_decay"],
               "params_type": "mask" if g["sage"] else "common"} for g in spec["groups"]]
    sch = o["schedule"]
    if sch["kind"] == "constant":
        warmup, t_total = -1, -1
    elif sch["kind"] == "warmup_linear_ppb":
        warmup, t_total = sch["warmup"], sch["t_total"]
    else:
        raise ValueError(f"schedule {sch['kind']} is not in the authors' code")
    clip = o.get("per_tensor_clip")
    kw = dict(lr=o["lr"], warmup=warmup, t_total=t_total, schedule="warmup_linear",
              betas=tuple(o["betas"]), beta3=o["beta0"], eps=o["eps"],
              max_grad_norm=-1 if clip is None else clip)
    if o["algorithm"] == "adamw":
        opt = A["UnstructAwareAdamW"](groups, correct_bias=o["bias_correction"], **kw)
    elif o["algorithm"] == "adamax":
        if o["bias_correction"]:
            # The authors' Adamax has none; such a file cannot come from their code.
            raise ValueError("adamax in the authors' code has no bias correction")
        opt = A["UnstructAwareAdamax"](groups, **kw)
    else:
        raise ValueError(f"algorithm {o['algorithm']} is not in the authors' code")
    out = []
    for st in spec["steps"]:
        for p, g in zip(params, st["grads"]):
            p.grad = None if g is None else torch.tensor(g, dtype=dtype).reshape(p.shape)
        if o.get("global_clip") is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                           o["global_clip"])
        opt.step()
        out.append([p.detach().reshape(-1).to(torch.float64).tolist() for p in params])
    return out


def tolerance(r64, r32):
    """20x the float32-float64 spread, in the form of the files in shared/vectors."""
    spread, rel = 0.0, 0.0
    for s64, s32 in zip(r64, r32):
        for t64, t32 in zip(s64, s32):
            for x, y in zip(t64, t32):
                d = abs(x - y)
                if d != d:  # NaN
                    raise ValueError("non-finite result")
                spread = max(spread, d)
                rel = max(rel, d / max(abs(x), REL_SCALE_FLOOR))
    return {"rel": FACTOR * max(REL_FLOOR, rel), "abs": FACTOR * spread}


def finite(r):
    return all(math.isfinite(x) for s in r for t in s for x in t)


def record(A, spec):
    """`spec` with `params` and `tolerance` filled in from the authors' code."""
    import torch
    r64 = run_authors(A, spec, torch.float64)
    r32 = run_authors(A, spec, torch.float32)
    if not (finite(r64) and finite(r32)):
        raise ValueError("non-finite parameters")
    out = {"format": FORMAT, "name": spec["name"], "source": "reference",
           "description": spec.get("description", ""),
           "optimizer": spec["optimizer"], "groups": spec["groups"], "tensors": spec["tensors"],
           "steps": [{"grads": st["grads"], "params": p} for st, p in zip(spec["steps"], r64)],
           "tolerance": tolerance(r64, r32)}
    check_format(out)
    return out


def check_format(d):
    """The structural rules of FORMAT.md (and of conformance/src/vectors.rs)."""
    n = len(d["tensors"])
    for i, t in enumerate(d["tensors"]):
        assert math.prod(t["shape"]) == len(t["init"]), f"tensor {i}: shape/init"
        assert all(f32(v) == v for v in t["init"]), f"tensor {i}: init not float32"
    seen = sorted(i for g in d["groups"] for i in g["tensors"])
    assert seen == list(range(n)), "every tensor in exactly one group"
    for si, st in enumerate(d["steps"]):
        assert len(st["grads"]) == n and len(st["params"]) == n, f"step {si + 1}: counts"
        for t, g, p in zip(d["tensors"], st["grads"], st["params"]):
            assert len(p) == len(t["init"]), f"step {si + 1}: params length"
            if g is not None:
                assert len(g) == len(t["init"]), f"step {si + 1}: grads length"
                assert all(f32(v) == v for v in g), f"step {si + 1}: grads not float32"


# --------------------------------------------------------------------------- random configurations

def log_uniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def rounded(x, digits=3):
    """A short decimal (hyper-parameters are written as people write them)."""
    return float(f"{x:.{digits}g}")


def random_shape(rng, big):
    if big:
        return rng.choice([[4097], [5000], [6143], [8192], [8193], [9999], [12289],
                           [64, 65], [3, 2049], [2, 3, 1001]])
    kind = rng.random()
    if kind < 0.15:
        return [1]
    if kind < 0.45:
        return [rng.choice([2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 255, 257])]
    if kind < 0.8:
        return [rng.randint(1, 12), rng.randint(1, 24)]
    return [rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 7)]


def random_init(rng, n):
    kind = rng.random()
    if kind < 0.12:
        return [0.0] * n                       # a bias, zero-initialised
    if kind < 0.2:
        return [1.0] * n                       # LayerNorm weight
    # Mostly BERT-like scales; sometimes parameters near zero (|θ| far below lr: there SAGE's
    # modulation amplifies rounding, see the report of bench/record_vectors.py's campaign).
    scale = log_uniform(rng, 1e-8, 1e-4) if rng.random() < 0.1 else log_uniform(rng, 1e-3, 0.5)
    zeros = rng.choice([0.0, 0.0, 0.05, 0.3])  # exact zeros mixed in
    out = []
    for _ in range(n):
        if rng.random() < zeros:
            out.append(0.0)
        elif rng.random() < 0.05:
            out.append(f32(rng.uniform(-2, 2)))  # an odd large one
        else:
            out.append(f32(rng.gauss(0.0, scale)))
    return out


def random_grad(rng, n, scale, zeros):
    if rng.random() < 0.03:
        return [0.0] * n
    return [0.0 if rng.random() < zeros else f32(rng.gauss(0.0, scale)) for _ in range(n)]


def presence(rng, n_tensors, n_steps):
    """Which tensor has a gradient at which step."""
    pattern = rng.choice(["all", "all", "random", "lead", "gap", "mixed"])
    have = [[True] * n_tensors for _ in range(n_steps)]
    if pattern == "all":
        return have, pattern
    p_null = rng.choice([0.15, 0.3, 0.5])
    for t in range(n_tensors):
        mode = pattern if pattern != "mixed" else rng.choice(["random", "lead", "gap", "trail", "none"])
        if mode == "random":
            for s in range(n_steps):
                have[s][t] = rng.random() >= p_null
        elif mode == "lead" and rng.random() < 0.6:
            k = rng.randint(1, max(1, n_steps - 1))
            for s in range(k):
                have[s][t] = False
        elif mode == "gap" and n_steps > 2 and rng.random() < 0.6:
            a = rng.randint(1, n_steps - 1)
            b = rng.randint(a, n_steps - 1)
            for s in range(a, b + 1):
                have[s][t] = False
        elif mode == "trail" and n_steps > 1:
            for s in range(rng.randint(1, n_steps - 1), n_steps):
                have[s][t] = False
    # Keep at least one tensor per step (a step with none is an edge case of its own).
    for s in range(n_steps):
        if not any(have[s]):
            have[s][rng.randrange(n_tensors)] = True
    return have, pattern


def random_spec(seed, index, attempt=0):
    rng = random.Random(f"{seed}:{index}" + (f":{attempt}" if attempt else ""))
    algorithm = rng.choice(["adamw", "adamw", "adamax"])
    big = rng.random() < 0.2
    n_tensors = rng.randint(1, 3) if big else rng.randint(1, 6)
    shapes = [random_shape(rng, big and i == 0) for i in range(n_tensors)]
    if big:
        n_steps = rng.randint(1, 6)
    else:
        n_steps = rng.choice([1, 2, 3, rng.randint(4, 12), rng.randint(4, 20), rng.randint(20, 40),
                              rng.randint(60, 150)])
    b1 = rng.choice([0.9, 0.9, 0.9, 0.8, 0.95, 0.5, 0.0, rounded(rng.uniform(0.5, 0.99))])
    b2 = rng.choice([0.999, 0.999, 0.98, 0.99, 0.9999, rounded(rng.uniform(0.9, 0.9999), 4)])
    # (beta0 = 0 makes U = 0, so SAGE never moves anything: an edge case, see edge_cases())
    beta0 = rng.choice([0.75, 0.8, 0.6, 0.9, 0.95, 0.99, 0.4, 0.1, rounded(rng.uniform(0.3, 0.97))])
    eps = rng.choice([1e-6, 1e-6, 1e-8, 1e-7, 1e-5, 1e-4])
    lr = rounded(log_uniform(rng, 1e-4, 3e-2), 2)
    bias = rng.random() < 0.6 if algorithm == "adamw" else False
    if rng.random() < 0.5:
        schedule = {"kind": "constant"}
    else:
        t_total = rng.choice([n_steps, n_steps + rng.randint(0, 30), rng.randint(5, 100),
                              max(1, n_steps - rng.randint(1, 5))])
        warmup = rng.choice([0.1, 0.0, 0.2, 0.5, rounded(rng.uniform(0.0, 0.6), 2)])
        schedule = {"kind": "warmup_linear_ppb", "warmup": warmup, "t_total": t_total}
    per_tensor_clip = rng.choice([None, None, 1.0, 0.1, 0.5, 5.0])
    global_clip = rng.choice([None, None, 1.0, 0.25, 2.0])
    # groups: a partition of the tensors
    n_groups = rng.randint(1, min(4, n_tensors))
    order = list(range(n_tensors))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, n_tensors), n_groups - 1)) if n_groups > 1 else []
    parts = [sorted(order[a:b]) for a, b in zip([0] + cuts, cuts + [n_tensors])]
    groups = [{"sage": rng.random() < 0.7,
               "weight_decay": rng.choice([0.0, 0.01, 0.01, 0.1, rounded(rng.uniform(0, 0.05), 2)]),
               "tensors": p} for p in parts]
    tensors = []
    for shape in shapes:
        tensors.append({"shape": shape, "init": random_init(rng, math.prod(shape))})
    have, pattern = presence(rng, n_tensors, n_steps)
    gscale = [log_uniform(rng, 1e-4, 2.0) for _ in range(n_tensors)]
    gzero = [rng.choice([0.0, 0.0, 0.1]) for _ in range(n_tensors)]
    # Sometimes a tensor's gradient repeats the previous one (a fixed batch, accumulation).
    repeat = rng.choice([0.0] * 9 + [0.5])
    steps, last = [], [None] * n_tensors
    for s in range(n_steps):
        grads = []
        for i, t in enumerate(tensors):
            if not have[s][i]:
                grads.append(None)
                continue
            if last[i] is None or rng.random() >= repeat:
                last[i] = random_grad(rng, len(t["init"]), gscale[i] * rng.uniform(0.5, 1.5), gzero[i])
            grads.append(last[i])
        steps.append({"grads": grads})
    optimizer = {"algorithm": algorithm, "preset": "reference", "lr": lr, "betas": [b1, b2],
                 "beta0": beta0, "eps": eps, "bias_correction": bias, "schedule": schedule,
                 "per_tensor_clip": per_tensor_clip, "global_clip": global_clip}
    desc = (f"random case {index} of seed {seed} (bench/record_vectors.py --seed {seed} --only {index}); "
            f"absent-gradient pattern {pattern}")
    return {"format": FORMAT, "name": f"rand-s{seed}-{index:03d}", "source": "reference",
            "description": desc, "optimizer": optimizer, "groups": groups, "tensors": tensors,
            "steps": steps}


def movement(d):
    """The largest distance any element moved from its initial value."""
    init = [t["init"] for t in d["tensors"]]
    return max((abs(x - x0) for st in d["steps"] for p, p0 in zip(st["params"], init)
                for x, x0 in zip(p, p0)), default=0.0)


def record_random(A, seed, index, attempts=20):
    """Random file `index` of `seed`: the first draw (attempt 0, 1, ...) whose run is finite and
    tests something, i.e. some element moves by more than twice the tolerance's abs (a run where
    nothing moves, as when Adamax's first rate is 0 under warm-up, passes any replayer)."""
    for attempt in range(attempts):
        try:
            d = record(A, random_spec(seed, index, attempt))
        except ValueError:
            continue
        if movement(d) > 2 * d["tolerance"]["abs"]:
            if attempt:
                d["description"] += f" (draw {attempt})"
            return d
    return None


# --------------------------------------------------------------------------- edge cases

def _base(name, desc, algorithm="adamw", **o):
    opt = {"algorithm": algorithm, "preset": "reference", "lr": 0.002, "betas": [0.9, 0.999],
           "beta0": 0.75, "eps": 1e-6, "bias_correction": algorithm == "adamw",
           "schedule": {"kind": "constant"}, "per_tensor_clip": None, "global_clip": None}
    opt.update(o)
    return {"format": FORMAT, "name": name, "source": "reference", "description": desc,
            "optimizer": opt}


def _tensors(rng, shapes, scale=0.05):
    return [{"shape": s, "init": [f32(rng.gauss(0, scale)) for _ in range(math.prod(s))]} for s in shapes]


def _grads(rng, tensors, steps, scale=0.05, absent=()):
    return [{"grads": [None if (s, i) in absent else
                       [f32(rng.gauss(0, scale)) for _ in range(len(t["init"]))]
                       for i, t in enumerate(tensors)]} for s in range(steps)]


def edge_cases():
    rng = random.Random("edge")
    out = []
    # A step where no tensor has a gradient (the authors' step does nothing).
    d = _base("edge-all-absent-step", "AdamW-SAGE; at step 3 no tensor has a gradient")
    d["tensors"] = _tensors(rng, [[7], [3, 4]])
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0, 1]}]
    d["steps"] = _grads(rng, d["tensors"], 6, absent={(2, 0), (2, 1)})
    out.append(d)
    # Schedule past t_total: ppb's rate goes negative.
    for alg in ("adamw", "adamax"):
        d = _base(f"edge-{alg}-past-t-total", f"{alg}-SAGE, warmup_linear_ppb with t_total 5 over 12 steps",
                  alg, schedule={"kind": "warmup_linear_ppb", "warmup": 0.2, "t_total": 5})
        d["tensors"] = _tensors(rng, [[9], [5]])
        d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]},
                       {"sage": False, "weight_decay": 0.01, "tensors": [1]}]
        d["steps"] = _grads(rng, d["tensors"], 12)
        out.append(d)
    # warmup 0 and t_total 1
    for alg in ("adamw", "adamax"):
        d = _base(f"edge-{alg}-warmup0-t1", f"{alg}-SAGE, warmup 0, t_total 1", alg,
                  schedule={"kind": "warmup_linear_ppb", "warmup": 0.0, "t_total": 1})
        d["tensors"] = _tensors(rng, [[6]])
        d["groups"] = [{"sage": True, "weight_decay": 0.0, "tensors": [0]}]
        d["steps"] = _grads(rng, d["tensors"], 4)
        out.append(d)
    # beta1 = 0, beta0 = 0
    d = _base("edge-adamw-zero-betas", "AdamW-SAGE with beta1 = 0 and beta0 = 0", betas=[0.0, 0.999], beta0=0.0)
    d["tensors"] = _tensors(rng, [[11]])
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]}]
    d["steps"] = _grads(rng, d["tensors"], 5)
    out.append(d)
    d = _base("edge-adamw-nobias-beta0-0", "AdamW-SAGE without bias correction, beta0 = 0",
              beta0=0.0, bias_correction=False)
    d["tensors"] = _tensors(rng, [[11]])
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]}]
    d["steps"] = _grads(rng, d["tensors"], 5)
    out.append(d)
    # Small sensitivities: I = |θ·g| ~ 1e-15 against eps² = 1e-18
    d = _base("edge-adamw-small", "AdamW-SAGE, parameters ~1e-6, gradients ~1e-9, eps 1e-9", eps=1e-9)
    d["tensors"] = _tensors(rng, [[13]], scale=1e-6)
    d["groups"] = [{"sage": True, "weight_decay": 0.0, "tensors": [0]}]
    d["steps"] = _grads(rng, d["tensors"], 6, scale=1e-9)
    out.append(d)
    # Subnormal sensitivities in float32: θ·g ~ 1e-40 (torch does not flush them to zero)
    for alg in ("adamw", "adamax"):
        d = _base(f"edge-{alg}-subnormal", f"{alg}-SAGE, parameters and gradients ~1e-20 (I subnormal in "
                  "float32), eps 1e-22 (eps² subnormal too)", alg, eps=1e-22)
        d["tensors"] = _tensors(rng, [[13]], scale=1e-20)
        d["groups"] = [{"sage": True, "weight_decay": 0.0, "tensors": [0]}]
        d["steps"] = _grads(rng, d["tensors"], 5, scale=1e-20)
        out.append(d)
    # A long run (errors accumulate) and a large rate
    for alg in ("adamw", "adamax"):
        d = _base(f"edge-{alg}-long", f"{alg}-SAGE and plain, 400 steps", alg, lr=0.01,
                  schedule={"kind": "warmup_linear_ppb", "warmup": 0.1, "t_total": 400}, global_clip=1.0)
        d["tensors"] = _tensors(rng, [[5], [3]])
        d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]},
                       {"sage": False, "weight_decay": 0.01, "tensors": [1]}]
        d["steps"] = _grads(rng, d["tensors"], 400, scale=0.1)
        out.append(d)
        d = _base(f"edge-{alg}-lr-0.5", f"{alg}-SAGE, lr 0.5", alg, lr=0.5)
        d["tensors"] = _tensors(rng, [[9]])
        d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]}]
        d["steps"] = _grads(rng, d["tensors"], 20)
        out.append(d)
    # Huge gradients with global and per-tensor clipping
    d = _base("edge-adamax-huge-clip", "Adamax-SAGE, gradients ~1e3, global clip 1 and per-tensor clip 0.5",
              "adamax", global_clip=1.0, per_tensor_clip=0.5)
    d["tensors"] = _tensors(rng, [[5000], [3]])
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0, 1]}]
    d["steps"] = _grads(rng, d["tensors"], 3, scale=1e3)
    out.append(d)
    # Zero gradient throughout
    d = _base("edge-adamw-zero-grads", "AdamW-SAGE and plain, all gradients exactly 0", global_clip=1.0)
    d["tensors"] = _tensors(rng, [[4], [4]])
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]},
                   {"sage": False, "weight_decay": 0.01, "tensors": [1]}]
    d["steps"] = [{"grads": [[0.0] * 4, [0.0] * 4]} for _ in range(3)]
    out.append(d)
    # Shapes at the format's corners: a 0-dim tensor (shape [], one element), an empty one
    # (shape [0]), a group with no tensors, and a tensor that never gets a gradient.
    d = _base("edge-adamw-shapes", "AdamW-SAGE: shape [], shape [0], an empty group, a tensor never stepped",
              global_clip=1.0, per_tensor_clip=1.0)
    d["tensors"] = [{"shape": [], "init": [f32(0.3)]}, {"shape": [0], "init": []},
                    {"shape": [2, 3], "init": [f32(rng.gauss(0, 0.05)) for _ in range(6)]},
                    {"shape": [4], "init": [f32(rng.gauss(0, 0.05)) for _ in range(4)]}]
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0, 1]},
                   {"sage": True, "weight_decay": 0.0, "tensors": []},
                   {"sage": False, "weight_decay": 0.01, "tensors": [3, 2]}]
    d["steps"] = _grads(rng, d["tensors"], 5, absent={(s, 3) for s in range(5)})
    out.append(d)
    # A large eps (the SAGE denominator eps² = 1e-4 matters)
    d = _base("edge-adamw-eps-1e-2", "AdamW-SAGE with eps 1e-2", eps=1e-2)
    d["tensors"] = _tensors(rng, [[17]])
    d["groups"] = [{"sage": True, "weight_decay": 0.01, "tensors": [0]}]
    d["steps"] = _grads(rng, d["tensors"], 6)
    out.append(d)
    return out


# --------------------------------------------------------------------------- command line

def write(d, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, d["name"] + ".json")
    with open(path, "w") as f:
        json.dump(d, f, separators=(",", ":"))
        f.write("\n")
    return path


def check_files(A, paths):
    """Re-runs each file's configuration; prints the deviation of this recorder's float64 params
    from the file's, and its tolerance next to the file's. Returns False when one deviates by
    more than the file's own tolerance allows."""
    import torch
    ok = True
    for path in paths:
        d = json.load(open(path))
        spec = copy.deepcopy(d)
        for st in spec["steps"]:
            st.pop("params", None)
        r64 = run_authors(A, spec, torch.float64)
        r32 = run_authors(A, spec, torch.float32)
        tol = d["tolerance"]
        dev, worst = 0.0, 0.0
        for s, st in zip(r64, d["steps"]):
            for t, e in zip(s, st["params"]):
                for x, y in zip(t, e):
                    dev = max(dev, abs(x - y))
                    worst = max(worst, abs(x - y) / (tol["abs"] + tol["rel"] * abs(y)))
        mine = tolerance(r64, r32)
        good = worst <= 1.0
        ok &= good
        print(f"{os.path.basename(path)}: max |p64 - file| = {dev:.3e} ({worst:.2e}x its tolerance); "
              f"tolerance here abs {mine['abs']:.6e} rel {mine['rel']:.6e}, "
              f"file abs {tol['abs']:.6e} rel {tol['rel']:.6e}  {'ok' if good else 'DIFFERS'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--authors", required=True, help="the authors' SAGE repository, bare clone, or bert_optim.py")
    ap.add_argument("--ppb", help="pytorch-pretrained-bert 0.6.0's optimization.py (default: a stand-in)")
    ap.add_argument("--out", help="directory to write the files to")
    ap.add_argument("--count", type=int, default=0, help="random files to record")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random files")
    ap.add_argument("--only", type=int, action="append", help="record only random file I (repeatable)")
    ap.add_argument("--config", action="append", default=[], help="record one configuration (JSON file)")
    ap.add_argument("--edge", action="store_true", help="record the edge-case set")
    ap.add_argument("--check", nargs="+", default=[], help="re-run existing files and compare")
    ap.add_argument("--no-install", action="store_true", help="never install torch")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    ensure_torch(args)
    warnings.filterwarnings("ignore")
    A, where = load_authors_module(args.authors, args.ppb)
    print(f"authors' optimizers from {where}", file=sys.stderr)
    if args.check:
        return 0 if check_files(A, args.check) else 1
    if not args.out:
        ap.error("--out is needed to record")
    specs = []
    for c in args.config:
        spec = json.load(open(c))
        spec.setdefault("format", FORMAT)
        spec.setdefault("name", os.path.splitext(os.path.basename(c))[0])
        for st in spec["steps"]:
            st.pop("params", None)
        specs.append(spec)
    if args.edge:
        specs.extend(edge_cases())
    indices = args.only if args.only else range(args.count)
    made, skipped = 0, 0
    for spec in specs:
        print(write(record(A, spec), args.out))
        made += 1
    for i in indices:
        d = record_random(A, args.seed, i)
        if d is None:
            print(f"seed {args.seed} case {i}: skipped (no usable draw)", file=sys.stderr)
            skipped += 1
            continue
        print(write(d, args.out))
        made += 1
    print(f"{made} files written to {args.out}" + (f", {skipped} skipped" if skipped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
