"""
Sample from a trained model: a PNG grid, or an FID-ready .npz (ADM evaluator layout).

    python sample.py --ckpt runs/000-dit-DiT-Tiny_2-ddpm/checkpoints/last.pt          # grid.png, 4 per class
    python sample.py --ckpt RUN/checkpoints/last.pt --num-samples 1000 --out s.npz      # arr_0 uint8 NxHxWxC + labels
    python sample.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 4 --class-labels 207 360 387 974   # official weights

Our checkpoints carry their model and objective settings. The official files (DiT, SiT, U-ViT, MDT v1/v2,
DiffiT) are plain state dicts: the family, size and input size are read off the keys and shapes (OFFICIAL below),
with each paper's objective and sampling settings; for DiT-layout files --objective picks ddpm or sit (default: sit
if the file name says SiT, else ddpm). Latent samples are decoded with the SD VAE (needs `pip install diffusers`).
"""
import math
import os
import sys

import numpy as np
import torch

import train
from train import UserError


def to_uint8_nhwc(x):
    """ADM/DiT's conversion of images in [-1, 1] to the .npz: clamp(127.5 x + 128, 0, 255), truncated to uint8; NHWC."""
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def get_parser():
    p = train.ArgumentParser(description="Sample images from a trained Diffusion Transformer.")
    p.add_argument("--ckpt", required=True, help="a checkpoint of train.py (or a run directory), or an official state dict")
    p.add_argument("--out", default=None, help="output file: .png grid or .npz (default: grid.png in the current folder)")
    p.add_argument("--num-samples", type=int, default=None, help="number of samples (default: 4 per class up to 40, "
                   "40 for an unconditional model)")
    p.add_argument("--class-labels", type=int, nargs="+", default=None, help="labels to sample (repeated to --num-samples)")
    p.add_argument("--balanced", action="store_true", help="class-balanced labels for .npz (default: uniform random, as ADM/DiT)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and labels (default: 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 autocast (default: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: the sampler calls it with one shape "
                   "per batch, so it pays for its compile time on large sample sets (same math)")
    p.add_argument("--vae", default=None, help="VAE to decode latents, diffusers id or local path (default: the one "
                   "the training latents were made with, else stabilityai/sd-vae-ft-ema)")
    p.add_argument("--size", default=None, help="official files only: registry name (default: read off the shapes)")
    p.add_argument("--objective", default=None, choices=["ddpm", "sit"],
                   help="official files only: ddpm or sit (default: from the file name)")
    train.add_sampling_args(p)
    return p


# Each paper's sampler for its released checkpoints; cfg_scale is (FID setting for .npz, visual setting for grids).
DDPM_LINEAR = dict(name="ddpm", beta_schedule="linear", learn_sigma=True, timestep_offset=0, min_snr=False)
OFFICIAL = {
    # DiT Tab. 2 / sample.py: 250 DDPM steps, 3-channel guidance 1.5 (FID) / 4.0 (visuals)
    "DiT": (DDPM_LINEAR, dict(sampler="ddpm", sample_steps=250, cfg_scale=(1.5, 4.0), cfg_channels=3)),
    # the official SiT sample_ddp.py SDE defaults: Euler-Maruyama 250 steps, sigma diffusion, last step Mean;
    # guidance 1.5 (paper Tab. 7: FID 2.06 with the SDE sampler)
    "SiT": (dict(name="sit", path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None,
                 sample_eps=None), dict(sampler="sde-euler", sample_steps=250, cfg_scale=(1.5, 4.0), cfg_channels=3)),
    # U-ViT-H: discrete SD scaled-linear schedule, eps model, 1-indexed steps; DPM-Solver 50 steps, all-channel
    # guidance 0.4 in their convention = 1.4 here (FID 2.29)
    "U-ViT-discrete": (dict(name="ddpm", beta_schedule="scaled_linear", learn_sigma=False, timestep_offset=1,
                            min_snr=False), dict(sampler="dpm++", sample_steps=50, cfg_scale=(1.4, 4.0))),
    # U-ViT-L and the pixel models: continuous VP SDE (= sit.py's VP path), noise model fed 999 * (1 - t);
    # DPM-Solver 50 NFE in the paper, here an ODE solver on the same probability flow; guidance 1.4 (FID 3.40).
    # ImageNet-512 (L/4, H/4): guidance 0.7 in their convention = 1.7 here; ImageNet-64: no guidance (no null label)
    "U-ViT-continuous": (dict(name="sit", path_type="VP", prediction="noise", loss_weight=None, train_eps=None,
                              sample_eps=1e-4, time_scale=999.0, time_reverse=True),
                         dict(sampler="ode-heun", sample_steps=26, cfg_scale=(1.4, 4.0))),
    # MDTv2 image_sample.py: 250 DDPM steps, 3-channel power-cosine guidance 3.8, scale_pow 4 (FID 1.58)
    "MDT": (DDPM_LINEAR, dict(sampler="ddpm", sample_steps=250, cfg_scale=(3.8, 4.0), cfg_channels=3, scale_pow=4.0)),
    # DiffiT slurm_sample_256.sh: 250 DDPM steps, 3-channel power-cosine 4.4, pow 4 (the paper names 4.6 for its
    # FID 1.73); 512: constant 1.49 (FID 2.67)
    "DiffiT-256": (DDPM_LINEAR, dict(sampler="ddpm", sample_steps=250, cfg_scale=(4.4, 4.4), cfg_channels=3, scale_pow=4.0)),
    "DiffiT-512": (DDPM_LINEAR, dict(sampler="ddpm", sample_steps=250, cfg_scale=(1.49, 4.0), cfg_channels=3)),
}
GUIDANCE = ("cfg_scale", "cfg_channels", "scale_pow")   # the settings above that need a null label


def apply_paper_settings(args, settings, argv, npz):
    """Fill the sampling flags the user did not give with the paper's settings; say what was used."""
    given = train.given_flags(get_parser(), argv)   # exact: --cfg-scale=2 and abbreviations too
    used = {}
    for k, v in settings.items():
        if k not in given:
            setattr(args, k, v[0 if npz else 1] if isinstance(v, tuple) else v)
            used[k] = getattr(args, k)
    if used:
        print("paper sampling settings: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in used.items()))


def dit_style_io(sd, p):
    """(in channels, token grid side, out channels, classes) of a DiT-style state dict (DiT/SiT, MDT, DiffiT)."""
    return (sd["x_embedder.proj.weight"].shape[1], math.isqrt(sd["pos_embed"].shape[1]),
            sd["final_layer.linear.weight"].shape[0] // (p * p), sd["y_embedder.embedding_table.weight"].shape[0] - 1)


def n_blocks(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def size_name(family_prefix, D, depth, p, names, given=None):
    if given:                                                  # --size: the user names it (checked when built)
        return given
    if (D, depth) not in names:
        raise UserError(f"a {family_prefix} state dict with width {D} and depth {depth} matches no registered config")
    return f"{family_prefix}-{names[(D, depth)]}/{p}"


def recognise_official(sd, args, path, run_args=None):
    """(model_cfg, objective_cfg, paper sampling settings) for the released files of DiT, SiT, U-ViT, MDT (v1
    and v2) and DiffiT, read off the key names and shapes; UserError for anything else. run_args: the argparse
    Namespace an official train.py saved beside the weights (SiT's names its interpolant: path_type, ...)."""
    sd = train.clean_state_dict(sd)
    base = os.path.basename(path).lower()
    extra = {}
    sit_run = getattr(run_args, "path_type", None) is not None      # a checkpoint of SiT's train.py
    if "en_inblocks.0.attn.qkv.weight" in sd:                                  # MDTv2
        family, key = "mdt", "MDT"
        D, p = sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
        depth = 2 * n_blocks(sd, "en_inblocks.") + n_blocks(sd, "de_blocks.")
        size = size_name("MDTv2", D, depth, p, {(1152, 28): "XL", (1024, 24): "L", (768, 12): "B", (384, 12): "S"},
                         args.size)
        in_ch, grid, out_ch, n_cls = dit_style_io(sd, p)
        extra = dict(decode_layer=n_blocks(sd, "de_blocks."))   # the file's own, e.g. S/2 from MDTv2_S_2(): 4, not 6
    elif "sideblocks.0.attn.qkv.weight" in sd and "blocks.0.attn.qkv.weight" in sd:   # MDT v1 (one plain stack)
        family, key = "mdt", "MDT"         # MDT's FID script settings (cfg 3.8 was tuned on v1, sail-sg/MDT#47)
        D, p = sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
        size = size_name("MDT", D, n_blocks(sd, "blocks."), p, {(1152, 28): "XL"}, args.size)
        in_ch, grid, out_ch, n_cls = dit_style_io(sd, p)
    elif "blocks.0.attn.qkv_temb.weight" in sd:                                # latent DiffiT
        family = "diffit"
        D, p = sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
        size = size_name("DiffiT", D, n_blocks(sd, "blocks."), p, {(1152, 28): "XL"}, args.size)
        in_ch, grid, out_ch, n_cls = dit_style_io(sd, p)
        key = "DiffiT-256" if grid * p <= 32 else "DiffiT-512"
    elif "patch_embed.proj.weight" in sd and "mid_block.attn.qkv.weight" in sd:   # U-ViT
        family = "unet_vit"
        D, p = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
        depth = 2 * n_blocks(sd, "in_blocks.")
        size = size_name("U-ViT", D, depth, p, {(1152, 28): "H", (1024, 20): "L", (768, 16): "M", (512, 12): "S"},
                         args.size)
        in_ch = out_ch = sd["patch_embed.proj.weight"].shape[1]
        n_cls = sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else 0
        grid = math.isqrt(sd["pos_embed"].shape[1] - (2 if n_cls else 1))
        key = "U-ViT-discrete" if size.startswith("U-ViT-H") else "U-ViT-continuous"
    elif "y_embedder.embedding_table.weight" in sd and "blocks.0.attn.qkv.weight" in sd:   # DiT / SiT
        family = "dit"
        D, p = sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
        size = size_name("DiT", D, n_blocks(sd, "blocks."), p,
                         {(1152, 28): "XL", (1024, 24): "L", (768, 12): "B", (384, 12): "S"}, args.size)
        in_ch, grid, out_ch, n_cls = dit_style_io(sd, p)
        if sit_run and args.objective == "ddpm":
            raise UserError(f"{path} is a checkpoint of SiT's train.py ({run_args.path_type} path): it samples with "
                            "--objective sit")
        key = "SiT" if (args.objective == "sit" or sit_run or (args.objective is None and "sit" in base)) else "DiT"
    else:
        raise UserError(f"{path}: not a checkpoint of this library and not an official DiT/SiT/U-ViT/MDTv2/DiffiT "
                        "state dict")
    obj, settings = OFFICIAL[key]
    if key == "SiT" and sit_run:                                    # the interpolant it was trained with
        obj = dict(obj, **{k: getattr(run_args, k, obj[k]) for k in ("path_type", "prediction", "loss_weight",
                                                                     "train_eps", "sample_eps")})
    if family == "unet_vit" and in_ch == 4 and grid * p == 64:     # ImageNet-512 configs: scale 0.7 (theirs) = 1.7
        settings = dict(settings, cfg_scale=(1.7, 4.0))
    if args.objective and args.objective != obj["name"] and family != "dit":
        raise UserError(f"{path} is a {key} checkpoint; it samples with --objective {obj['name']}")
    model_cfg = dict(family=family, size=size, input_size=grid * p, in_channels=in_ch, out_channels=out_ch,
                     num_classes=n_cls, class_dropout_prob=0.1 if n_cls else 0.0, official=True, **extra)
    if family == "unet_vit" and n_cls and in_ch == 3:    # ImageNet-64 pixels (M/4, L/4): 1000 classes, no null row
        model_cfg["class_dropout_prob"] = 0.0
        model_cfg["num_classes"] = n_cls + 1
    obj = dict(obj, learn_sigma=out_ch == 2 * in_ch) if obj["name"] == "ddpm" else obj
    print(f"{os.path.basename(path)}: official {key} weights read as {model_cfg['size']} at {grid * p}x{grid * p}x{in_ch}, "
          f"{out_ch} outputs, {model_cfg['num_classes']} classes; objective {obj['name']}")
    return model_cfg, obj, settings


# what a checkpoint of train.py holds, checked before use: a damaged or foreign file with a 'config' key is one line
OUR_KEYS = dict(model=("family", "size", "input_size", "in_channels", "out_channels", "num_classes", "class_dropout_prob"),
                ddpm=("beta_schedule", "learn_sigma", "timestep_offset"),
                sit=("path_type", "prediction", "loss_weight", "train_eps", "sample_eps"))


def check_ours(ckpt, path):
    cfg = ckpt.get("config")
    parts = [cfg.get(k) if isinstance(cfg, dict) else None for k in ("model", "objective", "data")]
    missing = [k for k, part in zip(("config.model", "config.objective", "config.data"), parts) if not isinstance(part, dict)]
    if not missing:
        model, obj, data = parts
        missing = [f"config.model.{k}" for k in OUR_KEYS["model"] if k not in model]
        missing += [] if obj.get("name") in ("ddpm", "sit") else ["config.objective.name (ddpm or sit)"]
        missing += [f"config.objective.{k}" for k in OUR_KEYS.get(obj.get("name"), ()) if k not in obj]
        missing += [] if data.get("kind") in ("digits", "images", "latents") else ["config.data.kind"]
        missing += [k for k in ("model", "ema") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint of this library (no {', '.join(missing[:3])})")


def read_checkpoint(args):
    """-> (weights, model config, objective config, data kind); the model is built once the flags are checked."""
    ckpt = train.load_checkpoint(args.ckpt)
    if "config" in ckpt:                                    # ours
        check_ours(ckpt, args.ckpt)
        model_cfg, obj_cfg = ckpt["config"]["model"], ckpt["config"]["objective"]
        weights = ckpt["model"] if args.no_ema else ckpt["ema"]
        kind = ckpt["config"]["data"]["kind"]
        meta = ckpt["config"]["data"].get("meta") or {}
        if args.vae is None and meta.get("vae"):
            args.vae = meta["vae"]
        args.latent_scale = meta.get("scale_factor", train.SD_VAE_SCALE)     # what the training latents were scaled by
        for flag, ours in (("size", model_cfg["size"]), ("objective", obj_cfg["name"])):
            if getattr(args, flag) not in (None, ours):
                raise UserError(f"--{flag} {getattr(args, flag)}: that flag is for official files; this checkpoint is "
                                f"{ours}")
    else:                                                   # an official plain state dict
        if args.no_ema and not ("model" in ckpt and "ema" in ckpt):
            raise UserError(f"--no-ema: {args.ckpt} holds one set of weights, not raw and EMA ones")
        weights = ckpt["model"] if args.no_ema else ckpt.get("ema", ckpt.get("model", ckpt))
        try:
            model_cfg, obj_cfg, settings = recognise_official(weights, args, args.ckpt, ckpt.get("args"))
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:   # the right keys, wrong contents
            raise UserError(f"{args.ckpt}: not a state dict this library recognises ({type(e).__name__}: {e})")
        model_cfg["paper_settings"] = settings
        kind = "latents" if model_cfg["in_channels"] == 4 else "images"
        args.latent_scale = train.SD_VAE_SCALE
    return weights, model_cfg, obj_cfg, kind


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_parser().parse_args(argv)
    out = args.out or "grid.png"
    ext = os.path.splitext(out)[1]
    npz = ext == ".npz"                                                      # exactly: x.NPZ is no npz
    if not npz and ext.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out {args.out}: give a .npz (samples for FID) or a .png/.jpg (a grid)")
    train.require_folder(out, "--out")
    if npz:   # the settings go beside the samples, in X.json
        train.require_json_file(os.path.splitext(out)[0] + ".json", f"--out {out}: its settings file")
    if args.balanced and args.class_labels:
        raise UserError("--balanced and --class-labels both choose the labels: give one")
    weights, cfg, obj_cfg, kind = read_checkpoint(args)
    if args.vae is not None and kind != "latents":
        raise UserError(f"--vae: this model samples {kind}, not latents: there is nothing to decode")
    objective, obj_name = train.build_objective(obj_cfg), obj_cfg["name"]
    args.vae = args.vae or "stabilityai/sd-vae-ft-ema"
    n_cls, C, H = cfg["num_classes"], cfg["in_channels"], cfg["input_size"]
    no_null = cfg["class_dropout_prob"] == 0             # no null label (an unconditional model has none either)
    if cfg.get("official"):                              # the paper's guidance only where the model can be guided
        settings = {k: v for k, v in cfg["paper_settings"].items() if not (no_null and k in GUIDANCE)}
        apply_paper_settings(args, settings, argv, npz)
    if no_null:
        if args.cfg_scale not in (None, 1.0):
            raise UserError("this model is unconditional: classifier-free guidance does not apply; leave out --cfg-scale"
                            if n_cls == 0 else "this model was trained without label dropout, so it has no null label: "
                            "classifier-free guidance is impossible; use --cfg-scale 1")
        args.cfg_scale = 1.0
    if args.cfg_scale == 1.0:        # flags that only shape guidance: with none, say so rather than ignore them silently
        given = train.given_flags(get_parser(), argv)
        idle = [f"--{k.replace('_', '-')}" for k in ("cfg_channels", "scale_pow", "guidance_interval") if k in given]
        if idle:
            print(f"warning: {' '.join(idle)} only shape{'s' if len(idle) == 1 else ''} guidance, which is off "
                  "(--cfg-scale 1): ignored")
    args.class_dropout, args.model, args.objective = cfg["class_dropout_prob"], cfg["family"], obj_name
    args = train.resolve_args(args, "digits" if kind == "digits" else "official")
    if args.cfg_channels is not None and args.cfg_channels > C and args.cfg_scale != 1.0:   # (ignored when off)
        raise UserError(f"--cfg-channels {args.cfg_channels} is more than the model's {C} channels")
    n = args.num_samples if args.num_samples is not None else (len(args.class_labels) if args.class_labels
                                                                else min(4 * n_cls, 40) if n_cls else 40)
    if n <= 0:
        raise UserError("--num-samples must be positive")
    if n_cls == 0:                            # unconditional: the model ignores y
        if args.class_labels:
            raise UserError("this model is unconditional: it takes no --class-labels")
        y = torch.zeros(n, dtype=torch.long)
    elif args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < n_cls]
        if bad:
            raise UserError(f"class labels {bad} are outside [0, {n_cls})")
        y = torch.tensor(args.class_labels).repeat(math.ceil(n / len(args.class_labels)))[:n]
    elif npz and not args.balanced:           # uniform random labels, as ADM/DiT FID sampling
        y = torch.randint(0, n_cls, (n,), generator=torch.Generator().manual_seed(args.seed))
    else:
        y = torch.arange(n) % n_cls           # class-balanced
    model = train.build_model(cfg)                       # after the checks above: an XL model takes a while on CPU
    train.load_weights(model, weights, args.ckpt)
    model.eval()
    ddp, rank, world, device = train.init_distributed()   # torchrun: each process samples every world-th chunk
    dist = torch.distributed
    vae = train.load_vae(args.vae, device, "decoding latents") if kind == "latents" else None
    torch.backends.cuda.matmul.allow_tf32 = True
    model.to(device)
    if args.precision == "bf16":
        train.bf16_weights(model)                              # same outputs as autocast alone, less traffic
    net = model
    if args.compile:                                           # the graph is reused by every step of every chunk
        train.require_compiler(device, "sample without --compile")
        net = torch.compile(model)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else torch.autocast(device.type, enabled=False)
    # Chunk c of batch-size samples draws its noise from seed (args.seed, c): the samples do not depend on
    # the number of processes, and no process holds all the noise.
    starts = list(range(0, n, args.batch_size))
    mine = starts[rank::world]
    chunks = []
    for c, i in enumerate(starts):
        if i not in mine:
            continue
        b = min(args.batch_size, n - i)
        # one stream per chunk: z, then (on CPU) the sampler's own noise (DDPM, SDE). A second generator with the
        # same seed would hand the sampler's first noise draw the values of z again.
        torch.manual_seed(args.seed * 1_000_003 + c)
        z = torch.randn(b, C, H, H)
        with amp:
            x = train.sample_images(objective, net, z.to(device), y[i:i + b].to(device), obj_name, args,
                                    progress=sys.stderr.isatty() and rank == 0)
        if vae is not None:
            with torch.no_grad():
                x = vae.decode(x.float() / args.latent_scale).sample   # SD-VAE decode -> images in [-1, 1]
        # an .npz keeps uint8 from here on: 50,000 samples at 256 px are 9.8 GB, against 39 GB in float32 (and
        # several float copies of that at the end)
        chunks.append(to_uint8_nhwc(x).cpu() if npz else x.float().cpu())
    x = torch.cat(chunks) if chunks else torch.zeros(0)
    chunks.clear()
    if ddp:                                   # gather on rank 0 through part files next to the output
        part = f"{out}.part{rank}.pt"
        torch.save(dict(starts=mine, x=x), part)
        dist.barrier()
        if rank != 0:
            dist.destroy_process_group()
            return out
        full = torch.zeros(n, *x.shape[1:], dtype=x.dtype)
        for r in range(world):
            p = torch.load(f"{out}.part{r}.pt", weights_only=True)
            off = 0
            for i in p["starts"]:
                b = min(args.batch_size, n - i)
                full[i:i + b] = p["x"][off:off + b]
                off += b
            os.remove(f"{out}.part{r}.pt")
        x = full
        dist.destroy_process_group()
    if npz:
        arr = x.numpy()
        arrays = dict(arr_0=arr, **(dict(labels=y.numpy().astype(np.int64)) if n_cls else {}))
        train.write_atomic(out, lambda f: np.savez(f, **arrays))
        settings = dict(ckpt=os.path.abspath(args.ckpt), ema=not args.no_ema, objective=obj_name, sampler=args.sampler,
                        steps=args.sample_steps, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
                        scale_pow=args.scale_pow, guidance_interval=args.guidance_interval,
                        labels="none" if n_cls == 0 else "given" if args.class_labels else
                        ("balanced" if args.balanced else "random"),
                        seed=args.seed, num_samples=n, vae=args.vae if kind == "latents" else None,
                        precision=args.precision, compile=args.compile)
        train.write_json(os.path.splitext(out)[0] + ".json", settings)
        print(f"wrote {out}: arr_0 {arr.shape} uint8, " + (f"labels {tuple(y.shape)}" if n_cls else "no labels (unconditional)"))
    else:
        nrow, fmt = 10 if n_cls == 10 else max(1, int(math.sqrt(n))), "JPEG" if ext.lower() in (".jpg", ".jpeg") else "PNG"
        train.write_atomic(out, lambda f: train.save_grid(x, f, nrow=nrow, fmt=fmt))
        print(f"wrote {out}: {n} samples" + (f", labels {y.tolist()[:20]}{' ...' if n > 20 else ''}" if n_cls else ""))
    return out


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
