"""
Speed and memory benchmark for any backbone x objective, on CUDA or CPU.

    python bench.py                                     # DiT-XL/2 + ddpm, 32x32x4 latents, batch 64, fp32/bf16/bf16+compile
    python bench.py --model mdt --objective sit         # MDTv2-XL/2 (full + masked pass)
    python bench.py --tiny --device cpu                 # the family's Tiny config on 8x8x1 (what CI runs)
    python bench.py --quality-check                     # also: bf16 / compiled outputs vs fp32 eager

Measures, per precision mode: training throughput (images/s of a full step: objective loss [+ masked pass],
backward, AdamW, EMA), forward FLOPs (torch.utils.flop_counter, one forward; training counted as 3x
forward), achieved TFLOP/s and MFU against --peak-tflops, peak GPU memory of the training step, the bytes
autograd saves for backward in one training forward (any device; --memory-budget trades them for recompute), inference
forward images/s, and end-to-end sampling time for the samplers of the objective (inference in bf16 modes keeps
the Linear/Conv weights in bf16, as sample.py --precision bf16: the same outputs as autocast alone). Timing: warm-up steps
excluded, torch.cuda.synchronize around each timed block, median of --repeats blocks. A table goes to
stdout and everything to --json. --profile adds where the time of one training step and one forward goes
(torch.profiler: shares of matmul, attention, compiled fused kernels, optimizer + EMA, copies; the longest kernels).
"""
import copy
import json
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch._functorch.config
from torch.utils.flop_counter import FlopCounterMode

import train
from train import UserError

# dense bf16 / tf32 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts), for MFU
PEAKS = {"H100": (989.0, 494.5), "H200": (989.0, 494.5), "A100": (312.0, 156.0)}
PARTS = ("train", "forward", "sample")
# --profile: a kernel (CUDA) or op (CPU) name -> the kind of work, first match wins: inductor's generated kernels
# first (they are named after the ops they fuse: triton_poi_fused__scaled_dot_product_efficient_attention_...), then
# attention before matmul (memory-efficient attention kernels are named fmha_cutlass...); triton_tem: matmul templates
KINDS = (("compiled fused", ("triton_poi", "triton_red", "triton_per", "compiledfxgraph", "cpp_fused")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
                     "aten::baddbmm")),
         ("optimizer+ema", ("adam", "multi_tensor", "foreach")),
         ("compiled fused", ("triton",)),
         ("copy", ("memcpy", "memset", "copy")))


def get_parser():
    p = train.ArgumentParser(description="Benchmark training/inference/sampling speed of a backbone x objective.")
    train.add_model_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="per-step batch (default: 64)")
    p.add_argument("--input-size", type=int, default=32, help="latent/image side (default: 32 = ImageNet-256 latents)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels (default: 4)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes (default: 1000)")
    p.add_argument("--tiny", action="store_true", help="use the family's Tiny config on 8x8x1 inputs, batch 16 (CPU/CI)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16+compile"],
                   help="precision modes to run: fp32, bf16, bf16+compile, fp32+compile (default: the first three)")
    p.add_argument("--what", nargs="+", default=list(PARTS), help="parts to time: train, forward, sample (default: all)")
    p.add_argument("--sample-modes", nargs="+", default=None,
                   help="modes in which 'sample' is timed (default: every mode of --modes)")
    p.add_argument("--mask-ratio", type=float, default=0.3, help="masking backbones: masked-pass ratio (default: 0.3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default: 3; compile needs them)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, the median is reported (default: 3)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling run (default: 64)")
    p.add_argument("--sample-steps-scale", type=float, default=1.0, help="multiply every sampler's steps (e.g. 0.04 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU, used for every mode (default: "
                   "from the GPU name, bf16 and TF32 peaks of H100/H200/A100; none elsewhere)")
    p.add_argument("--memory-budget", type=float, default=1.0, help="compiled modes: the activation memory kept "
                   "for backward, in (0, 1]: near 0 recompute all it can, 1 the default; torch's activation_memory_budget")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune",
                   "max-autotune-no-cudagraphs"], help="torch.compile mode of the +compile modes: reduce-overhead adds "
                   "CUDA graphs, max-autotune also searches matmul kernels (default: default)")
    p.add_argument("--quality-check", action="store_true", help="compare bf16 / compiled outputs with fp32 eager")
    p.add_argument("--profile", action="store_true", help="after timing, profile one training step and one forward "
                   "(torch.profiler): the share of device time by kind of work and the longest kernels, to the JSON")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", default="bench.json", help="write all results here (default: bench.json)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps, warmup, repeats):
    """Median seconds per call of fn over `repeats` blocks of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def count_flops(model, x, t, y, **kw):
    """FLOPs of one forward. SDPA runs on its math backend here so that the attention matmuls are counted
    on every device (the counter does not see inside some fused CPU kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model(x, t, y, **kw)
    return fc.get_total_flops()


def kind_of(name):
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def own_times(events, on_gpu):
    """{name: microseconds} of the work itself: on GPU the kernels (their CPU ops would count them twice, and
    the GPU spans of annotations such as a compiled graph's call hold other kernels); on CPU each op's self time."""
    us = {}
    for e in events:
        t = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if t > 0 and (e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) == on_gpu:
            us[e.key] = us.get(e.key, 0) + t
    return us


def profile(fn, device, top=8):
    """One call of fn under torch.profiler: milliseconds of device time (CUDA kernels; on CPU the ops' own CPU
    time), the share of each kind of work (KINDS), and the `top` longest kernels. Where a step's time goes."""
    from torch.profiler import ProfilerActivity
    on_gpu = device.type == "cuda"
    sync(device)
    try:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            fn()
            sync(device)
        us = own_times(prof.key_averages(), on_gpu)
    except Exception as e:      # a profiler that cannot run here must not cost the numbers measured before it
        return dict(error=f"{type(e).__name__}: {e}"[:300])
    total = sum(us.values()) or 1
    shares = {}
    for name, t in us.items():
        kind = kind_of(name)
        shares[kind] = shares.get(kind, 0) + t / total
    longest = sorted(us.items(), key=lambda kv: -kv[1])[:top]
    return dict(ms=total / 1e3, shares=dict(sorted(shares.items(), key=lambda kv: -kv[1])),
                top=[[name[:120], t / 1e3] for name, t in longest])


def build(args, device, compile_):
    obj_cfg = train.objective_config(train.ddpm_defaults(args, latents=not args.tiny))
    objective = train.build_objective(obj_cfg)
    C, H = (1, 8) if args.tiny else (args.in_channels, args.input_size)
    size = args.size or train.FAMILIES[args.model]["small" if args.tiny else "latents"]
    cfg = dict(family=args.model, size=size, input_size=H, in_channels=C, out_channels=objective.out_channels(C),
               num_classes=10 if args.tiny else args.num_classes, class_dropout_prob=args.class_dropout)
    torch.manual_seed(args.seed)
    model = train.build_model(cfg).to(device)
    if getattr(model, "trains_with_mask", False) and args.mask_ratio > 0:
        train.require_mask_ratio(model, args.mask_ratio)
    torch._functorch.config.activation_memory_budget = args.memory_budget
    fwd = torch.compile(model, mode=args.compile_mode) if compile_ else model
    return model, fwd, objective, cfg


def saved_activation_bytes(step_loss, params):
    """Bytes of the tensors autograd keeps for backward in one training forward (storages counted once, the
    parameters not counted): the activation memory, measured on any device, compiled graphs included."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss()
    loss.backward()
    return total


def bench_mode(args, mode, device):
    precision, compile_ = mode.split("+")[0], mode.endswith("+compile")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    model, fwd, objective, cfg = build(args, device, compile_)
    B, C, H = args.batch_size, cfg["in_channels"], cfg["input_size"]
    x = torch.randn(B, C, H, H, device=device)
    y = torch.randint(0, cfg["num_classes"], (B,), device=device)
    masked = getattr(model, "trains_with_mask", False) and args.mask_ratio > 0
    res = dict(mode=mode, size=cfg["size"], params=sum(p.numel() for p in model.parameters()), batch=B)

    # forward FLOPs, counted once (eager); a training step = 3x the forwards it runs (full, and masked if any)
    t_mid = torch.full((B,), 500, device=device)
    res["gflops_fwd_per_img"] = count_flops(model, x, t_mid, y) / B / 1e9
    train_gflops = 3 * res["gflops_fwd_per_img"]
    if masked:
        res["gflops_masked_fwd_per_img"] = count_flops(model, x, t_mid, y, mask_ratio=args.mask_ratio) / B / 1e9
        train_gflops += 3 * res["gflops_masked_fwd_per_img"]

    if "train" in args.what:
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = train.adamw(model.parameters(), device, lr=1e-4, weight_decay=0)
        model.train()

        def step_loss():
            with amp:
                loss = objective.loss(fwd, x, y)["loss"].mean()
                if masked:
                    loss = loss + objective.loss(fwd, x, y, model_kwargs=dict(mask_ratio=args.mask_ratio))["loss"].mean()
            return loss

        def step():      # the order of train.py's loop: grads are freed before the forward, not after it
            opt.zero_grad(set_to_none=True)
            step_loss().backward()
            opt.step()
            train.update_ema(ema, model, 0.9999)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = timed(step, device, args.steps, args.warmup, args.repeats)
        res["train_img_s"] = B / sec
        res["train_tflops"] = train_gflops * res["train_img_s"] / 1e3
        if device.type == "cuda":
            res["train_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if args.profile:                  # after the peak memory: the timed steps alone give that
            res["train_profile"] = profile(step, device)
        opt.zero_grad(set_to_none=True)
        res["saved_activations_gb"] = saved_activation_bytes(step_loss, model.parameters()) / 1e9
        del opt, ema

    if precision == "bf16" and ("forward" in args.what or "sample" in args.what):
        train.bf16_weights(model)         # inference from here on: bit-identical outputs, no per-call weight cast
    if "forward" in args.what:
        model.eval()

        def forward():
            with torch.no_grad(), amp:
                fwd(x, t_mid, y)

        res["forward_img_s"] = B / timed(forward, device, args.steps, args.warmup, args.repeats)
        if args.profile:
            res["forward_profile"] = profile(forward, device)

    if "sample" in args.what and mode in (args.sample_modes or args.modes):
        model.eval()
        n = args.sample_batch
        z = torch.randn(n, C, H, H, device=device)
        ys = torch.randint(0, cfg["num_classes"], (n,), device=device)
        scale = lambda s: max(2, int(round(s * args.sample_steps_scale)))
        if args.objective == "ddpm":
            runs = {f"ddpm{scale(250)}_cfg": dict(steps=scale(250), sampler="ddpm", cfg_scale=4.0),
                    f"dpm++{scale(50)}_cfg": dict(steps=scale(50), sampler="dpm++", cfg_scale=4.0)}
        else:
            runs = {f"sde_euler{scale(250)}_cfg": dict(method="sde", solver="euler", num_steps=scale(250), cfg_scale=4.0),
                    "ode_dopri5_cfg": dict(method="ode", solver="dopri5", num_steps=2, cfg_scale=4.0)}  # (adaptive:
            # dopri5 ignores num_steps, given only for the warm-up below, which runs the whole solve)
        for name, kw in runs.items():
            def run(kw=kw):
                with amp:
                    objective.sample(fwd, z, ys, **kw)
            key = "steps" if "steps" in kw else "num_steps"
            run(dict(kw, **{key: min(kw[key], 4)}))    # warm-up (compiles): the same shapes, a few steps
            res[f"sample_{name}_s"] = timed(run, device, 1, 0, 1)
            if hasattr(objective, "nfe"):             # dopri5 adapts its steps: its time is per this many calls
                res[f"sample_{name}_nfe"] = objective.nfe
    return res


def main(argv=None):
    args = get_parser().parse_args(argv)
    bad = [w for w in args.what if w not in PARTS]
    if bad:
        raise UserError(f"unknown --what {' '.join(bad)}; choose from {', '.join(PARTS)}")
    if not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device}: give cuda (or cuda:N) or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: no such CUDA GPU here ({torch.cuda.device_count()} available); "
                        "use --device cpu")
    train.require_json_file(args.json, "--json")                    # checked now: the JSON is written after each mode
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if not 0 <= args.class_dropout < 1:
        raise UserError(f"--class-dropout must be in [0, 1), got {args.class_dropout}")
    if not 0 < args.memory_budget <= 1:
        raise UserError(f"--memory-budget must be in (0, 1], got {args.memory_budget}")
    for name in ("batch_size", "input_size", "in_channels", "num_classes", "steps", "repeats", "sample_batch",
                 "sample_steps_scale"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if not math.isfinite(args.sample_steps_scale):
        raise UserError(f"--sample-steps-scale must be a finite number, got {args.sample_steps_scale}")
    if args.objective == "ddpm" and round(250 * args.sample_steps_scale) > 1000:
        raise UserError(f"--sample-steps-scale {args.sample_steps_scale}: the 250-step DDPM row would take more than "
                        "ddpm's 1000 timesteps")
    if "sample" in args.what and args.class_dropout == 0:
        raise UserError("--class-dropout 0: the sampling rows time guidance (scale 4), which needs label dropout; "
                        "give --class-dropout > 0 or leave 'sample' out of --what")
    ignored = train.ignored_flags(train.given_flags(get_parser(), argv), args.objective)
    if ignored:
        print(ignored)
    if args.tiny:
        args.batch_size = min(args.batch_size, 16)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = (args.peak_tflops,) * 2 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in gpu), (None, None))
    env = dict(device=gpu, torch=torch.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
               command="python bench.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for mode in args.modes + (args.sample_modes or []):
        if mode not in ("fp32", "bf16", "bf16+compile", "fp32+compile"):
            raise UserError(f"unknown mode {mode!r}; choose fp32, bf16, bf16+compile, fp32+compile")
    if set(args.sample_modes or []) - set(args.modes):
        raise UserError(f"--sample-modes {' '.join(args.sample_modes)}: each must also be in --modes {' '.join(args.modes)}")
    if any(m.endswith("+compile") for m in args.modes):           # before the eager modes spend their time
        train.require_compiler(device, "leave the +compile modes out of --modes")
    results, quality = [], None
    for mode in args.modes:
        r = bench_mode(args, mode, device)
        if peak[0] and "train_tflops" in r:
            r["mfu"] = r["train_tflops"] / (peak[0] if mode.startswith("bf16") else peak[1])
        results.append(r)
        print(json.dumps(r), flush=True)          # one line per mode as it finishes (long GPU runs)
        write_json(args.json, env, results, quality)   # after every mode: a run cut short keeps what it measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
    quality = quality_check(args, device) if args.quality_check else None
    print(f"# {env['device']}, torch {env['torch']}, {env['date']}: {env['command']}")
    cols = list(dict.fromkeys(k for r in results for k in r if k not in ("mode", "size") and not k.endswith("_profile")))
    print("| mode | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results:
        print(f"| {r['mode']} | " + " | ".join(f"{r.get(c, float('nan')):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                             for c in cols) + " |")
    for r in results:
        for part in ("train", "forward"):
            if f"{part}_profile" in r:
                p = r[f"{part}_profile"]
                print(f"profile {r['mode']} {part}: " + (f"failed ({p['error']})" if "error" in p else
                      f"{p['ms']:.1f} ms of device time in one call; "
                      + ", ".join(f"{k} {v:.0%}" for k, v in p["shares"].items())))
    if quality:
        print("quality vs fp32 eager:", json.dumps(quality))
    write_json(args.json, env, results, quality)
    return results


def write_json(path, env, results, quality):
    train.write_json(path, dict(env=env, results=results, quality=quality))


def quality_check(args, device):
    """Max |out - out_fp32| / max |out_fp32| of one forward pass (TF32 off), for bf16 autocast and compiled fp32; and the
    max difference that bf16-stored weights (bf16 inference) make to the bf16 autocast output (should be 0)."""
    model, _, _, cfg = build(args, torch.device("cpu"), False)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():                  # random weights everywhere (zero-init would hide differences)
        p.data.normal_(0, 0.02, generator=g) if p.requires_grad else None
    model.to(device).eval()
    B, C, H = min(args.batch_size, 8), cfg["in_channels"], cfg["input_size"]
    x = torch.randn(B, C, H, H, generator=g).to(device)
    t = torch.full((B,), 500, device=device)
    y = torch.randint(0, cfg["num_classes"], (B,), generator=g).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # fp32 means fp32 on GPU too
    try:
        with torch.no_grad():
            ref = model(x, t, y).float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf = model(x, t, y).float()
            comp = torch.compile(model)(x, t, y).float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf_w = train.bf16_weights(model)(x, t, y).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rel = lambda a: ((a - ref).abs().max() / ref.abs().max()).item()
    return dict(bf16_rel_err=rel(bf), compile_fp32_rel_err=rel(comp),
                bf16_weights_vs_autocast_max_diff=(bf_w - bf).abs().max().item())


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the JSON holds the modes that finished", file=sys.stderr)
        sys.exit(130)
