"""
Sample from a trained model: a PNG grid, or an FID-ready .npz (ADM evaluator layout).

    python sample.py --ckpt runs/000-dit-DiT-Tiny_2-ddpm/checkpoints/last.pt          # grid.png, 4 per class
    python sample.py --ckpt RUN/checkpoints/last.pt --num-samples 1000 --out s.npz      # arr_0 uint8 NxHxWxC + labels
    python sample.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 4 --class-labels 207 360 387 974   # official weights

Our checkpoints carry their model and objective settings. The official DiT/SiT files are plain state
dicts: the family, size and input size are read off the keys and shapes, the objective from --objective
(default: sit if the file name says SiT, else ddpm). Latent samples are decoded with the SD VAE
(needs `pip install diffusers`).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import train
from train import UserError


def get_parser():
    p = argparse.ArgumentParser(description="Sample images from a trained Diffusion Transformer.")
    p.add_argument("--ckpt", required=True, help="a checkpoint of train.py (or a run directory), or an official state dict")
    p.add_argument("--out", default=None, help="output file: .png grid or .npz (default: grid.png beside the checkpoint's run)")
    p.add_argument("--num-samples", type=int, default=None, help="number of samples (default: 4 per class up to 40 for grids)")
    p.add_argument("--class-labels", type=int, nargs="+", default=None, help="labels to sample (repeated to --num-samples)")
    p.add_argument("--balanced", action="store_true", help="class-balanced labels for .npz (default: uniform random, as ADM/DiT)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and labels (default: 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 autocast (default: fp32)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="VAE to decode latents (diffusers id or local path)")
    p.add_argument("--model", default=None, help="official files only: backbone family (default: read off the keys)")
    p.add_argument("--size", default=None, help="official files only: registry name (default: read off the shapes)")
    p.add_argument("--objective", default=None, help="official files only: ddpm or sit (default: from the file name)")
    p.add_argument("--num-classes", type=int, default=1000, help="official files only: number of classes (default: 1000)")
    train.add_sampling_args(p)
    return p


# Sampling settings of each paper, used for recognised official files unless a flag says otherwise:
# (family, objective) -> settings; cfg_scale is (FID setting for .npz, visual setting for grids).
PAPER_SETTINGS = {
    ("dit", "ddpm"): dict(sampler="ddpm", sample_steps=250, cfg_scale=(1.5, 4.0), cfg_channels=3),      # DiT Tab. 2, sample.py
    ("dit", "sit"): dict(sampler="sde-euler", sample_steps=250, cfg_scale=(1.5, 4.0), cfg_channels=3),  # SiT Tab. 7 (SDE 2.06)
}


def apply_paper_settings(args, family, objective, argv, npz):
    """Fill the sampling flags the user did not give with the paper's settings; say what was used."""
    given = {a.dest for a in get_parser()._actions if any(o in argv for o in a.option_strings)}
    used = {}
    for k, v in PAPER_SETTINGS.get((family, objective), {}).items():
        if k not in given:
            setattr(args, k, v[0 if npz else 1] if isinstance(v, tuple) else v)
            used[k] = getattr(args, k)
    if used:
        print("paper sampling settings: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in used.items()))


def recognise_official(sd, args, path):
    """(model_cfg, objective_cfg) for a plain official state dict; UserError if it is not one we know."""
    sd = train.clean_state_dict(sd)
    if "y_embedder.embedding_table.weight" in sd and "final_layer.linear.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        family = args.model or "dit"
        D = sd["pos_embed"].shape[-1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        p = sd["x_embedder.proj.weight"].shape[-1]
        names = {(1152, 28): "XL", (1024, 24): "L", (768, 12): "B", (384, 12): "S"}
        if (D, depth) not in names:
            raise UserError(f"{path}: a DiT-like state dict with hidden {D} and depth {depth} matches no DiT config")
        size = args.size or f"DiT-{names[(D, depth)]}/{p}"
        in_ch = sd["x_embedder.proj.weight"].shape[1]
        input_size = int(math.isqrt(sd["pos_embed"].shape[1])) * p
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
        n_cls = sd["y_embedder.embedding_table.weight"].shape[0] - 1
        model_cfg = dict(family=family, size=size, input_size=input_size, in_channels=in_ch, out_channels=out_ch,
                         num_classes=n_cls, class_dropout_prob=0.1, official=True)
        name = args.objective or ("sit" if "sit" in os.path.basename(path).lower() else "ddpm")
    else:
        raise UserError(f"{path}: not a checkpoint of this library and not an official state dict it recognises "
                        "(pass --model/--size/--objective for other official files)")
    if name == "ddpm":
        obj = dict(name="ddpm", beta_schedule="linear", learn_sigma=out_ch == 2 * in_ch, timestep_offset=0, min_snr=False)
    else:
        obj = dict(name="sit", path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)
    print(f"{os.path.basename(path)}: official weights read as {size} at {input_size}x{input_size}x{in_ch}, "
          f"{out_ch} outputs, {n_cls} classes; objective {name} (override with --objective)")
    return model_cfg, obj


def load_for_sampling(args):
    """-> (model in eval mode, objective, objective name, data kind)."""
    ckpt = train.load_checkpoint(args.ckpt)
    if "config" in ckpt:                                    # ours
        model_cfg, obj_cfg = ckpt["config"]["model"], ckpt["config"]["objective"]
        weights = ckpt["model"] if args.no_ema else ckpt["ema"]
        kind = ckpt["config"]["data"]["kind"]
        if args.cfg_scale not in (None, 1.0) and model_cfg["class_dropout_prob"] == 0:
            raise UserError("this model was trained without label dropout, so it has no null label: "
                            "classifier-free guidance is impossible; use --cfg-scale 1")
    else:                                                   # an official plain state dict
        weights = ckpt.get("ema", ckpt.get("model", ckpt))
        model_cfg, obj_cfg = recognise_official(weights, args, args.ckpt)
        kind = "latents" if model_cfg["in_channels"] == 4 else "images"
    model = train.build_model(model_cfg)
    train.load_weights(model, weights, args.ckpt)
    return model.eval(), train.build_objective(obj_cfg), obj_cfg["name"], kind, model_cfg


def decode_latents(z, vae_id, device):
    """SD-VAE decode z / 0.18215 -> images in [-1, 1]."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("decoding latents needs diffusers: pip install diffusers")
    if not hasattr(decode_latents, "vae"):
        decode_latents.vae = AutoencoderKL.from_pretrained(vae_id).to(device).eval()
    with torch.no_grad():
        return decode_latents.vae.decode(z / 0.18215).sample


def main(argv=None):
    args = get_parser().parse_args(argv)
    model, objective, obj_name, kind, cfg = load_for_sampling(args)
    if cfg.get("official"):
        apply_paper_settings(args, cfg["family"], obj_name, sys.argv[1:] if argv is None else argv,
                             (args.out or "").endswith(".npz"))
    args.class_dropout, args.model, args.objective = cfg["class_dropout_prob"], cfg["family"], obj_name
    args = train.resolve_args(args, "digits" if kind == "digits" else "official")
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    model.to(device)
    n_cls, C, H = cfg["num_classes"], cfg["in_channels"], cfg["input_size"]
    out = args.out or "grid.png"
    npz = out.endswith(".npz")
    n = args.num_samples or (len(args.class_labels) if args.class_labels else min(4 * n_cls, 40))
    if n <= 0:
        raise UserError("--num-samples must be positive")
    g = torch.Generator().manual_seed(args.seed)
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < n_cls]
        if bad:
            raise UserError(f"class labels {bad} are outside [0, {n_cls})")
        y = torch.tensor(args.class_labels).repeat(math.ceil(n / len(args.class_labels)))[:n]
    elif npz and not args.balanced:
        y = torch.randint(0, n_cls, (n,), generator=g)      # uniform random labels, as ADM/DiT FID sampling
    else:
        y = torch.arange(n) % n_cls                         # class-balanced
    z = torch.randn(n, C, H, H, generator=g)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else torch.autocast(device.type, enabled=False)
    torch.manual_seed(args.seed)
    chunks = []
    for i in range(0, n, args.batch_size):
        with amp:
            x = train.sample_images(objective, model, z[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device),
                                    obj_name, args, progress=sys.stderr.isatty())
        if kind == "latents":
            x = decode_latents(x.float(), args.vae, device)
        chunks.append(x.float().cpu())
    x = torch.cat(chunks)
    if npz:
        # ADM/DiT conversion: clamp(127.5 x + 128, 0, 255) then truncate to uint8; NHWC
        arr = (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez(out, arr_0=arr, labels=y.numpy().astype(np.int64))
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(dict(ckpt=os.path.abspath(args.ckpt), ema=not args.no_ema, objective=obj_name, sampler=args.sampler,
                           steps=args.sample_steps, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
                           scale_pow=args.scale_pow, guidance_interval=args.guidance_interval,
                           labels="given" if args.class_labels else ("balanced" if args.balanced else "random"),
                           seed=args.seed, num_samples=n, vae=args.vae if kind == "latents" else None,
                           precision=args.precision), f, indent=1)
        print(f"wrote {out}: arr_0 {arr.shape} uint8, labels {y.shape}")
    else:
        train.save_grid(x, out, nrow=10 if n_cls == 10 else max(1, int(math.sqrt(n))))
        print(f"wrote {out}: {n} samples, labels {y.tolist()[:20]}{' ...' if n > 20 else ''}")
    return out


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
