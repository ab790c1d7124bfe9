"""
Train any backbone (dit, unet_vit, mdt, diffit) with any objective (ddpm, sit).

    python train.py                                   # DiT-Tiny/2 + ddpm on the embedded 8x8 digits, CPU, minutes
    python train.py --model mdt --objective sit       # MDT with mask latent modeling, SiT objective
    torchrun --nproc_per_node 8 train.py --data LATENT_DIR --model dit --size DiT-XL/2   # ImageNet latents

Reads top to bottom: arguments -> setup (device, DDP, seeds) -> data -> model + objective -> loop.
The loop: draw a global batch, compute the objective's per-sample loss (plus, for backbones that train
with masking, the same loss on the masked input, MDT Sec. 4.4), AdamW step, EMA update, log, sample
grids, checkpoints. Checkpoints are plain data (tensors, numbers, strings) written atomically.
"""
import argparse
import copy
import importlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# backbone family (its module's name) -> the module's size registry, and the default size on small data (the
# digits, image folders) and on latents
FAMILIES = {
    "dit": dict(registry="DiT_models", small="DiT-Tiny/2", latents="DiT-XL/2"),
    "unet_vit": dict(registry="UViT_models", small="U-ViT-Tiny/2", latents="U-ViT-H/2"),
    "mdt": dict(registry="MDT_models", small="MDTv2-Tiny/2", latents="MDTv2-XL/2"),
    "diffit": dict(registry="DiffiT_models", small="DiffiT-Tiny/2", latents="DiffiT-XL/2"),
}
OBJECTIVES = ("ddpm", "sit")
SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "sit": ("ode-euler", "ode-heun", "ode-dopri5", "sde-euler", "sde-heun")}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "sit": "sde-euler"}
# Presets: the official recipe for real data; a fast one for the embedded digits (so a CPU run takes minutes)
PRESETS = {
    "official": dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=0, grad_clip=0.0, ema=0.9999,
                     batch_size=256, steps=400_000, log_every=100, sample_every=10_000, ckpt_every=50_000,
                     sample_steps=250),
    # digits: min-SNR-5 for ddpm on every backbone (README, "Does every pair learn?": DiT's plain weighting
    # under-trains the high-noise steps where the class is decided; DiffiT-Tiny/2 misses 0.90 without it)
    "digits": dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=0, grad_clip=0.0, ema=0.995,
                   batch_size=128, steps=2000, log_every=100, sample_every=500, ckpt_every=1000, sample_steps=50,
                   min_snr=True),
}
# Each family's own optimizer recipe on real data (ImageNet-256 latents), over the "official" preset above:
# DiT/SiT: AdamW 1e-4 (DiT Sec. 4). U-ViT-H/2: AdamW 2e-4, wd 0.03 on every parameter, betas (0.99, 0.99), linear
# warm-up over 5k steps, batch 1024, 500k steps (configs/imagenet256_uvit_huge.py). MDT: AdamW 3e-4 (v1; MDTv2
# trains with Adan, which torch lacks: we keep AdamW at its lr and its grad-norm clip of 1). Latent DiffiT: 3e-4
# at 256 px (1e-4 with batch 512 at 512 px: pass them).
OFFICIAL_RECIPES = {
    "dit": {},
    "unet_vit": dict(lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99), warmup_steps=5000, batch_size=1024, steps=500_000),
    "mdt": dict(lr=3e-4),
    "mdt_v2": dict(lr=3e-4, grad_clip=1.0),
    "diffit": dict(lr=3e-4),
}
# On the digits every family takes the "digits" preset, except two. U-ViT trains 4,000 steps: it has no adaLN (time
# and class reach the patches only through attention) and learns slower; at 2,000 steps U-ViT + sit missed the
# 0.90 accuracy target with one of three seeds. DiT, the README's main job, trains 1,200 steps at lr 3e-3 with AdamW
# betas (0.9, 0.99) and EMA decay 0.99, so that the job fits 5 minutes on 2 CPU cores, AVX2 ones included (at
# 1,200 steps neither shorter memory was enough alone, together they were). Both DiT pairs pass the digits targets
# with three seeds, at a lower mean accuracy than 2,000 steps at 1e-3 gave for ddpm (README, "Does every pair learn?")
DIGITS_RECIPES = {"unet_vit": dict(steps=4000), "dit": dict(steps=1200, lr=3e-3, betas=(0.9, 0.99), ema=0.99)}


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (a bad value, an unknown or missing flag) are a UserError too: one line, exit
    code 2, instead of the whole usage text followed by the error."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------

def add_model_args(p):
    p.add_argument("--model", default="dit", choices=list(FAMILIES), help="backbone family (default: dit)")
    p.add_argument("--size", default=None, help="config name from the family's registry, e.g. DiT-XL/2 "
                   "(default: the family's Tiny config on digits/small images, its XL config on latents)")
    p.add_argument("--objective", default="ddpm", choices=OBJECTIVES, help="training objective (default: ddpm)")
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance (default: 0.1)")
    # ddpm
    p.add_argument("--beta-schedule", default=None, choices=["linear", "scaled_linear", "cosine"],
                   help="ddpm: linear (DiT), scaled_linear (U-ViT), cosine (default: "
                   "scaled_linear for unet_vit on latents, as U-ViT-H's code; linear otherwise)")
    p.add_argument("--no-learn-sigma", action="store_true", default=None, help="ddpm: predict eps only with fixed "
                   "variance (default for unet_vit on latents, as U-ViT-H's code; otherwise a learned sigma, as DiT)")
    p.add_argument("--learn-sigma", dest="no_learn_sigma", action="store_false", default=None, help="ddpm: learn sigma (see above)")
    p.add_argument("--timestep-offset", type=int, default=None, help="ddpm: added to t before the backbone (default: 1 "
                   "for unet_vit on latents, whose code feeds the 1-indexed step 1..1000; 0 otherwise)")
    p.add_argument("--min-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="ddpm: weight the MSE by min(SNR,5)/SNR (default: on for MDTv2 as in its paper, and on the "
                   "digits; off for DiT, U-ViT, DiffiT and MDT v1 on other data, as in their code)")
    # sit
    p.add_argument("--path-type", default="Linear", choices=["Linear", "GVP", "VP"], help="sit: the interpolant "
                   "(default: Linear)")
    p.add_argument("--prediction", default="velocity", choices=["velocity", "score", "noise"],
                   help="sit: what the model predicts (default: velocity)")
    p.add_argument("--loss-weight", default=None, choices=["none", "velocity", "likelihood"],
                   help="sit: the loss weighting (default: none)")
    p.add_argument("--train-eps", type=float, default=None, help="sit: training time interval margin (default: the official rule)")
    p.add_argument("--sample-eps", type=float, default=None, help="sit: sampling time interval margin (default: the official rule)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="sit: the backbone is fed time_scale * t (default: 999 for unet_vit, whose time token is the raw "
                        "sinusoidal table of t, which barely changes over [0, 1], as in U-ViT's own continuous-time model; "
                        "1 otherwise, as SiT)")


def add_sampling_args(p):
    p.add_argument("--sampler", default=None, help="ddpm: ddpm, ddim, dpm++; sit: ode-euler, ode-heun, ode-dopri5, "
                   "sde-euler, sde-heun (default: ddpm / sde-euler, the papers' samplers)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default: 250 official, 50 on digits)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale w, 1 = off (default: "
                   "4.0; 1 for a model without a null label; sample.py on official files: the paper's FID scale for a .npz)")
    p.add_argument("--cfg-channels", type=int, default=None, help="guide only the first K channels (3 = the official DiT/MDT quirk; default: all)")
    p.add_argument("--scale-pow", type=float, default=None, help="power-cosine guidance schedule exponent (MDT/DiffiT use 4; default: constant)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply guidance only for noise levels tau in [LO, HI] (tau=1 is pure noise; default: always)")


def get_parser():
    p = ArgumentParser(description="Train a Diffusion Transformer (any backbone x any objective).")
    add_model_args(p)
    p.add_argument("--data", default="digits", help="'digits' (embedded 8x8 digits, default), a folder of class "
                   "subfolders of images, or a latent folder made by extract_latents.py")
    p.add_argument("--image-size", type=int, default=None, help="image folders: resize the images to this size (default: 32)")
    p.add_argument("--results-dir", default="runs", help="parent folder of run directories (default: runs)")
    p.add_argument("--resume", default=None, help="checkpoint file or run directory to continue from (uses its last.pt)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default on the digits: 1200 DiT, 4000 U-ViT, 2000 MDT and DiffiT; "
                   "on other data the family's own: 400000, 500000 U-ViT)")
    p.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size over all processes (default: 128 digits; off the digits the family's recipe: 256, 1024 for unet_vit)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant after the warm-up (default: 1e-3 "
                   "digits, 3e-3 DiT there; on other data the family's own: 1e-4 DiT, 2e-4 U-ViT, 3e-4 MDT and DiffiT)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0; 0.03 U-ViT off the digits)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW betas (default: 0.9 0.999; 0.9 0.99 DiT on the digits; 0.99 0.99 U-ViT off the digits)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear lr warm-up over this many steps, 0 = none "
                   "(default: 0; 5000 U-ViT off the digits)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the global grad norm to this value, 0 = off "
                   "(default: 0; 1 for MDTv2 off the digits, as its optimizer)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default: 0.995 digits, 0.99 DiT there; 0.9999 official)")
    p.add_argument("--mask-ratio", type=float, default=0.3, help="masking backbones (mdt): mask ratio, 0 = no masked pass (default: 0.3)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 (TF32 matmuls on GPU) or bf16 autocast (default: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model; the first step compiles (default: off; --no-compile turns it off "
                   "when resuming a compiled run)")
    p.add_argument("--memory-budget", type=float, default=None, help="with --compile: the activation memory kept for "
                   "backward, in (0, 1]: near 0 recompute all it can, 1 keep what runs fastest (the default); torch's "
                   "activation_memory_budget: the compiler recomputes the cheapest ops first; same math")
    p.add_argument("--grad-accum", type=int, default=1, help="split each process's batch into this many micro-batches "
                   "and add up their gradients: the same update (to float rounding) with 1/K of the activation memory; "
                   "label dropout and MDT's masks are drawn per micro-batch, so their draws differ (default: 1)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory; dit and unet_vit)")
    p.add_argument("--seed", type=int, default=0, help="global seed (default: 0)")
    p.add_argument("--log-every", type=int, default=None, help="log every N steps (default: 100)")
    p.add_argument("--sample-every", type=int, default=None, help="write an EMA sample grid every N steps, 0 = never (default: 500 digits, 10000 otherwise)")
    p.add_argument("--ckpt-every", type=int, default=None, help="keep a periodic checkpoint every N steps, 0 = only last.pt at the end "
                   "(default: 1000 digits, 50000)")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip steps whose loss is NaN/inf (counted) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_sampling_args(p)
    return p


def given_flags(parser, argv):
    """The dests set on the command line, exactly (--flag=value and abbreviations included): argv parsed again
    with every default suppressed, so only what was given lands in the namespace."""
    for a in parser._actions:
        a.default, a.required = argparse.SUPPRESS, False
    return set(vars(parser.parse_args(argv)))


def resolve_args(args, preset):
    """Fill unset flags from the preset (and, off the digits, the family's own recipe); UserError on a bad combination."""
    mdt_v2 = args.model == "mdt" and not (args.size or "").startswith("MDT-")
    defaults = dict(PRESETS[preset])
    if preset == "official":
        defaults.update(OFFICIAL_RECIPES["mdt_v2" if mdt_v2 else args.model])
    else:
        defaults.update(DIGITS_RECIPES.get(args.model, {}))
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if hasattr(args, "min_snr") and args.min_snr is None:   # MDTv2 trains with min-SNR-5; DiT, U-ViT, DiffiT, MDT v1 do not
        args.min_snr = mdt_v2
    if args.sampler is None:
        args.sampler = DEFAULT_SAMPLER[args.objective]
    if args.sampler not in SAMPLERS[args.objective]:
        raise UserError(f"sampler {args.sampler!r} does not fit --objective {args.objective}; choose one of "
                        f"{', '.join(SAMPLERS[args.objective])}")
    if args.cfg_scale is None:                                 # no label dropout, no null label: no guidance
        args.cfg_scale = 4.0 if args.class_dropout > 0 else 1.0
    for name in ("steps", "batch_size", "log_every", "sample_steps", "grad_accum"):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("sample_every", "ckpt_every"):
        if getattr(args, name, 0) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if getattr(args, "sample_steps", None) is not None:   # what ddpm.py (T = 1000) and sit.py accept, checked before any grid
        if args.objective == "ddpm" and args.sample_steps > 1000:
            raise UserError(f"--sample-steps must be <= 1000 for ddpm's 1000 timesteps, got {args.sample_steps}")
        if args.sampler == "dpm++" and args.sample_steps > 999:   # its grid ends at round(999 / steps) >= 1
            raise UserError(f"--sample-steps must be <= 999 for dpm++, got {args.sample_steps}")
        if args.sampler in ("ddpm", "ddim", "ode-euler", "ode-heun", "sde-euler", "sde-heun") and args.sample_steps < 2:
            raise UserError(f"--sample-steps must be >= 2 for {args.sampler} (its time grid has that many points; "
                            f"a 1-step ddpm/ddim grid keeps only t = 0), got {args.sample_steps}")
    if hasattr(args, "lr") and args.lr is not None and not 0 < args.lr < math.inf:   # written so that NaN fails too
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if getattr(args, "seed", None) is not None and not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    for name in ("weight_decay", "warmup_steps", "grad_clip"):
        if getattr(args, name, None) is not None and not getattr(args, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if getattr(args, "betas", None) is not None and not all(0 <= b < 1 for b in args.betas):
        raise UserError(f"--betas must be in [0, 1), got {' '.join(map(str, args.betas))}")
    if hasattr(args, "ema") and args.ema is not None and not 0 <= args.ema < 1:
        raise UserError(f"--ema must be in [0, 1), got {args.ema}")
    if not 0 <= args.class_dropout < 1:
        raise UserError(f"--class-dropout must be in [0, 1), got {args.class_dropout}")
    gi = getattr(args, "guidance_interval", None)
    if gi is not None and not 0 <= gi[0] <= gi[1] <= 1:
        raise UserError(f"--guidance-interval LO HI needs 0 <= LO <= HI <= 1, got {gi[0]} {gi[1]}")
    if getattr(args, "cfg_channels", None) is not None and args.cfg_channels <= 0:
        raise UserError(f"--cfg-channels must be positive (leave it out to guide every channel), got {args.cfg_channels}")
    for name in ("cfg_scale", "scale_pow"):                  # a NaN would give NaN grids, not an error
        if getattr(args, name, None) is not None and not math.isfinite(getattr(args, name)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if getattr(args, "scale_pow", None) is not None and args.scale_pow < 0:   # tau^pow at tau = 0 divides by zero
        raise UserError(f"--scale-pow must be >= 0, got {args.scale_pow}")
    if args.cfg_scale != 1 and args.class_dropout == 0:
        raise UserError("guidance (--cfg-scale != 1) needs a model trained with label dropout; "
                        "set --cfg-scale 1 or --class-dropout > 0")
    if getattr(args, "memory_budget", None) is not None:
        if not 0 < args.memory_budget <= 1:
            raise UserError(f"--memory-budget must be in (0, 1], got {args.memory_budget}")
        if not args.compile:
            raise UserError("--memory-budget works through torch.compile: add --compile")
    if hasattr(args, "mask_ratio") and not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    return args


# ---------------------------------------------------------------------------------------------------
# Model and objective (shared with sample.py)
# ---------------------------------------------------------------------------------------------------

def registry(family):
    try:
        return getattr(importlib.import_module(family), FAMILIES[family]["registry"])
    except ImportError as e:
        raise UserError(f"backbone family {family!r} is not available ({e})")


def build_objective(cfg):
    """cfg: the 'objective' dict stored in checkpoints."""
    if cfg["name"] == "ddpm":
        import ddpm
        return ddpm.GaussianDiffusion(beta_schedule=cfg["beta_schedule"], learn_sigma=cfg["learn_sigma"],
                                      timestep_offset=cfg["timestep_offset"],
                                      mse_weight="min_snr_5" if cfg.get("min_snr") else None)
    import sit
    try:
        return sit.Transport(path_type=cfg["path_type"], prediction=cfg["prediction"], loss_weight=cfg["loss_weight"],
                             train_eps=cfg["train_eps"], sample_eps=cfg["sample_eps"],
                             time_scale=cfg.get("time_scale", 1.0), time_reverse=cfg.get("time_reverse", False))
    except ValueError as e:   # e.g. eps = 0 for a Linear/GVP score or noise model
        raise UserError(f"sit objective: {e}")


# ddpm's flags left unset: U-ViT's own discrete-time objective on latents (U-ViT-H, train_ldm_discrete.py: SD's
# scaled-linear betas, eps prediction, the backbone fed the 1-indexed step); DiT's everywhere else (on pixels U-ViT
# used a continuous VP SDE: --objective sit --path-type VP --prediction noise)
DDPM_DEFAULTS = dict(beta_schedule="linear", no_learn_sigma=False, timestep_offset=0)
UVIT_LATENT_DDPM = dict(beta_schedule="scaled_linear", no_learn_sigma=True, timestep_offset=1)


def ddpm_defaults(args, latents):
    """Fill the ddpm flags left unset (None) with the family's defaults for this kind of data."""
    for k, v in (UVIT_LATENT_DDPM if args.model == "unet_vit" and latents else DDPM_DEFAULTS).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def objective_config(args):
    if args.objective == "ddpm":
        return dict(name="ddpm", beta_schedule=args.beta_schedule, learn_sigma=not args.no_learn_sigma,
                    timestep_offset=args.timestep_offset, min_snr=bool(args.min_snr))
    weight = None if args.loss_weight in (None, "none", "None") else args.loss_weight   # "None": older checkpoints' args
    time_scale = args.time_scale if args.time_scale is not None else 999.0 if args.model == "unet_vit" else 1.0
    if not time_scale > 0:
        raise UserError(f"--time-scale must be positive, got {time_scale}")
    for name in ("train_eps", "sample_eps"):   # the time interval is [eps, 1 - eps]
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 0.5:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 0.5), got {getattr(args, name)}")
    return dict(name="sit", path_type=args.path_type, prediction=args.prediction, loss_weight=weight,
                train_eps=args.train_eps, sample_eps=args.sample_eps, time_scale=time_scale)


def build_model(model_cfg):
    """model_cfg: the 'model' dict stored in checkpoints (family, size and constructor kwargs)."""
    reg = registry(model_cfg["family"])
    if model_cfg["size"] not in reg:
        raise UserError(f"unknown --size {model_cfg['size']!r} for {model_cfg['family']}; choose one of {', '.join(reg)}")
    kwargs = {k: model_cfg[k] for k in ("input_size", "in_channels", "out_channels", "num_classes", "class_dropout_prob")}
    kwargs.update({k: model_cfg[k] for k in ("decode_layer",) if k in model_cfg})   # an official MDTv2 file's own
    try:
        return reg[model_cfg["size"]](**kwargs)
    except (ValueError, AssertionError) as e:
        raise UserError(f"cannot build {model_cfg['size']} for {kwargs['in_channels']}x{kwargs['input_size']}x"
                        f"{kwargs['input_size']} inputs: {e}")


def sample_images(objective, model, z, y, objective_name, args, progress=False):
    """Run the chosen sampler with the shared guidance flags; returns x (N, C, H, W)."""
    g = dict(cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels, scale_pow=args.scale_pow,
             guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None, progress=progress)
    if objective_name == "ddpm":
        return objective.sample(model, z, y, steps=args.sample_steps, sampler=args.sampler, **g)
    method, solver = args.sampler.split("-")
    return objective.sample(model, z, y, method=method, solver=solver, num_steps=args.sample_steps, **g)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: plain data, atomic writes, tolerant of DDP/compile prefixes
# ---------------------------------------------------------------------------------------------------

def clean_state_dict(sd):
    """Strip the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".").replace(".module.", ".")] = v
    return out


def write_atomic(path, write):
    """write(f) into a temporary file beside path, flush it to disk, then rename it over path (atomic on POSIX): a
    crash at any moment leaves either the old or the new file, never a truncated one. A write that fails (disk
    full, Ctrl-C) removes the temporary file; an OSError (or torch.save's RuntimeError) becomes a UserError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a short write as a RuntimeError
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot write {path} ({why}); the previous file, if any, is intact") from e
        raise


def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def require_folder(path, flag):
    """UserError unless `path` can be written (its folder exists and takes a file; it is not a folder itself):
    checked before the expensive work, by writing a file there (mode bits do not tell for root or read-only mounts)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file name")
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})")


def require_json_file(path, flag):
    """require_folder, and an existing file there must be JSON (a table we wrote before): a checkpoint or any
    other file given by mistake is refused, not overwritten."""
    require_folder(path, flag)
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                first = f.read(64).lstrip()[:1]
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot read the existing file ({e.strerror or e})")
        if first not in (b"{", b"["):
            raise UserError(f"{flag} {path} exists and is not a JSON file: not overwritten (give another name)")


def load_checkpoint(path):
    """torch.load with weights_only=True; UserError for missing, truncated or foreign files."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    # the official DiT train.py saves its argparse Namespace beside the weights (allowed from torch 2.5)
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe([argparse.Namespace]) if safe else nullcontext():
            try:   # memory-mapped: only what is used is read (sample.py reads the EMA weights, not the optimizer
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # state), and the
            except RuntimeError:                       # processes of a torchrun resume share the page cache
                ckpt = torch.load(path, map_location="cpu", weights_only=True)   # torch's pre-1.6 format, or
                                                                                 # a file system without mmap
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]   # torch's first sentence names the cause
        raise UserError(f"cannot read checkpoint {path} (truncated or not a PyTorch file?): {type(e).__name__}: {reason}")
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a state dict or a checkpoint of this library")
    return ckpt


# --resume: flags that shape the network or the objective (the checkpoint's config is what gets built)
OBJECTIVE_FLAGS = {"beta_schedule": "beta_schedule", "no_learn_sigma": "learn_sigma", "timestep_offset": "timestep_offset",
                   "min_snr": "min_snr", "path_type": "path_type", "prediction": "prediction", "loss_weight": "loss_weight",
                   "train_eps": "train_eps", "sample_eps": "sample_eps", "time_scale": "time_scale"}


# flags that only one objective reads: given with the other, they would do nothing
OBJECTIVE_ONLY = {"ddpm": ("beta_schedule", "no_learn_sigma", "timestep_offset", "min_snr"),
                  "sit": ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps", "time_scale")}


def ignored_flags(given, objective):
    """A warning for the flags on the command line that only the other objective reads, or None (a warning, not
    an error: quality.py passes one --train-args to runs of both objectives)."""
    other = next(name for name in OBJECTIVE_ONLY if name != objective)
    flags = ["--" + k.replace("_", "-") for k in OBJECTIVE_ONLY[other] if k in given]
    if flags:
        return f"warning: {' '.join(flags)} {'is a flag' if len(flags) == 1 else 'are flags'} of --objective {other}: ignored"


def check_same_network(args, given, cfg):
    """--resume: a flag given again that shapes the network or the objective must repeat the checkpoint's value;
    a different one would be ignored (the checkpoint's config is built) while the run logs and saves it."""
    m, o = cfg["model"], cfg["objective"]
    for k, v in dict(model=m["family"], size=m["size"], objective=o["name"], class_dropout=m["class_dropout_prob"]).items():
        if k in given and getattr(args, k) != v:
            raise UserError(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's {v}: a resumed "
                            "run keeps its network and objective (leave the flag out, or start a new run)")
    if given & set(OBJECTIVE_FLAGS):
        mine = objective_config(ddpm_defaults(args, cfg.get("data", {}).get("kind") == "latents"))
        for k in sorted(given & set(OBJECTIVE_FLAGS)):
            key = OBJECTIVE_FLAGS[k]
            theirs = o.get(key, {"min_snr": False, "time_scale": 1.0}.get(key))   # keys older checkpoints lack
            if key in mine and mine[key] != theirs:
                raise UserError(f"--{k.replace('_', '-')}: {key} {mine[key]} differs from the checkpoint's {theirs}: a "
                                "resumed run keeps its objective (leave the flag out, or start a new run)")


def load_weights(model, sd, what):
    """Strict load with a one-line explanation of the first mismatches."""
    sd = clean_state_dict(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{what} does not fit this model: {len(missing)} missing keys {missing[:2]}, "
                        f"{len(unexpected)} unexpected {unexpected[:2]}, shape mismatches {shapes[:2]}")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------------
# Data: everything in memory (digits, small image folders) or memory-mapped (latents)
# ---------------------------------------------------------------------------------------------------

def load_digits(split="train"):
    """The 1,797 real 8x8 digits (UCI optdigits test set, as shipped by scikit-learn), scaled to [-1, 1].
    A fixed 80/20 split: 'train' (1,437) and 'heldout' (360) for evaluation."""
    d = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz"))
    x = torch.from_numpy(d["images"]).float().div(8.0).sub(1.0)[:, None]   # 0..16 -> [-1, 1], (1797, 1, 8, 8)
    y = torch.from_numpy(d["labels"])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    idx = perm[:1437] if split == "train" else perm[1437:]
    return x[idx], y[idx]


def to_8bit(im):
    """16-bit images (PNG 'I;16', read as 'I;16' or 'I') scaled to 8 bits (65535 -> 255); PIL's convert("L"/"RGB")
    clips them at 255 instead, which turns nearly every pixel white."""
    if im.mode.startswith("I"):
        from PIL import Image
        return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8))
    return im


SD_VAE_SCALE = 0.18215   # SD-VAE latents x this = the official models' inputs (DiT, SiT, U-ViT, MDT, DiffiT)


def load_vae(name, device, purpose):
    """The SD VAE (diffusers AutoencoderKL, imported only here) for extract_latents.py and sample.py; a missing
    diffusers or a bad --vae is a one-line error, given before any long work starts."""
    try:
        from diffusers.models import AutoencoderKL
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "diffusers":      # diffusers is there; something it imports is not
            raise UserError(f"{purpose} needs diffusers, which fails to import: {e}")
        raise UserError(f"{purpose} needs diffusers: pip install diffusers")
    except Exception as e:   # installed but broken against this torch (diffusers >= 0.41 on torch 2.5: torch.accelerator)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{purpose} needs diffusers, which fails to import with torch {torch.__version__} "
                        f"({type(e).__name__}: {why}); install a release made for this torch (torch 2.5: "
                        "pip install 'diffusers<0.41')")
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise UserError(f"cannot load the VAE {name!r} (--vae): {str(e).strip().splitlines()[0][:200]}")


def warn_empty_classes(classes, used, root):
    """A class folder without images keeps its label (the class numbering stays that of the sorted folder names)
    but never trains: say so."""
    empty = [c for i, c in enumerate(classes) if i not in used]
    if empty and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {len(empty)} of the {len(classes)} class folders in {root} hold no images (their labels "
              f"are kept but never trained): {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}")


def load_image_folder(root, size, channels=None):
    """Class-subfolder images -> (N, C, size, size) in [-1, 1] (center crop + resize); unreadable files are
    skipped and counted; hidden folders (.ipynb_checkpoints) are not classes. Returns x, y, class names."""
    from PIL import Image
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise UserError(f"--data {root}: no class subfolders found (expected ROOT/CLASS/image.png)")
    files = [(ci, os.path.join(root, c, f)) for ci, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c)))]
    if len(files) > 20_000:
        print(f"note: decoding {len(files):,} images of {root} into memory for pixel-space training at {size} px; "
              "the papers train on SD-VAE latents: extract_latents.py, then --data on its folder")
    xs, ys, bad = [], [], 0
    for ci, path in files:
        try:
            with Image.open(path) as im:
                im = to_8bit(im).convert("L" if channels == 1 else "RGB")
                s = min(im.size)
                left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
                a = np.asarray(im, dtype=np.float32)
        except Exception:
            bad += 1
            continue
        xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        ys.append(ci)
    if not xs:
        raise UserError(f"--data {root}: no readable images ({bad} unreadable files)")
    if bad:
        print(f"warning: skipped {bad} unreadable files in {root}")
    warn_empty_classes(classes, set(ys), root)
    x = torch.from_numpy(np.stack(xs)) / 127.5 - 1.0
    return x, torch.tensor(ys), classes


def load_data(args):
    """-> dict(x, y, num_classes, input_size, in_channels, kind). x may be a memory-mapped array (latents)."""
    if args.image_size is not None and args.image_size <= 0:
        raise UserError(f"--image-size must be positive, got {args.image_size}")
    fixed_size = UserError("--image-size resizes an image folder; the digits are 8x8 and latents keep the size they "
                           "were extracted at (extract_latents.py --image-size)")
    if args.data == "digits":
        if args.image_size is not None:
            raise fixed_size
        x, y = load_digits("train")
        return dict(x=x, y=y, num_classes=10, kind="digits", shape=(1, 8))
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: " + ("a file, not a folder" if os.path.isfile(args.data) else "no such folder")
                        + " (use 'digits', an image folder or a latent folder)")
    meta_path = os.path.join(args.data, "meta.json")
    if os.path.isfile(meta_path):  # latents written by extract_latents.py
        if args.image_size is not None:
            raise fixed_size
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--data {args.data}: cannot read meta.json ({e}); re-run extract_latents.py")
        if not isinstance(meta, dict) or meta.get("format") != "moments-v1":
            raise UserError(f"--data {args.data}: unknown latent format "
                            f"{meta.get('format') if isinstance(meta, dict) else None!r} (re-run extract_latents.py)")
        bad = [k for k in ("num_images", "num_done", "num_classes", "latent_channels", "latent_size", "scale_factor")
               if not isinstance(meta.get(k), (int, float) if k == "scale_factor" else int) or isinstance(meta[k], bool)]
        if not bad:   # and in range: a damaged count or scale would train on the wrong rows or values
            bad = [k for k, ok in (("num_done", 0 <= meta["num_done"] <= meta["num_images"]),
                                   ("num_classes", meta["num_classes"] >= 1),
                                   ("latent_channels", meta["latent_channels"] >= 1),
                                   ("latent_size", meta["latent_size"] >= 1),
                                   ("scale_factor", 0 < meta["scale_factor"] < math.inf)) if not ok]
        classes = meta.get("classes")
        if not bad and classes is not None and (not isinstance(classes, list) or len(classes) != meta["num_classes"]):
            bad = ["classes"]
        if bad:
            raise UserError(f"--data {args.data}: meta.json lacks, mistypes or damages {', '.join(bad)} "
                            "(re-run extract_latents.py)")
        n, C, s = meta["num_done"], meta["latent_channels"], meta["latent_size"]
        if n == 0:
            raise UserError(f"--data {args.data}: the latent folder is empty (extraction not started?)")
        try:
            mom = np.load(os.path.join(args.data, "moments.npy"), mmap_mode="r")   # (N, 2 flips, 2C, h, w) fp16
            lab = np.load(os.path.join(args.data, "labels.npy"), mmap_mode="r")     # (N,) int, -1 = not decodable
        except (OSError, ValueError) as e:
            raise UserError(f"--data {args.data}: cannot read moments.npy / labels.npy ({e}); re-run extract_latents.py")
        if lab.dtype.kind not in "iu":
            raise UserError(f"--data {args.data}: labels.npy holds {lab.dtype} values, not integer class indices "
                            "(re-run extract_latents.py)")
        if mom.ndim != 5 or mom.shape[1:] != (2, 2 * C, s, s) or len(mom) < n or lab.ndim != 1 or len(lab) < n:
            raise UserError(f"--data {args.data}: moments.npy {mom.shape} and labels.npy {lab.shape} do not fit "
                            f"meta.json, which needs ({n}+, 2, {2 * C}, {s}, {s}) and ({n}+,); re-run extract_latents.py")
        if n < meta["num_images"] and int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: extraction unfinished, training on the first {n} of {meta['num_images']} images")
        mom = mom[:n]
        lab = np.array(lab[:n]).astype(np.int64)                         # int8/int32 labels too (embeddings need int64)
        rows = np.flatnonzero(lab >= 0)                                  # label -1: the image could not be decoded
        return dict(x=mom, rows=rows, y=torch.from_numpy(lab[rows]), num_classes=meta["num_classes"], kind="latents",
                    meta=meta, shape=(meta["latent_channels"], meta["latent_size"]), scale=meta["scale_factor"])
    x, y, classes = load_image_folder(args.data, args.image_size or 32)
    return dict(x=x, y=y, num_classes=len(classes), kind="images", classes=classes, shape=(x.shape[1], x.shape[-1]))


def get_batch(data, idx, flip, eps, device):
    """Rows idx of the data on the device. Image folders: flipped horizontally where flip is set (DiT's
    RandomHorizontalFlip; the digits are not flipped: a mirrored digit is another shape). Latents: pick the stored
    moments of the image or of its horizontal flip, then draw a fresh posterior sample z = scale * (mean + std *
    eps), as DiT does on the fly."""
    if data["kind"] == "digits":
        return to_device(data["x"][idx], device), to_device(data["y"][idx], device)
    if data["kind"] == "images":
        x = to_device(data["x"][idx], device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x), to_device(data["y"][idx], device)
    r = data["rows"][idx.numpy()]
    order = np.argsort(r)                                        # sorted reads are faster on a memmap
    rows = np.empty((len(idx),) + data["x"].shape[1:], dtype=data["x"].dtype)
    rows[order] = data["x"][r[order]]
    m = torch.from_numpy(rows)                                   # (n, 2, 2C, h, w) fp16
    m = to_device(m, device)
    m = torch.where(flip[:, None, None, None], m[:, 1], m[:, 0]).float()   # (n, 2C, h, w)
    C = m.shape[1] // 2
    return data["scale"] * (m[:, :C] + m[:, C:] * eps), to_device(data["y"][idx], device)


def to_device(t, device):
    """A host tensor on the device without waiting: a copy from pageable memory is a cudaMemcpyAsync followed by
    a stream synchronisation (the host would wait for the previous step's GPU work); from pinned memory it is not."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------
# Helpers for the loop
# ---------------------------------------------------------------------------------------------------

def adamw(params, device, **kw):
    """torch's AdamW, fused (one kernel for all parameters) on CUDA and, from torch 2.4, on CPU, where it is 3x
    faster than the per-tensor loop on the digits model (2.1 vs 6.9 ms a step); the same update up to rounding."""
    fused = device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")   # TorchVersion compares as versions
    return torch.optim.AdamW(params, fused=fused, **kw)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, one fused foreach op over all parameters; buffers copied."""
    ema_p = list(ema.parameters())
    cur_p = list(model.parameters())
    torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def require_mask_ratio(model, ratio):
    """--mask-ratio that could keep no token of a masking backbone: one line now, not a ValueError at some later step."""
    mdt = importlib.import_module("mdt")
    try:
        mdt.check_mask_ratio(model, ratio, 0.2 if isinstance(model, mdt.MDTv2) else 0.0)   # v2 adds up to 0.2
    except ValueError as e:
        raise UserError(f"--mask-ratio: {e}")


def require_compiler(device, hint):
    """--compile: a one-line UserError (ending in `hint`) where torch.compile cannot build kernels, a CPU run needing a
    C++ compiler and a GPU run triton. Otherwise the first loss.backward() fails deep inside the compiler (the
    backward compiles lazily), so the probe is a tiny function, forward and backward; cached after the first time."""
    def tiny(a):
        return (a * 2).sin().sum()
    try:
        with torch.enable_grad():
            a = torch.ones(3, device=device, requires_grad=True)
            torch.compile(tiny)(a).backward()
    except Exception as e:   # InvalidCxxCompiler, a missing triton, ...: the message names the cause (on its first
        # line, or, in torch 2.4, on the line after "backend='inductor' raised:")
        why = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().endswith("raised:")]
        why = why[0] if why else ""
        raise UserError(f"--compile: torch.compile cannot build kernels on this machine ({type(e).__name__}: {why}); "
                        f"{hint}") from None


def bf16_weights(model):
    """bf16 inference: store the Linear/Conv weights in bf16. Under bf16 autocast these layers cast their weights
    to bf16 on every call anyway (a compiled graph re-does that cast each call), so the outputs are bit-identical
    and the per-call cast (4 bytes read, 2 written per weight) is saved. Norms, embeddings and tables stay fp32.
    Only for models that are not trained afterwards, and only under autocast."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(torch.bfloat16)
    return model


def save_grid(x, path, nrow, fmt=None):
    """(N, C, H, W) in [-1, 1] -> a PNG grid (pixels upscaled x4 when images are tiny); path: a file name, or a
    file object with fmt ('PNG', 'JPEG')."""
    from PIL import Image
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    N, C, H, W = x.shape
    rows = math.ceil(N / nrow)
    grid = torch.zeros(C, rows * (H + 2) + 2, nrow * (W + 2) + 2, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = x[i]
    a = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(a[..., 0] if C == 1 else a[..., :3])
    if H <= 32:
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    img.save(path, format=fmt)


def init_distributed():
    """(ddp, rank, world, device). Under torchrun: NCCL on GPU (each process on its LOCAL rank's GPU, which is
    multi-node safe), gloo on CPU. Otherwise one process on cuda:0 or the CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return True, dist.get_rank(), dist.get_world_size(), device


def resume_source(path):
    """The run a --resume path belongs to: the run directory itself, or RUN for a file in RUN/checkpoints/;
    None for a file elsewhere. Never the run_dir saved inside the checkpoint (the run may have been copied)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return path
    ck = os.path.dirname(path)
    return os.path.dirname(ck) if os.path.basename(ck) == "checkpoints" else None


def run_is_ahead(run, step):
    """Whether `run` holds a checkpoint that continuing it from `step` would overwrite or leave stale: a periodic
    NNNNNNN.pt past `step`, or a last.pt at another step (or unreadable)."""
    folder = os.path.join(run, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if any(n.endswith(".pt") and n[:-3].isdigit() and int(n[:-3]) > step for n in names):
        return True
    if "last.pt" not in names:
        return False
    try:   # mmap: reads the step without loading the tensors
        return torch.load(os.path.join(folder, "last.pt"), map_location="cpu", weights_only=True, mmap=True)["step"] != step
    except Exception:
        return True


def next_run_dir(results_dir, name):
    """results/NNN-name, with NNN one more than any existing run: a new run never reuses a folder."""
    os.makedirs(results_dir, exist_ok=True)
    nums = [int(d.split("-")[0]) for d in os.listdir(results_dir) if d.split("-")[0].isdigit()]
    run = os.path.join(results_dir, f"{max(nums, default=-1) + 1:03d}-{name}")
    os.makedirs(run)
    return run


# ---------------------------------------------------------------------------------------------------
# The parts of main around the training math: resume, checks, the run folder, the random streams
# ---------------------------------------------------------------------------------------------------

def apply_resume_args(args, given, resume):
    """The resumed run's own settings replace the defaults, not the flags given again on this command line."""
    if not isinstance(resume.get("args"), dict) or not {"model", "ema", "opt", "step", "rng", "config"} <= set(resume):
        raise UserError(f"--resume {args.resume}: not a training checkpoint of this library "
                        "(official weights are sampled with sample.py --ckpt)")
    saved = resume["args"]
    if saved.get("model") not in FAMILIES or saved.get("objective") not in OBJECTIVES:   # a hand-edited file
        raise UserError(f"--resume {args.resume}: its args name model {saved.get('model')!r} and objective "
                        f"{saved.get('objective')!r}; this library has {', '.join(FAMILIES)} and {', '.join(OBJECTIVES)}")
    for k, v in saved.items():
        if k not in given and k != "resume":
            setattr(args, k, v)
    for k, v in (("betas", tuple(resume["opt"]["param_groups"][0].get("betas", (0.9, 0.999)))), ("warmup_steps", 0)):
        if k not in saved and k not in given:    # checkpoints written before these flags existed
            setattr(args, k, v)
    check_same_network(args, given, resume["config"])


def check_data_fits(args, model_cfg, data, resume):
    """The model (a resumed checkpoint's, or the one about to be built) takes this data: shape, classes, names."""
    C, H = data["shape"]
    if args.cfg_channels is not None and args.cfg_channels > C:
        raise UserError(f"--cfg-channels {args.cfg_channels} is more than the data's {C} channels")
    if (model_cfg["input_size"], model_cfg["in_channels"]) != (H, C):
        raise UserError(f"the checkpoint's model takes {model_cfg['in_channels']}x{model_cfg['input_size']}^2 "
                        f"inputs but --data gives {C}x{H}^2")
    if model_cfg["num_classes"] != data["num_classes"]:
        raise UserError(f"the checkpoint's model has {model_cfg['num_classes']} classes but --data {args.data} "
                        f"has {data['num_classes']}")
    if resume:   # same count, other names: the labels would mean other classes (latents keep theirs in meta)
        names = lambda d: d.get("classes") or (d.get("meta") or {}).get("classes")
        ours, theirs = names(data), names(resume["config"].get("data", {}))
        if ours and theirs and list(ours) != list(theirs):
            diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            if diff is None:   # one list is a prefix of the other
                raise UserError(f"--data {args.data} names {len(ours)} classes, the checkpoint {len(theirs)}")
            raise UserError(f"--data {args.data}: class {diff} is {ours[diff]!r}, the checkpoint's is {theirs[diff]!r}")


def restore_state(resume, model, ema, opt, data_gen, args, rank, world, device):
    """Weights, optimizer state and random streams of a checkpoint; returns (step, nonfinite)."""
    load_weights(model, resume["model"], "--resume model")
    load_weights(ema, resume["ema"], "--resume ema")
    opt.load_state_dict(resume["opt"])
    for s in opt.state.values():   # on CPU the optimizer kept the checkpoint's memory-mapped tensors: copy them (a
        for k, v in s.items():     # file rewritten in place under a running job would crash it)
            if torch.is_tensor(v) and v.device.type == "cpu":
                s[k] = v.clone()
    for g in opt.param_groups:
        g.update(lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    step, nonfinite = resume["step"], resume.get("nonfinite", 0)
    if resume["rng"]["data"].numel() == data_gen.get_state().numel():
        data_gen.set_state(resume["rng"]["data"])
        states = resume["rng"]["torch"]
        if len(states) == world and device.type == "cuda":   # same layout: each rank continues its own stream
            torch.cuda.set_rng_state(states[rank], device)
        elif len(states) == world:
            torch.set_rng_state(states[rank])
        else:   # another number of processes: no rank can continue a stream of the run (the shared one goes on)
            torch.manual_seed((args.seed * world + rank) * 1_000_003 + step)  # new ones, not the first ones again
            if rank == 0:
                print(f"warning: the checkpoint was written by {len(states)} process(es), this run has {world}: label "
                      "dropout and masks draw new random streams (the data order, times and noise continue exactly)")
        cpu_states = resume["rng"].get("cpu")                # a GPU run's CPU stream (MDTv2's mask ratio)
        if cpu_states is not None and len(cpu_states) == world:
            torch.set_rng_state(cpu_states[rank])
    else:   # trained on another device type: a CUDA generator's state (16 bytes) does not fit a CPU one (5056)
        data_gen.manual_seed(args.seed * 1_000_003 + step)           # new streams, not the run's first ones again
        torch.manual_seed((args.seed * world + rank) * 1_000_003 + step)
        if rank == 0:
            print(f"warning: the checkpoint was trained on another device type than {device.type}, whose random "
                  "streams cannot continue here: this run draws new ones (not bit-exact from here on)")
    return step, nonfinite


def on_rank0(ddp, rank, fn, *args):
    """fn(*args) on rank 0 alone (what writes files); every rank gets its result, or raises its UserError, so
    that no rank trains on (or waits) alone after rank 0 stopped. The others wait for it here."""
    out = [None, None]
    if rank == 0:
        try:
            out[0] = fn(*args)
        except UserError as e:
            out[1] = str(e)
    if ddp:
        dist.broadcast_object_list(out, src=0)
    if out[1] is not None:
        raise UserError(out[1])
    return out[0]


def append_line(path, line):
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); the checkpoints written so far are intact")


def save_checkpoint(state, run_dir, keep_step=None):
    """last.pt, and with keep_step the kept NNNNNNN.pt too (a file of its own: a hard link would share a later
    in-place edit of last.pt)."""
    save_atomic(state, os.path.join(run_dir, "checkpoints", "last.pt"))
    if keep_step is not None:
        save_atomic(state, os.path.join(run_dir, "checkpoints", f"{keep_step:07d}.pt"))


def gather_rngs(data_gen, ddp, world, device):
    """The random streams a checkpoint keeps: the shared data generator and every rank's model-side stream."""
    rng = dict(data=data_gen.get_state(), torch=gather_rng(ddp, world, device))
    if device.type == "cuda":      # the CPU generator is a stream too: MDTv2 draws its mask ratio on it
        rng["cpu"] = gather_rng(ddp, world, device, torch.get_rng_state())
    return rng


def open_run_dir(args, resume, step, size):
    """(run_dir, note), on rank 0. A resumed run continues in the run the --resume path names, unless that run
    holds checkpoints past the resumed step (or the file is not in a RUN/checkpoints/ folder): then in a new run
    folder, so no checkpoint is overwritten."""
    run_dir, note = None, ""
    src = resume_source(args.resume) if resume else None
    parent = os.path.dirname(src) if src else args.results_dir
    try:
        if src and not run_is_ahead(src, step):
            run_dir = src
        else:
            run_dir = next_run_dir(parent, f"{args.model}-{size.replace('/', '_')}-{args.objective}")
            if resume:
                note = (f" of {src}, in a new run folder ({src} has checkpoints past step {step})" if src else
                        f" from {args.resume}, in a new run folder (the file is not in a RUN/checkpoints/ folder)")
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        for f in os.listdir(os.path.join(run_dir, "checkpoints")):   # left by a run killed while saving
            if re.fullmatch(r".+\.pt\.tmp\d+", f):
                os.remove(os.path.join(run_dir, "checkpoints", f))
        write_json(os.path.join(run_dir, "args.json"), vars(args))
    except OSError as e:
        raise UserError(f"cannot write a run folder in {run_dir or parent}: {e.strerror or e}")
    return run_dir, note


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_parser().parse_args(argv)
    given = given_flags(get_parser(), argv)
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        apply_resume_args(args, given, resume)
    data_preset = "digits" if args.data == "digits" else "official"
    args = resolve_args(args, data_preset)
    if resume and args.steps <= resume["step"]:
        raise UserError(f"--steps {args.steps}: the checkpoint is already at step {resume['step']}, nothing to train "
                        "(give a larger --steps)")

    # --- setup: device, DDP, seeds, precision -----------------------------------------------------
    ddp, rank, world, device = init_distributed()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the number of processes {world}")
    local_bs = args.batch_size // world
    if local_bs % args.grad_accum:
        raise UserError(f"--grad-accum {args.grad_accum} must divide the batch of each process ({local_bs})")
    micro_bs = local_bs // args.grad_accum
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)    # the initial weights: the same for any number of processes
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    # --- data ---------------------------------------------------------------------------------------
    data = load_data(args)
    N = len(data["y"])
    if N < args.batch_size:
        raise UserError(f"the data has {N} examples, fewer than --batch-size {args.batch_size}")
    C, H = data["shape"]
    if int(data["y"].min()) < 0 or int(data["y"].max()) >= data["num_classes"]:
        raise UserError(f"labels must be in [0, {data['num_classes']})")

    # --- model, EMA, objective, optimizer -------------------------------------------------------------
    ddpm_defaults(args, data["kind"] == "latents")   # before objective_config; on resume for the args it saves
    obj_cfg = resume["config"]["objective"] if resume else objective_config(args)
    objective = build_objective(obj_cfg)
    size = args.size or FAMILIES[args.model]["latents" if data["kind"] == "latents" else "small"]
    model_cfg = resume["config"]["model"] if resume else dict(
        family=args.model, size=size, input_size=H, in_channels=C, out_channels=objective.out_channels(C),
        num_classes=data["num_classes"], class_dropout_prob=args.class_dropout)
    check_data_fits(args, model_cfg, data, resume)
    size = model_cfg["size"]
    model = build_model(model_cfg)
    if rank > 0:                    # then one stream per process for what happens inside the model (label dropout,
        torch.manual_seed(args.seed * world + rank)   # MDT's masks); rank 0 goes on with the one that built it
    if args.grad_checkpointing and hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = True
    elif args.grad_checkpointing and rank == 0:
        print(f"warning: --grad-checkpointing is implemented for dit and unet_vit, not {args.model}: ignored")
    warning = ignored_flags(given, args.objective)
    if warning and rank == 0:
        print(warning)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    model.to(device).train()
    ema.to(device)
    opt = adamw([p for p in model.parameters() if p.requires_grad], device, lr=args.lr, betas=tuple(args.betas),
                weight_decay=args.weight_decay)
    step, nonfinite = 0, 0
    data_gen = torch.Generator(device).manual_seed(args.seed)  # shared by all ranks: t, noise, flips
    if resume:
        step, nonfinite = restore_state(resume, model, ema, opt, data_gen, args, rank, world, device)
        resume = {k: v for k, v in resume.items() if k not in ("model", "ema", "opt")}   # not held while training
    masked = getattr(model, "trains_with_mask", False) and args.mask_ratio > 0
    if masked:
        require_mask_ratio(model, args.mask_ratio)
    # a masking backbone run without its masked pass leaves the side block unused: DDP must be told
    unused = getattr(model, "trains_with_mask", False) and not masked
    # broadcast_buffers=False: the only buffers are constant index tables (MDT's and DiffiT's relative positions),
    # equal on every rank. Broadcasting them copies in place before every forward, which bumped the version of the
    # index MDT's full pass saved for backward when its masked pass ran (torch 2.11: "modified by an inplace operation")
    # (the flag is named forward_sync_buffers from torch 2.13 on)
    buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers": False}
    train_model = ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=unused, **buffer_sync) if ddp else model
    if args.compile:
        require_compiler(device, "run with --no-compile")
        if args.memory_budget is not None:   # the compiler's min-cut partitioner picks what to recompute
            import torch._functorch.config as functorch_config
            functorch_config.activation_memory_budget = args.memory_budget
        train_model = torch.compile(train_model)

    # --- run directory (rank 0 writes every file) --------------------------------------------------------
    run_dir, note = on_rank0(ddp, rank, open_run_dir, args, resume, step, size)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"run {run_dir}: {size} ({n_params:,} parameters) + {args.objective} on {args.data} "
              f"({N} examples, {C}x{H}x{H}), {world} process(es) on {device.type}, {args.precision}"
              + (", compiled" if args.compile else "")
              + (f", resumed at step {step}{note}" if resume else ""))
        if masked:
            print(f"masked pass on: mask ratio {args.mask_ratio} (logged as loss_masked)")

    # --- the loop ---------------------------------------------------------------------------------------
    from tqdm.auto import tqdm
    steps_per_epoch = N // args.batch_size
    fixed_z = torch.randn(40 if data["kind"] == "digits" else 16, C, H, H, generator=torch.Generator().manual_seed(0))
    fixed_y = (torch.arange(len(fixed_z)) % data["num_classes"]).to(device)
    fixed_z = fixed_z.to(device)
    log_sum = torch.zeros(2, device=device)       # running loss sums, read only at log time (no per-step sync)
    first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, checked at log/ckpt time
    log_n, t_log, perm_epoch = 0, time.time(), None
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    while step < args.steps:
        # The global batch is a function of the step (epoch permutation) and of one generator that every rank
        # shares (t, noise, flips), so each rank's slice is what one process would see: resume and DDP agree.
        epoch, b = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:   # one permutation per epoch (of 1.28M ImageNet indices: ~20 ms of host time on our CPU)
            perm_epoch, perm = epoch, epoch_order(N, args.seed, epoch)
        mine = slice(rank * local_bs, (rank + 1) * local_bs)             # this rank's part of the global batch
        idx = perm[b * args.batch_size:(b + 1) * args.batch_size][mine]
        t = draw_time(objective, args.batch_size, data_gen, device)[mine]
        noise = torch.randn((args.batch_size, C, H, H), generator=data_gen, device=device)[mine]
        flip = (torch.rand(args.batch_size, generator=data_gen, device=device) < 0.5)[mine]
        if data["kind"] == "latents":   # the latent sample z = mean + std * eps of the stored moments
            eps = torch.randn((args.batch_size, C, H, H), generator=data_gen, device=device)[mine]
        else:
            eps = None
        if masked:
            noise_m = torch.randn((args.batch_size, C, H, H), generator=data_gen, device=device)[mine]
        x, y = get_batch(data, idx, flip, eps, device)
        opt.zero_grad(set_to_none=True)   # free last step's grads before the forward (lower peak memory)
        if args.warmup_steps:   # U-ViT's linear warm-up: lr * min(s / warmup, 1) for the update after s updates
            for g in opt.param_groups:
                g["lr"] = args.lr * min(step / args.warmup_steps, 1.0)
        loss, step_terms = 0.0, 0.0
        for j in range(args.grad_accum):   # micro-batches (one by default) whose gradients add up to the batch's
            part = slice(j * micro_bs, (j + 1) * micro_bs)
            last = j == args.grad_accum - 1
            with nullcontext() if last or not ddp else ddp_model.no_sync():   # DDP averages over ranks once
                with amp:
                    terms = objective.loss(train_model, x[part], y[part], t=t[part], noise=noise[part])
                    part_loss = terms["loss"].mean()
                    if masked:   # MDT Sec. 4.4: the same loss on the masked input (same x, t; fresh noise), 1:1
                        terms_m = objective.loss(train_model, x[part], y[part], t=t[part], noise=noise_m[part],
                                                 model_kwargs=dict(mask_ratio=args.mask_ratio))
                        part_loss = part_loss + terms_m["loss"].mean()
                (part_loss / args.grad_accum).backward()
            loss = loss + part_loss.detach() / args.grad_accum
            logged = [terms["loss"].detach().mean().float(),
                      terms_m["loss"].detach().mean().float() if masked else log_sum.new_zeros(())]
            step_terms = step_terms + torch.stack(logged) / args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        skip = False
        if args.skip_nonfinite:       # one sync per step. Every rank skips when any rank's loss is non-finite: the
            bad = (~torch.isfinite(loss)).int()                 # gradients DDP averaged are non-finite on all of them
            if ddp:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            skip = bool(bad)
        if skip:
            nonfinite += 1
        else:
            opt.step()
            update_ema(ema, model, args.ema)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
            log_sum += step_terms
            log_n += 1
        step += 1
        bar.update(1)

        periodic = args.ckpt_every > 0 and step % args.ckpt_every == 0
        is_ckpt = periodic or step == args.steps
        if step % args.log_every == 0 or is_ckpt:
            if ddp:
                dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
            if first_bad.item() >= 0:
                raise UserError(f"the loss became non-finite at step {first_bad.item()}; nothing was saved after it, "
                                f"the last checkpoint in {run_dir or 'the run directory'} is intact (try --precision fp32, "
                                f"--grad-clip 1, a lower --lr, or --skip-nonfinite"
                                + ("; or --data holds non-finite values)" if data["kind"] != "digits" else ")"))
        if step % args.log_every == 0 or step == args.steps:
            if ddp:
                dist.all_reduce(log_sum)
                log_sum /= world
            dt = time.time() - t_log
            vals = (log_sum / max(log_n, 1)).tolist()
            msg = (f"step {step:7d}  loss {vals[0]:.4f}" + (f"  loss_masked {vals[1]:.4f}" if masked else "")
                   + f"  {log_n / dt:.2f} steps/s  {log_n * args.batch_size / dt:.1f} img/s" if log_n else
                   f"step {step:7d}  no update since the last log line: every step was skipped")
            msg += f"  nonfinite {nonfinite}" if nonfinite else ""
            if rank == 0:
                bar.write(msg)
            on_rank0(ddp, rank, append_line, os.path.join(run_dir, "log.txt"), msg)
            log_sum.zero_()
            log_n, t_log = 0, time.time()

        if is_ckpt:
            state = dict(model=clean_state_dict(model.state_dict()), ema=clean_state_dict(ema.state_dict()),
                         opt=opt.state_dict(), step=step, nonfinite=nonfinite, args=vars(args), run_dir=run_dir,
                         config=dict(model=model_cfg, objective=obj_cfg,
                                     data=dict(kind=data["kind"], classes=data.get("classes"), meta=data.get("meta"))),
                         rng=gather_rngs(data_gen, ddp, world, device))
            on_rank0(ddp, rank, save_checkpoint, state, run_dir, step if periodic else None)   # the others wait

        if args.sample_every and (step % args.sample_every == 0 or step == args.steps) and rank == 0:
            # after the checkpoint: a grid is a by-product, and a grid that fails (a sampler blowing up, no memory
            # left) or is cut short costs no checkpoint. In a forked RNG: its noise is not drawn from the stream that
            # label dropout reads, so --sample-every does not change the training
            try:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), amp:
                    xs = sample_images(objective, ema, fixed_z, fixed_y, args.objective, args)
                save_grid(xs, os.path.join(run_dir, "samples", f"{step:07d}.png"), nrow=10 if data["kind"] == "digits" else 4)
            except Exception as e:
                bar.write(f"warning: the sample grid of step {step} failed, training goes on "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})")
    bar.close()
    if rank == 0:
        print(f"done: {step} steps; checkpoints in {os.path.join(run_dir, 'checkpoints')}; "
              f"samples in {os.path.join(run_dir, 'samples')}")
    if ddp:
        dist.destroy_process_group()
    return run_dir


def epoch_order(n, seed, epoch):
    """The data order of one epoch, a function of (seed, epoch) alone: resume and every DDP rank agree on it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def draw_time(objective, n, gen, device):
    """Training times from the shared generator (so every rank agrees and resume replays them)."""
    if hasattr(objective, "num_timesteps"):
        return torch.randint(0, objective.num_timesteps, (n,), generator=gen, device=device)
    t0, t1 = objective.interval(objective.train_eps)
    return torch.rand(n, generator=gen, device=device) * (t1 - t0) + t0


def gather_rng(ddp, world, device, state=None):
    """Every rank's RNG state of its model-side randomness (label dropout, masks): the CPU generator, or the
    CUDA one on GPU (or `state`, e.g. a GPU run's CPU generator). Returned as a list indexed by rank."""
    if state is None:
        state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    if not ddp:
        return [state]
    out = [torch.zeros_like(state).to(device) for _ in range(world)]
    dist.all_gather(out, state.to(device))
    return [o.cpu() for o in out]


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the checkpoints written so far are intact", file=sys.stderr)
        sys.exit(130)
