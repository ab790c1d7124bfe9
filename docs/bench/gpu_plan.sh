#!/usr/bin/env bash
# The bench.py runs that fill the GPU rows README still marks unmeasured or measured before a change (issue 9),
# most wanted first, so a cut-short session keeps the important ones. Each run has a time limit and writes its
# own JSON and log, so a run that times out or runs out of memory loses only itself.
#
#   OUT=bench_out T=150 bash docs/bench/gpu_plan.sh            # from the repository root, on a CUDA GPU
#   OUT=/tmp/b T=60 EXTRA="--tiny --device cpu --sample-steps-scale 0.02 --sample-batch 4" bash docs/bench/gpu_plan.sh
#                                                               # the same commands at Tiny size on a CPU (a dry run)
#
# A lent GPU has ~15 minutes in all, machine start included, and at most 10 minutes per command. So:
#   RUNS="1 2 3 4" picks runs by number (default: all 11);
#   BUDGET=secs   starts a run only if its limit T still fits in the seconds left since the script began,
#                 so the command ends (and its JSONs come back) before the caller's own time limit.
# e.g. a first call `OUT=$OUT BUDGET=520 T=130 bash docs/bench/gpu_plan.sh`, then, with the time left,
# `RUNS="<the numbers not yet done>" ...` in a second call.
set -u
O=${OUT:-bench_out}; mkdir -p "$O"; E=${EXTRA:-}; T=${T:-150}; RUNS=${RUNS:-all}; BUDGET=${BUDGET:-0}
B="python bench.py --steps 5 --warmup 3 --repeats 3 $E"
START=$(date +%s); N=0
run() {
    name=$1; shift; N=$((N + 1))
    case " $RUNS " in *" all "*|*" $N "*) ;; *) return;; esac
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$BUDGET" -gt 0 ] && [ "$left" -lt "$T" ]; then echo "=== $N $name: skipped, ${left}s of the budget left"; return; fi
    echo "=== $N $name $(date +%T)"
    timeout "$T" $B --json "$O/$name.json" "$@" > "$O/$name.log" 2>&1
    echo "rc=$? $(date +%T)"; tail -3 "$O/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python -c "import torch; print('torch', torch.__version__)"
# 1. DiT-XL/2 forward and sampling with bf16-stored weights, and bf16/compile checked against fp32 eager;
#    --profile: where the forward's GPU time goes (matmul, attention, fused kernels), the gap to the 2400 img/s target
run dit_fwd_sample --model dit --what forward sample --modes bf16 bf16+compile --quality-check --profile
# 2. the <= 30 GB training target: the compiler recomputes instead of storing (same math); and where a step's time goes
run dit_train_mb085 --model dit --what train --modes bf16+compile --memory-budget 0.85 --profile
# 3. MDTv2-XL/2 compiled (the mask ratio is now drawn outside the graph): its first steps compile the longest
run mdt_train --model mdt --batch-size 32 --warmup 6 --what train --modes bf16+compile
# 4. U-ViT-H/2 as released (eps only, 500,832,016 parameters)
run uvit_train --model unet_vit --no-learn-sigma --what train --modes bf16+compile
# 5. compile modes for the DiT forward
run dit_fwd_ro --model dit --what forward --modes bf16+compile --compile-mode reduce-overhead
run dit_fwd_mant --model dit --what forward --modes bf16+compile --compile-mode max-autotune-no-cudagraphs
# 6. the rest: a lower budget, SiT sampling, the fp32 rows never measured, DiT eager after the LayerNorm change
run dit_train_mb07 --model dit --what train --modes bf16+compile --memory-budget 0.7
run sit_sample --model dit --objective sit --what sample --modes bf16+compile
run mdt_fp32 --model mdt --batch-size 32 --what train --modes fp32
run diffit_fp32 --model diffit --what train --modes fp32
run dit_bf16 --model dit --what train forward --modes fp32 bf16
