"""
Encode an ImageNet-style folder (ROOT/CLASS/*.JPEG) into Stable-Diffusion-VAE latents for train.py --data.

    python extract_latents.py --data-path /data/imagenet/train --out latents256 --image-size 256
    torchrun --nproc_per_node 8 extract_latents.py --data-path ... --out latents256     # multi-GPU
    python train.py --data latents256 --model dit --size DiT-XL/2                       # then train

What is stored, and why (OUT/):
    moments.npy  float16 (N, 2, 2C, h, w): for every image the VAE posterior mean (channels 0..C-1) and std
                 (C..2C-1), of the image ([:, 0]) and of its horizontal flip ([:, 1]). C = 4, h = w = size / 8.
    labels.npy   int64 (N,): class index = position of the folder name in sorted(folders) (ImageFolder order; folders
                 starting with "." are not classes);
                 -1 marks an image that could not be decoded (the trainer skips those rows).
    meta.json    format, num_images, num_done (rows finished, in order), classes, image_size, latent_size,
                 latent_channels, scale_factor 0.18215, vae, flips, unreadable files; files.txt: row -> path.
The trainer draws z = 0.18215 * (mean + std * eps) with fresh eps at every step, from a random one of the
two orientations: exactly DiT's on-the-fly `vae.encode(flip(x)).latent_dist.sample() * 0.18215` with
RandomHorizontalFlip (fast-DiT instead freezes one flip and one posterior sample per image). The cost is
storage: ImageNet-256 = 1,281,167 x 2 x 8 x 32 x 32 x 2 bytes = 42 GB (512px: 168 GB).

Images go through ADM's center crop (center_crop_arr below) to [-1, 1]. Extraction is incremental: rows are
written in order and num_done is updated atomically after each round of batches, so the same command
resumes an interrupted run. With torchrun each process encodes every world-th batch of a round.
Needs diffusers (pip install diffusers), imported only here and in sample.py's latent decoding.
"""
import json
import os
import sys
import time

import numpy as np
import torch

from train import SD_VAE_SCALE, ArgumentParser, UserError, init_distributed, load_vae, to_8bit, warn_empty_classes, write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def center_crop_arr(img, size):
    """ADM's crop (guided-diffusion image_datasets.py): halve with BOX filtering while the short side is at
    least 2 * size, resize with BICUBIC so the short side is size, then take the central size x size square."""
    from PIL import Image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def list_images(root, skip=None):
    """Sorted (relative path, label) pairs and the sorted class names; `skip` (the output folder, when it lies in
    root) and hidden folders (.ipynb_checkpoints) are not classes."""
    if not os.path.isdir(root):
        raise UserError(f"--data-path {root}: no such folder")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
                     and not (skip and os.path.abspath(os.path.join(root, d)) == os.path.abspath(skip)))
    if not classes:
        raise UserError(f"--data-path {root}: no class subfolders (expected ROOT/CLASS/image.jpg)")
    items = [(os.path.join(c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise UserError(f"--data-path {root}: no image files in the class folders")
    warn_empty_classes(classes, {i for _, i in items}, root)
    return items, classes


class Images(torch.utils.data.Dataset):
    """Row i -> (image in [-1, 1] as (3, size, size), ok); a file that cannot be decoded gives ok = False."""

    def __init__(self, root, items, size):
        self.root, self.items, self.size = root, items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(os.path.join(self.root, self.items[i][0])) as im:
                a = center_crop_arr(to_8bit(im).convert("RGB"), self.size)
            return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1.0, True
        except Exception:
            return torch.zeros(3, self.size, self.size), False


def get_parser():
    p = ArgumentParser(description="Encode an image folder into SD-VAE latent moments (both flips).")
    p.add_argument("--data-path", required=True, help="ImageNet-style folder: ROOT/CLASS/*.JPEG")
    p.add_argument("--out", required=True, help="output folder (created; an unfinished one is resumed)")
    p.add_argument("--image-size", type=int, default=256, help="center-crop size, a multiple of 8 (default: 256)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL id or local path "
                   "(default: stabilityai/sd-vae-ft-ema; the encoders of -ema and -mse are identical)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and process (default: 64)")
    p.add_argument("--num-workers", type=int, default=4, help="data-loading workers per process (default: 4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images, N > 0 (for a quick trial; default: all)")
    p.add_argument("--overwrite", action="store_true", help="start again even if OUT holds a finished extraction")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.image_size <= 0 or args.image_size % 8:
        raise UserError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be positive (leave it out for all images), got {args.limit}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    ddp, rank, world, device = init_distributed()
    dist = torch.distributed
    barrier = (lambda: dist.barrier()) if ddp else (lambda: None)

    items, classes = list_images(args.data_path, skip=args.out)
    items = items[: args.limit]
    created = not os.path.isdir(args.out)
    if rank == 0:                                  # the output folder, before the VAE loads
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {args.out}: cannot make this folder ({e.strerror or e})")
    N, h = len(items), args.image_size // 8
    meta_path = os.path.join(args.out, "meta.json")
    try:
        vae = load_vae(args.vae, device, "extract_latents.py")
    except UserError:
        if rank == 0 and created and not os.listdir(args.out):   # a bad --vae leaves no empty folder behind
            os.rmdir(args.out)
        raise
    C = vae.config.latent_channels
    meta = dict(format="moments-v1", num_images=N, num_done=0, num_classes=len(classes), classes=classes,
                image_size=args.image_size, latent_size=h, latent_channels=C, scale_factor=SD_VAE_SCALE,
                vae=args.vae, data_path=os.path.abspath(args.data_path), unreadable=[],
                flips="both orientations stored: [:, 1] holds the moments of the horizontally flipped image")
    if rank == 0:
        old = None
        if os.path.isfile(meta_path) and not args.overwrite:
            try:                                   # an unfinished extraction to resume, checked whole
                with open(meta_path) as f:
                    old = json.load(f)
                same = all(old.get(k) == meta[k] for k in ("num_images", "image_size", "vae", "data_path", "classes"))
                for name, shape in (("moments.npy", (N, 2, 2 * C, h, h)), ("labels.npy", (N,))):
                    if same and np.load(os.path.join(args.out, name), mmap_mode="r").shape != shape:
                        raise ValueError(f"{name} does not have the shape {shape}")
                done = old.get("num_done")
                if same and (type(done) is not int or not 0 <= done <= N or type(old.get("unreadable")) is not list):
                    raise ValueError(f"meta.json's num_done {done!r} or unreadable list is not what this code wrote")
                if same:   # rows are files.txt's lines: a folder changed since (same count) would misalign them
                    with open(os.path.join(args.out, "files.txt")) as f:
                        if f.read().splitlines() != [p for p, _ in items]:
                            raise UserError(f"{args.data_path} changed since {args.out} was begun (files.txt lists "
                                            "other images): use --overwrite to start again, or another --out")
            except (OSError, ValueError, AttributeError) as e:     # JSONDecodeError is a ValueError
                raise UserError(f"{args.out} holds a damaged extraction ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:120]}); use --overwrite to start again")
        if old is not None:                        # {} too: a damaged file must not restart the extraction silently
            if not same:
                raise UserError(f"{args.out} holds an extraction with other settings (images, size, VAE or data); "
                                "use another --out or --overwrite")
            if old["num_done"] >= N:
                raise UserError(f"{args.out} is already complete ({N} images); use --overwrite to redo it")
            meta = old
        else:
            try:    # a read-only folder or a full disk: one line, not a traceback
                np.lib.format.open_memmap(os.path.join(args.out, "moments.npy"), mode="w+", dtype=np.float16,
                                          shape=(N, 2, 2 * C, h, h)).flush()
                np.lib.format.open_memmap(os.path.join(args.out, "labels.npy"), mode="w+", dtype=np.int64,
                                          shape=(N,))[:] = -1
                with open(os.path.join(args.out, "files.txt"), "w") as f:
                    f.write("\n".join(p for p, _ in items) + "\n")
                write_json(meta_path, meta)
            except OSError as e:
                raise UserError(f"--out {args.out}: cannot write the latent files ({e.strerror or e})")
    barrier()
    with open(meta_path) as f:
        meta = json.load(f)
    moments = np.load(os.path.join(args.out, "moments.npy"), mmap_mode="r+")
    labels = np.load(os.path.join(args.out, "labels.npy"), mmap_mode="r+")

    start, B = meta["num_done"], args.batch_size
    batches = list(range(start, N, B))                                       # first row of each batch
    mine = batches[rank::world]                                             # round k: batches k*world .. +world-1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(Images(args.data_path, items, args.image_size),
                                [i for b in mine for i in range(b, min(b + B, N))]),
        batch_size=B, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    from tqdm.auto import tqdm
    t0, done, bad = time.time(), 0, []
    it = iter(loader)
    for k in tqdm(range((len(batches) + world - 1) // world), disable=rank != 0, desc="rounds of batches"):
        if k < len(mine):
            x, ok = next(it)
            b = mine[k]
            with torch.no_grad():
                x = x.to(device, non_blocking=True)
                # the image, then its horizontal flip: two calls, as one of 2B images at 512 px would hold
                # activations of 2B x 128 x 512 x 512 floats (17 GB each at B = 64)
                m = [torch.cat([p.mean, p.std], dim=1).float()             # 2 x (n, 2C, h, h)
                     for p in (vae.encode(v).latent_dist for v in (x, x.flip(-1)))]
            n = x.shape[0]
            moments[b:b + n] = torch.stack(m, dim=1).cpu().numpy().astype(np.float16)   # (n, 2, 2C, h, h)
            labels[b:b + n] = [items[b + i][1] if ok[i] else -1 for i in range(n)]
            bad += [items[b + i][0] for i in range(n) if not ok[i]]
            done += n
        moments.flush()
        labels.flush()
        barrier()                                                           # every batch of round k is on disk
        if rank == 0:
            meta["num_done"] = min(N, batches[min(len(batches) - 1, (k + 1) * world - 1)] + B)
            write_json(meta_path, meta)
    if ddp:
        gathered = [None] * world
        dist.all_gather_object(gathered, (done, bad))
        done, bad = sum(g[0] for g in gathered), [f for g in gathered for f in g[1]]
    if rank == 0:
        meta["unreadable"] = sorted(set(meta.get("unreadable", []) + bad))
        meta["num_done"] = N
        write_json(meta_path, meta)
        dt = time.time() - t0
        print(f"wrote {N} rows to {args.out} ({done} encoded now, {done / max(dt, 1e-9):.1f} images/s on {world} "
              f"process(es)); {len(meta['unreadable'])} unreadable files marked with label -1")
    if ddp:
        dist.destroy_process_group()
    return args.out


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the same command resumes from the last finished batch", file=sys.stderr)
        sys.exit(130)
