#!/usr/bin/env bash
# The GPU paths of train.py and sample.py that the CPU test suite cannot reach (train.py and sample.py pick cuda
# by themselves), cheapest first: fp32 and bf16 training on the digits, a sample grid during training, resume (with
# gradient accumulation), sample.py in bf16 (PNG and .npz), the host-device syncs per training step (DiT), an exact
# resume of MDTv2 (with its noise floor), memory-mapped latents with pinned asynchronous copies, MDTv2's syncs, and
# last the compiled paths (--compile with a masking backbone and SiT; latents). Run it before gpu_plan.sh; each step
# prints its rc. Not yet run on a GPU (a few minutes there, guessed); on a CPU it runs too, slowly.
#
#   bash docs/bench/gpu_smoke.sh                       # everything in smoke_out/
#
# Settings (environment variables):
#   DIR=path      where the runs go (default smoke_out)
#   PACK=file.tgz after every step, the logs, sample grids, .npz files and what this script printed (summary.txt;
#                 no checkpoints, no .npy arrays) are packed into this one archive, replaced whole: a caller that
#                 takes back only a few files, or that kills the script at its own time limit, still gets all the
#                 steps done so far
#   BUDGET=secs   with START=epoch seconds (default: when this script began): a step starts only while time is
#                 left before START + BUDGET, and is cut there. Sharing START with gpu_plan.sh fits both scripts
#                 into one call of the GPU tool (README, "Measured on one H100")
#   T=secs        the time limit of each step (default 240)
#   PY=python     the interpreter (default: python3, else python)
set -u
O=${DIR:-smoke_out}; mkdir -p "$O"; T=${T:-240}; BUDGET=${BUDGET:-0}; START=${START:-$(date +%s)}
exec > >(tee -a "$O/summary.txt") 2>&1         # what this script prints goes into the archive too
PY=${PY:-$(command -v python3 || command -v python)}
pack() {
    [ -n "${PACK:-}" ] || return 0
    tar czf "$PACK.part" --exclude='*.pt' --exclude='*.npy' -C "$O" . && mv "$PACK.part" "$PACK"
}
step() {
    name=$1; shift; limit=$T
    if [ "$BUDGET" -gt 0 ]; then
        left=$((START + BUDGET - $(date +%s)))
        [ "$left" -lt "$limit" ] && limit=$left
        if [ "$limit" -lt 5 ]; then echo "=== $name: skipped, the budget is spent"; return 1; fi
    fi
    echo "=== $name $(date +%T)"
    timeout "$limit" "$@" > "$O/$name.log" 2>&1
    rc=$?; echo "rc=$rc $(date +%T)"; tr '\r' '\n' < "$O/$name.log" | grep -v '^\s*$' | tail -3
    pack; return $rc
}
Q="--steps 40 --log-every 20 --ckpt-every 20 --no-progress"
step dit_fp32 "$PY" train.py $Q --sample-every 40 --results-dir "$O/fp32"
step dit_bf16 "$PY" train.py $Q --sample-every 40 --precision bf16 --results-dir "$O/bf16"
run=$(ls -d "$O"/bf16/*/ 2>/dev/null | head -1)
if [ -n "$run" ]; then
    step resume "$PY" train.py --resume "$run" --steps 60 --grad-accum 2 --no-progress
    step sample_png "$PY" sample.py --ckpt "$run" --precision bf16 --sample-steps 20 --out "$O/grid.png"
    step sample_npz "$PY" sample.py --ckpt "$run" --precision bf16 --sample-steps 20 --num-samples 20 --out "$O/s.npz"
fi
# host-device syncs per training step (README: none): torch counts them in its sync debug mode; 30 steps minus 10
# steps leaves the per-step ones (the start and the end of a run sync too)
for n in 10 30; do
    step sync$n "$PY" -W always -c "import torch, train; torch.cuda.set_sync_debug_mode('warn'); train.main(['--steps',
        '$n', '--log-every', '1000', '--ckpt-every', '0', '--sample-every', '0', '--no-progress', '--results-dir',
        '$O/sync$n'])" && echo "syncs in $n steps: $(grep -c 'synchronizing CUDA operation' "$O/sync$n.log")"
done
# exact resume on GPU with MDTv2 (its mask ratio is drawn on the CPU generator): 4 steps straight == 2, resume, 2
step mdt_straight "$PY" train.py --model mdt --steps 4 --log-every 1 --no-progress --results-dir "$O/mdt4" &&
step mdt_half "$PY" train.py --model mdt --steps 2 --log-every 1 --no-progress --results-dir "$O/mdt22" &&
step mdt_resume "$PY" train.py --resume "$(ls -d "$O"/mdt22/*/ | head -1)" --steps 4 --no-progress &&
step mdt_again "$PY" train.py --model mdt --steps 4 --log-every 1 --no-progress --results-dir "$O/mdt4b" &&
"$PY" - "$O" <<'PY'
import glob, sys, torch
a, b, c = (torch.load(glob.glob(f"{sys.argv[1]}/{d}/*/checkpoints/last.pt")[0], weights_only=True) for d in ("mdt4", "mdt22", "mdt4b"))
diff = lambda p, q: max((p["model"][k] - q["model"][k]).abs().max().item() for k in p["model"])
# the noise floor: the same 4 straight steps twice (some CUDA kernels are not deterministic)
print("mdt resume: max |weight difference|", diff(a, b), "; straight run vs itself:", diff(a, c))
for d in ("mdt4", "mdt22"):
    print(d, open(glob.glob(f"{sys.argv[1]}/{d}/*/log.txt")[0]).read().splitlines()[-2:])
PY
# a hand-made latent folder in extract_latents.py's layout (no VAE needed): 64 rows of 2 flips x 2C x 32 x 32
"$PY" - "$O/lat" <<'PY'
import json, os, sys
import numpy as np
root = sys.argv[1]; os.makedirs(root, exist_ok=True)
np.save(os.path.join(root, "moments.npy"), np.random.default_rng(0).normal(size=(64, 2, 8, 32, 32)).astype(np.float16))
np.save(os.path.join(root, "labels.npy"), np.arange(64, dtype=np.int64) % 4)
json.dump(dict(format="moments-v1", num_images=64, num_done=64, num_classes=4, classes=list("abcd"), latent_size=32,
               latent_channels=4, scale_factor=0.18215), open(os.path.join(root, "meta.json"), "w"))
PY
step latents "$PY" train.py --data "$O/lat" --size DiT-S/2 --batch-size 16 --precision bf16 $Q \
    --sample-every 0 --results-dir "$O/latents"
# the same sync count for MDTv2's masked pass (its mask ratio is drawn on the CPU
# generator, which is no device sync; the kept-pair index and the side-interpolater are device ops)
for n in 10 30; do
    step mdt_sync$n "$PY" -W always -c "import torch, train; torch.cuda.set_sync_debug_mode('warn'); train.main(['--model',
        'mdt', '--steps', '$n', '--log-every', '1000', '--ckpt-every', '0', '--sample-every', '0', '--no-progress',
        '--results-dir', '$O/mdt_sync$n'])" && echo "syncs in $n MDT steps: $(grep -c 'synchronizing CUDA operation' "$O/mdt_sync$n.log")"
done
# last, where the budget allows: the compiled paths (their first steps compile, about a minute each)
step mdt_sit_compile "$PY" train.py --model mdt --objective sit --compile --precision bf16 $Q --results-dir "$O/mdt"
step latents_compile "$PY" train.py --data "$O/lat" --size DiT-S/2 --batch-size 16 --precision bf16 --compile $Q \
    --sample-every 0 --results-dir "$O/latents"
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
pack
exit 0
