"""
Sample quality on the embedded 8x8 digits: does a trained model generate the digit it was asked for?

    python quality.py --samples s.npz          # judge samples written by sample.py (labels inside the npz)
    python quality.py --all                    # train every backbone x objective, sample, judge, print the table
                                               # (train.py's digits budget: 2000 steps, DiT 1200, U-ViT 4000)
    python quality.py --run RUN_DIR --samplers ddpm:250 ddim:50   # one trained run, several samplers

Two numbers, both from a small CNN trained ONLY on the real training digits (its held-out accuracy is
printed beside them):
    class accuracy   fraction of samples the classifier assigns to the requested class
    Frechet distance between classifier features (64-d penultimate layer) of N samples and of the N=360
                     held-out real digits; the floor is the same distance between 360 real training digits
                     and the held-out ones (real vs real).
"""
import json
import math
import os
import shlex
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import train


class DigitNet(nn.Module):
    """conv 32 -> conv 64 -> pool -> fc 64 (features) -> fc 10."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.f1 = nn.Linear(64 * 4 * 4, 64)
        self.f2 = nn.Linear(64, 10)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)   # (N, 64, 4, 4)
        return F.relu(self.f1(x.flatten(1)))

    def forward(self, x):
        return self.f2(self.features(x))


def train_classifier(seed=0, epochs=40):
    """The judge: trained on the real training split only. Returns (net, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = train.load_digits("train")
    xh, yh = train.load_digits("heldout")
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            # light augmentation (one-pixel shifts) so the judge does not reward copies of the training set only
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xh).argmax(1) == yh).float().mean().item()
    return net, acc


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two feature sets (rows = samples)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(min=0))) @ v.T                             # S1^(1/2)
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(min=0)).sum()  # Tr (S1^(1/2) S2 S1^(1/2))^(1/2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def judge(net, samples, labels):
    """samples (N, 1, 8, 8) in [-1, 1], labels (N,) -> dict(accuracy, fd, fd_floor)."""
    xh, _ = train.load_digits("heldout")
    xt, _ = train.load_digits("train")
    with torch.no_grad():
        acc = (net(samples).argmax(1) == labels).float().mean().item()
        f_s, f_h, f_t = net.features(samples), net.features(xh), net.features(xt[: len(xh)])
    return dict(accuracy=acc, fd=frechet_distance(f_s, f_h), fd_floor=frechet_distance(f_t, f_h))


def from_npz(path):
    """sample.py's .npz of digits (arr_0 uint8 (N, 8, 8, 1), labels int (N,) in 0..9) -> (x in [-1, 1], labels);
    UserError for anything else, so that a bad file is refused before the judge is trained."""
    try:
        d = np.load(path)
        if not isinstance(d, np.lib.npyio.NpzFile) or not {"arr_0", "labels"} <= set(d.files):
            raise train.UserError(f"{path}: needs arr_0 (samples) and labels, as sample.py writes for a "
                                  "class-conditional model")
        a, labels = d["arr_0"], d["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise train.UserError(f"{path}: not an .npz of sample.py ({str(e).strip().splitlines()[0][:120]})")
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (8, 8, 1) or len(a) < 2:
        raise train.UserError(f"{path}: arr_0 must be uint8 N x 8 x 8 x 1 digits with N >= 2, got {a.dtype} {a.shape}")
    if labels.shape != (len(a),) or labels.dtype.kind not in "iu" or not ((labels >= 0) & (labels < 10)).all():
        raise train.UserError(f"{path}: labels must be {len(a)} integers in 0..9, got {labels.dtype} {labels.shape}")
    x = torch.from_numpy(a).float().permute(0, 3, 1, 2) / 127.5 - 1.0  # uint8 NHWC -> [-1, 1]
    return x, torch.from_numpy(labels.astype(np.int64))


def evaluate_run(net, run_dir, cfg_scale, sampler=None, steps=None, n=360, seed=0):
    """Sample n class-balanced digits from a run's EMA weights and judge them."""
    import sample
    out = os.path.join(run_dir, f"eval_cfg{cfg_scale}_{sampler}_{steps}.npz")
    argv = ["--ckpt", run_dir, "--out", out, "--num-samples", str(n), "--balanced", "--cfg-scale", str(cfg_scale),
            "--batch-size", str(n), "--seed", str(seed)]
    argv += ["--sampler", sampler] if sampler else []
    argv += ["--sample-steps", str(steps)] if steps is not None else []
    t0 = time.time()
    sample.main(argv)
    x, y = from_npz(out)
    return dict(judge(net, x, y), sample_s=time.time() - t0)


def evaluate_all(args):
    """Train every backbone x objective on the digits with one seed and budget, then judge."""
    net, acc_real = train_classifier(args.seed)
    rows = []
    for variant in args.models:
        family, _, size = variant.partition(":")
        for objective in args.objectives:
            t0 = time.time()
            run = train.main(["--model", family, "--objective", objective, "--seed", str(args.seed),
                              "--results-dir", args.results_dir, "--no-progress", "--sample-every", "0"]
                             + (["--steps", str(args.steps)] if args.steps is not None else []) + (["--size", size] if size else [])
                             + shlex.split(args.train_args))
            train_s = time.time() - t0
            row = dict(model=size or train.FAMILIES[family]["small"], objective=objective, train_args=args.train_args,
                       steps=train.load_checkpoint(run)["step"], train_s=round(train_s, 1))
            for w in args.cfg_scales:
                r = evaluate_run(net, run, w, steps=args.sample_steps, seed=args.seed)
                row[f"acc_cfg{w}"], row[f"fd_cfg{w}"] = round(r["accuracy"], 3), round(r["fd"], 2)
            row["fd_floor"] = round(r["fd_floor"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\njudge: CNN trained on the real training digits, held-out accuracy {acc_real:.4f}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    train.write_json(args.json, dict(classifier_heldout_accuracy=acc_real, rows=rows))
    return rows


def evaluate_samplers(args):
    """Judge one trained run with several SAMPLER:STEPS settings at guidance w = 1 (the speed/quality trade-off)."""
    if not os.path.isdir(args.run):
        raise train.UserError(f"--run {args.run}: no such run directory")
    config = train.load_checkpoint(args.run).get("config")
    config = config if isinstance(config, dict) else {}
    objective = (config.get("objective") or {}).get("name")
    if objective not in train.SAMPLERS:
        raise train.UserError(f"--run {args.run}: not a run of train.py")
    if (config.get("data") or {}).get("kind") != "digits":   # refused now, not after minutes of judge and sampling
        raise train.UserError(f"--run {args.run}: trained on {(config.get('data') or {}).get('kind')}, not the digits "
                              "this judge knows")
    specs = []                                                                  # [(sampler, steps or None), ...]
    for spec in args.samplers:
        sampler, _, steps = spec.partition(":")
        if sampler not in train.SAMPLERS[objective] or (steps and not (steps.isdigit() and int(steps) > 0)):
            raise train.UserError(f"--samplers {spec}: give SAMPLER or SAMPLER:STEPS with a sampler of "
                                  f"{objective} ({', '.join(train.SAMPLERS[objective])})")
        lo, hi = (1 if sampler in ("dpm++", "ode-dopri5") else 2), (1000 if objective == "ddpm" else math.inf)
        if steps and not lo <= int(steps) <= hi:              # what train.py's --sample-steps takes
            raise train.UserError(f"--samplers {spec}: {sampler} takes " + (f"{lo} to {hi} steps" if hi < math.inf
                                                                             else f"at least {lo} steps"))
        specs.append((sampler, int(steps) if steps else None))
    net, acc_real = train_classifier(args.seed)
    rows = []
    for sampler, steps in specs:
        r = evaluate_run(net, args.run, 1.0, sampler=sampler, steps=steps, seed=args.seed)
        rows.append(dict(sampler=sampler, steps=steps, accuracy=round(r["accuracy"], 3),
                         fd=round(r["fd"], 2), fd_floor=round(r["fd_floor"], 2), sample_s=round(r["sample_s"], 1)))
        print(json.dumps(rows[-1]), flush=True)
    print(f"judge held-out accuracy {acc_real:.4f}")
    train.write_json(args.json, dict(classifier_heldout_accuracy=acc_real, run=args.run, rows=rows))
    return rows


def main(argv=None):
    p = train.ArgumentParser(description="Judge digit samples with a classifier trained on real digits.")
    p.add_argument("--samples", help="an .npz written by sample.py (arr_0 and labels)")
    p.add_argument("--all", action="store_true", help="train and judge every backbone x objective")
    p.add_argument("--run", help="a trained run directory to judge with each of --samplers")
    p.add_argument("--samplers", nargs="+", default=[], help="SAMPLER or SAMPLER:STEPS for --run, e.g. ddpm:250 "
                   "ddim:50 dpm++:25 sde-euler:50 ode-dopri5 (w = 1, 360 class-balanced samples)")
    p.add_argument("--models", nargs="+", default=list(train.FAMILIES) + ["diffit:DiffiT-UNet-Tiny"],
                   help="FAMILY or FAMILY:SIZE for --all (default: every family's Tiny config + image-space DiffiT)")
    p.add_argument("--sample-steps", type=int, default=250, help="steps of each objective's default sampler (default: 250)")
    p.add_argument("--objectives", nargs="+", default=list(train.OBJECTIVES), choices=train.OBJECTIVES,
                   help="objectives for --all (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps per pair for --all (default: train.py's "
                   "digits default: 1200 DiT, 4000 U-ViT, 2000 the others)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to judge (default: 1 3)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every pair of --all, one quoted string, "
                   "e.g. --train-args='--lr 3e-4' (default: none)")
    p.add_argument("--results-dir", default="runs/quality", help="where --all puts its runs (default: runs/quality)")
    p.add_argument("--json", default="quality.json", help="--all writes its table here (default: quality.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and the classifier (default: 0)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.samples, args.all, args.run))) > 1:
        raise train.UserError("give one of --samples, --all and --run")
    if args.all or args.run:                     # checked before any training: the table is written at the end
        train.require_json_file(args.json, "--json")
    if args.all:
        for name in ("steps", "sample_steps"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise train.UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if not all(math.isfinite(w) for w in args.cfg_scales):
            raise train.UserError(f"--cfg-scales must be finite numbers, got {' '.join(map(str, args.cfg_scales))}")
        try:                                     # refused now, not after the judge and the first pairs have trained
            extra = shlex.split(args.train_args)
        except ValueError as e:
            raise train.UserError(f"--train-args {args.train_args!r}: {e}")
        try:                                     # an unknown train.py flag
            train.get_parser().parse_args(extra)
        except train.UserError as e:
            raise train.UserError(f"--train-args {args.train_args!r}: {str(e).replace(' (see --help)', '')} "
                                  "(see python train.py --help)")
        for variant in args.models:
            family, _, size = variant.partition(":")
            if family not in train.FAMILIES or (size and size not in train.registry(family)):
                raise train.UserError(f"--models {variant}: give FAMILY or FAMILY:SIZE, FAMILY one of "
                                      f"{', '.join(train.FAMILIES)} and SIZE from its registry")
        return evaluate_all(args)
    if args.run:
        if not args.samplers:
            raise train.UserError("--run needs --samplers, e.g. --samplers ddpm:250 ddim:50")
        return evaluate_samplers(args)
    if not args.samples:
        raise train.UserError("give --samples FILE.npz, --all, or --run DIR --samplers ...")
    if not os.path.isfile(args.samples):
        raise train.UserError(f"--samples {args.samples}: no such file")
    x, y = from_npz(args.samples)                # a bad file is refused before the judge trains (minutes)
    net, acc_real = train_classifier(args.seed)
    r = judge(net, x, y)
    print(json.dumps(dict(classifier_heldout_accuracy=round(acc_real, 4), n=len(x),
                          accuracy=round(r["accuracy"], 4), fd=round(r["fd"], 3), fd_floor=round(r["fd_floor"], 3))))
    return r


if __name__ == "__main__":
    try:
        main()
    except train.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
