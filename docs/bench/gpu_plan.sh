#!/usr/bin/env bash
# The bench.py runs that fill the GPU rows README still marks unmeasured or measured before a change (issue 9),
# most wanted first, so a cut-short session keeps the important ones. Each run has its own time limit (seconds,
# guessed from the 2026-11-22 H100 session: compiling an XL model took about a minute) and writes its own JSON
# and log, so a run that times out or runs out of memory loses only itself.
#
#   bash docs/bench/gpu_plan.sh                                 # from the repository root, on a CUDA GPU
#   DIR=/tmp/b T=120 EXTRA="--tiny --device cpu --sample-steps-scale 0.02 --sample-batch 4" bash docs/bench/gpu_plan.sh
#                                                               # the same commands at Tiny size on a CPU (a dry run)
#
# Settings (environment variables):
#   DIR=path      where the JSONs and logs go (default bench_out)
#   PACK=file.tgz after every run, all of DIR (with summary.txt, what this script printed) is packed into this one
#                 archive, replaced whole (for a caller that takes back only a few files, or kills the script at
#                 its own time limit)
#   RUNS="1 2 3"  picks runs by number (default: all)
#   BUDGET=secs   with START=epoch seconds (default: when this script began): a run starts only if its limit
#                 still fits before START + BUDGET, so the command ends (and its files come back) before the
#                 caller's own time limit
#   T=secs        replaces every run's own limit (the CPU dry run)
#   PY=python     the interpreter (default: python3, else python)
# A lent GPU has ~15 minutes in all, machine start included, and at most 10 minutes per command; README
# ("Measured on one H100") gives the one command that runs gpu_smoke.sh and then this script inside 560 s.
set -u
O=${DIR:-bench_out}; mkdir -p "$O"; E=${EXTRA:-}; RUNS=${RUNS:-all}; BUDGET=${BUDGET:-0}
exec > >(tee -a "$O/summary.txt") 2>&1         # what this script prints goes into the archive too
PY=${PY:-$(command -v python3 || command -v python)}
B="$PY bench.py --steps 5 --warmup 3 --repeats 3 $E"
START=${START:-$(date +%s)}; N=0
pack() {
    [ -n "${PACK:-}" ] || return 0
    tar czf "$PACK.part" -C "$O" . && mv "$PACK.part" "$PACK"
}
run() {
    name=$1; limit=${T:-$2}; shift 2; N=$((N + 1))
    case " $RUNS " in *" all "*|*" $N "*) ;; *) return;; esac
    left=$((START + BUDGET - $(date +%s)))
    if [ "$BUDGET" -gt 0 ] && [ "$left" -lt "$limit" ]; then echo "=== $N $name: skipped, ${left}s of the budget left"; return; fi
    echo "=== $N $name $(date +%T)"
    timeout "$limit" $B --json "$O/$name.json" "$@" > "$O/$name.log" 2>&1
    echo "rc=$? $(date +%T)"; grep -E '^\| bf16|^\| fp32|^profile|^quality' "$O/$name.log" || tail -3 "$O/$name.log"
    pack
}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__)"
# 1. DiT-XL/2 forward with bf16-stored weights (the 2400 img/s target), bf16/compile checked against fp32 eager
#    (TF32 off), and where the forward's GPU time goes
run dit_fwd 200 --model dit --what forward --modes bf16 bf16+compile --quality-check --profile
# 2. the <= 30 GB training target: the compiler recomputes instead of storing (same math); and where a step's time goes
run dit_train_mb085 150 --model dit --what train --modes bf16+compile --memory-budget 0.85 --profile
# 3. 64 samples, 250 DDPM steps with guidance, bf16-stored weights (the >= 3x target: <= 17.09 s)
run dit_sample 150 --model dit --what sample --modes bf16+compile
# 4. MDTv2-XL/2 compiled (the mask ratio is now drawn outside the graph): its first steps compile the longest
run mdt_train 300 --model mdt --batch-size 32 --warmup 6 --what train --modes bf16+compile --profile
# 5. U-ViT-H/2 as released (eps only, 500,832,016 parameters)
run uvit_train 150 --model unet_vit --no-learn-sigma --what train --modes bf16+compile
# 6. compile modes for the DiT forward
run dit_fwd_ro 150 --model dit --what forward --modes bf16+compile --compile-mode reduce-overhead
run dit_fwd_mant 300 --model dit --what forward --modes bf16+compile --compile-mode max-autotune-no-cudagraphs
# 7. the rest: a lower budget, SiT sampling, DiffiT after its bf16 q/k/v change, the fp32 rows never measured, DiT
#    eager after the LayerNorm change
run dit_train_mb07 150 --model dit --what train --modes bf16+compile --memory-budget 0.7
run sit_sample 150 --model dit --objective sit --what sample --modes bf16+compile
run diffit_train 200 --model diffit --what train --modes bf16 bf16+compile
run mdt_fp32 120 --model mdt --batch-size 32 --what train --modes fp32
run diffit_fp32 120 --model diffit --what train --modes fp32
run dit_eager 150 --model dit --what train forward --modes fp32 bf16
