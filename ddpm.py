"""
The Gaussian diffusion objective DiT, MDT and DiffiT train with (DDPM + improved-DDPM learned variance).
arxiv.org/abs/2006.11239 (DDPM), arxiv.org/abs/2102.09672 (iDDPM).

Papers: J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239 (DDPM);
        A. Nichol, P. Dhariwal, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672 (iDDPM:
        learned-range variance, hybrid loss, respacing); J. Song et al., "Denoising Diffusion Implicit
        Models", arXiv 2010.02502 (DDIM); C. Lu et al., "DPM-Solver++", arXiv 2211.01095;
        J. Ho, T. Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598.
Code followed for constants and conventions: facebookresearch/DiT @ ed81ce2, diffusion/ (ADM's code).

Time convention: integer timesteps t = 0 .. T-1 (T = 1000), t = 0 is the least noisy,
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  abar_t = prod_{s<=t} (1 - beta_s)     (DDPM Eq. 4).
The backbone receives the ORIGINAL integer timestep (also when sampling with fewer, respaced steps),
plus `timestep_offset` (1 for U-ViT's 1-indexed checkpoints). Guidance schedules use tau = t / T in [0, 1]
(tau near 1 is pure noise: t = T-1 gives 0.999).

What is inside: one class, GaussianDiffusion, with
    loss(model, x, y, t=None, noise=None)   per-sample L_hybrid = L_simple + L_vlb (iDDPM Sec. 3.1); note the
                                            order: labels y third, t a keyword (ADM's training_losses(model, x, t))
    sample(model, z, y, steps, sampler)     'ddpm' (ancestral, learned variance), 'ddim', 'dpm++' (2M)
    out_channels(C)                         2C with learned sigma (eps and the variance interpolant v)
plus the small helpers it needs (schedules, respacing, KL, discretized Gaussian likelihood, guidance).

Use (any backbone with the contract model(x, t, y) -> (N, out_channels, H, W); dit.py's here):
    import torch; from dit import DiT_models; from ddpm import GaussianDiffusion
    D = GaussianDiffusion()                                    # DiT's: linear betas, learned sigma, T = 1000
    model = DiT_models["DiT-S/8"](input_size=32, in_channels=4, out_channels=D.out_channels(4))
    x, y = torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,))   # a batch of latents and labels
    D.loss(model, x, y)["loss"].mean().backward()              # one training step's loss (t drawn uniformly)
    model.eval()                                               # label dropout off before sampling
    z = D.sample(model, torch.randn(4, 4, 32, 32), y[:4], sampler="dpm++", cfg_scale=4.0)   # (4, 4, 32, 32)

Deviations from the official code (numbers are equal; see test_all.py for the golden values):
    - One class instead of ADM's GaussianDiffusion/SpacedDiffusion/_WrappedModel/enums (same math).
    - Respacing supports one section ("250" or "ddim250" style), not ADM's comma-separated sections.
    - Classifier-free guidance is applied on ALL channels of eps by default; cfg_channels=3 reproduces the
      official DiT/MDT/DiffiT behaviour (guidance on the first 3 latent channels only).
    - DDIM draws noise only when eta > 0 (the official loop draws and discards it every step), and clamps
      1 - abar_prev - sigma^2 at 0: at eta = 1 it is 0 up to float rounding, and a rounding below 0 made the
      official sample NaN (e.g. 2 respaced steps of the cosine schedule).
    - The min(SNR, 5)/SNR weight of MDTv2 on the MSE term is an option (mse_weight='min_snr_5').
    - Model outputs are taken in float32 (a bf16 output is upcast). Float32 runs equal the official ones
      bitwise; float64 inputs are not kept in float64 (the official code keeps them: the two differ by ~1e-7).
"""
import math
import warnings

import numpy as np
import torch

try:
    from tqdm.auto import tqdm
except ImportError:          # progress bars only: the file runs on torch (+ numpy) alone when copied elsewhere
    def tqdm(iterable, **kwargs):
        return iterable


# ---------------------------------------------------------------------------------------------------
# Schedules and respacing (all constants in float64, cast to float32 after the per-t gather, as ADM)
# ---------------------------------------------------------------------------------------------------

def make_betas(schedule, num_timesteps=1000):
    """The T betas, indexed t = 0..T-1 (the paper's beta_1..beta_T). 'linear': 1e-4..0.02 scaled by 1000/T
    (DDPM Sec. 4); 'scaled_linear': Stable Diffusion's sqrt-space linear 0.00085..0.012 (U-ViT's ImageNet
    latents); 'cosine': iDDPM Eq. 17."""
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_timesteps, dtype=np.float64) ** 2
    if schedule == "cosine":
        f = lambda s: math.cos((s / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule!r} (choose linear, scaled_linear, cosine)")


def space_timesteps(num_timesteps, steps):
    """Which original timesteps a respaced chain keeps (iDDPM Sec. 4, ADM's single-section rule).
    steps: int or "N" -> N values from 0 to T-1 with a fractional stride, rounded with Python's round;
    "ddimN" -> the integer stride giving exactly N steps, starting at 0."""
    body = (steps[4:] if steps.startswith("ddim") else steps) if isinstance(steps, str) else None
    if body is not None and not body.isdigit():
        raise ValueError(f"steps must be an integer N or a string 'N' or 'ddimN', got {steps!r} (ADM's "
                         "comma-separated sections are not supported)")
    if body is None and int(steps) != steps:
        raise ValueError(f"steps must be a whole number, got {steps!r}")
    if isinstance(steps, str) and steps.startswith("ddim"):
        n = int(steps[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make {n} DDIM steps out of {num_timesteps}")
    n = int(steps)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {n}")
    stride = (num_timesteps - 1) / (n - 1) if n > 1 else 1
    kept, cur = [], 0.0
    for _ in range(n):
        kept.append(round(cur))
        cur += stride   # accumulated float, as the official code (gives 0, 4, 8, ..., 995, 999 for 250)
    return kept


def chain_constants(betas):
    """Every per-step constant of the forward process q and posterior q(x_{t-1}|x_t, x_0) (DDPM Eqs. 6-7)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)                        # beta~_t, DDPM Eq. 7
    v1 = post_var[1] if len(betas) > 1 else betas[0]                            # a 1-step chain has no beta~_1
    return dict(
        betas=betas, log_betas=np.log(betas), abar=abar, abar_prev=abar_prev,
        sqrt_abar=np.sqrt(abar), sqrt_1m_abar=np.sqrt(1.0 - abar),
        sqrt_recip_abar=np.sqrt(1.0 / abar), sqrt_recipm1_abar=np.sqrt(1.0 / abar - 1.0),
        post_var=post_var, snr=abar / (1.0 - abar),                            # SNR_t = abar / (1 - abar)
        post_logvar_clipped=np.log(np.append(v1, post_var[1:])),               # beta~_0 = 0: use beta~_1
        logvar_large=np.log(np.append(v1, betas[1:])),                          # sigma_t^2 = beta_t (ADM 'fixed large')
        post_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),                   # x_0 coefficient, Eq. 7
        post_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),          # x_t coefficient, Eq. 7
    )


# ---------------------------------------------------------------------------------------------------
# Likelihood terms of L_vlb (DDPM Eq. 5, iDDPM Sec. 3.1)
# ---------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) with the tanh approximation used by the official code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_loglik(x, mean, log_scale):
    """log P(x) of a Gaussian integrated over the 8-bit bin of x in [-1, 1] (DDPM Sec. 3.3, L_0);
    the outer bins extend to -inf / +inf. Applied to latents too, as the official code does."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    """Mean over all non-batch dimensions -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance (CFG paper Eq. 6), shared by every sampler of this file
# ---------------------------------------------------------------------------------------------------

def guidance_weight(cfg_scale, tau, scale_pow=None, interval=None):
    """The guidance weight w at noise level tau in [0, 1] (1 = pure noise).
    scale_pow: MDT's power-cosine schedule w(tau) = 1 + (w - 1) * (1 - cos(pi * (1 - tau)^pow)) / 2
    (MDT v1 App. D "Improved classifier-free guidance"; w ramps from 1 at tau = 1 to w at tau = 0).
    interval (lo, hi): guidance only for lo <= tau <= hi (Kynkaanniemi et al., arXiv 2404.07724)."""
    if interval is not None and not interval[0] <= tau <= interval[1]:
        return 1.0
    if scale_pow is not None:
        return 1.0 + (cfg_scale - 1.0) * 0.5 * (1.0 - math.cos(math.pi * (1.0 - tau) ** scale_pow))
    return cfg_scale


def warn_if_training(model):
    """A backbone left in train mode keeps dropping labels (and any dropout) while it samples: say so."""
    if getattr(model, "training", False):
        warnings.warn("sampling a model in train mode: its label dropout stays on (call model.eval() first)",
                      stacklevel=4)   # the caller of sample(), under its no_grad wrapper


def guided_model(model, x, t, y, w, cfg_channels=None, model_kwargs=None):
    """Model output with classifier-free guidance weight w: uncond + w * (cond - uncond) on the first
    cfg_channels output channels (default: all C channels of x); the remaining channels (e.g. learned
    variance) come from the conditional pass. The null label is model.num_classes. w == 1: one plain pass."""
    kw = model_kwargs or {}
    if w == 1.0:
        return model(x, t, y, **kw)
    if getattr(model, "class_dropout_prob", None) == 0:       # our backbones keep a null row only with dropout
        raise ValueError("guidance (w != 1) needs a model trained with label dropout: this one has no null label")
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **kw).float()   # fp32 mix
    cond, uncond = out.chunk(2)
    k = x.shape[1] if cfg_channels is None else cfg_channels
    guided = uncond[:, :k] + w * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with epsilon prediction and (optionally) learned-range variance."""

    def __init__(self, num_timesteps=1000, beta_schedule="linear", learn_sigma=True, fixed_variance="large",
                 timestep_offset=0, mse_weight=None):
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        if mse_weight not in (None, "min_snr_5"):
            raise ValueError(f"mse_weight must be None or 'min_snr_5', got {mse_weight!r}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance      # used when the model predicts eps only
        self.timestep_offset = timestep_offset    # added to t before the backbone sees it
        self.mse_weight = mse_weight
        self.base = chain_constants(make_betas(beta_schedule, num_timesteps))
        self._chains = {}                         # respaced chains, keyed by steps
        self._torch = {}                          # float64 tensors per (id of the table, name, device)

    def out_channels(self, in_channels):
        return 2 * in_channels if self.learn_sigma else in_channels

    def __getstate__(self):
        """A copy (deepcopy, pickle) starts with an empty device cache: its keys are id()s of this object's
        tables, which a copy's own tables could take over once this object is freed."""
        return {**self.__dict__, "_torch": {}}

    # --- constants ---------------------------------------------------------------------------------

    def respaced(self, steps):
        """(original timesteps kept, constants of the respaced chain). New betas from abar ratios
        (iDDPM Sec. 4): beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}."""
        key = str(steps)
        if key not in self._chains:
            kept = space_timesteps(self.num_timesteps, steps)
            abar = self.base["abar"][kept]
            betas = 1.0 - abar / np.append(1.0, abar[:-1])
            self._chains[key] = (kept, chain_constants(betas))
        return self._chains[key]

    def gather(self, consts, name, t, x):
        """consts[name][t] as float32, shaped (N, 1, 1, 1) to broadcast against x."""
        key = (id(consts), name, t.device)
        if key not in self._torch:
            self._torch[key] = torch.from_numpy(consts[name]).to(t.device)
        return self._torch[key][t].float().view(-1, *([1] * (x.ndim - 1)))

    def model_t(self, kept, t):
        """Timestep the backbone sees: the original timestep of respaced index t, plus the offset."""
        key = ("kept", id(kept), t.device)
        if key not in self._torch:
            self._torch[key] = torch.tensor(kept, device=t.device)
        return self._torch[key][t] + self.timestep_offset

    # --- forward process and the model's reverse step ------------------------------------------------

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM Eq. 4)."""
        return self.gather(self.base, "sqrt_abar", t, x0) * x0 + self.gather(self.base, "sqrt_1m_abar", t, x0) * noise

    def p_mean_variance(self, c, out, x, t, clip_denoised=False):
        """Mean and log-variance of p(x_{t-1} | x_t) from the model output (iDDPM Eqs. 13 and 15), plus x0_hat."""
        C = x.shape[1]
        eps = out[:, :C]
        x0 = self.gather(c, "sqrt_recip_abar", t, x) * x - self.gather(c, "sqrt_recipm1_abar", t, x) * eps  # Eq. 15 of DDPM
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = self.gather(c, "post_coef1", t, x) * x0 + self.gather(c, "post_coef2", t, x) * x            # DDPM Eq. 7
        if self.learn_sigma:
            if out.shape[1] < 2 * C:          # as loss(): no silent fallback to a fixed variance
                raise ValueError(f"the model gives {out.shape[1]} output channels; this objective needs {2 * C} "
                                 f"(learn_sigma: eps and the variance for {C} channels)")
            frac = (out[:, C:2 * C] + 1) / 2                   # v in [-1, 1] -> interpolation weight (not clamped)
            logvar = frac * self.gather(c, "log_betas", t, x) + (1 - frac) * self.gather(c, "post_logvar_clipped", t, x)  # iDDPM Eq. 15
        elif self.fixed_variance == "small":
            logvar = self.gather(c, "post_logvar_clipped", t, x).expand_as(x)
        else:
            logvar = self.gather(c, "logvar_large", t, x).expand_as(x)
        return mean, logvar, x0

    # --- training -----------------------------------------------------------------------------------

    def loss(self, model, x, y, t=None, noise=None, model_kwargs=None):
        """Per-sample training loss. learn_sigma: L_hybrid = L_simple + L_vlb with the stop-gradient on eps
        inside L_vlb (iDDPM Sec. 3.1; weight 1 per timestep as DiT). Otherwise L_simple (DDPM Eq. 14).
        Returns dict(loss=(N,), mse=(N,), vb=(N,) when learned)."""
        N = x.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (N,), device=x.device)
        if noise is None:
            noise = torch.randn_like(x)
        x_t = self.q_sample(x, t, noise)
        out = model(x_t, t + self.timestep_offset, y, **(model_kwargs or {}))
        C = x.shape[1]
        if out.shape[1] < self.out_channels(C):
            raise ValueError(f"the model gives {out.shape[1]} output channels; this objective needs "
                             f"{self.out_channels(C)} (learn_sigma: eps and the variance for {C} channels)")
        mse = mean_flat((noise - out[:, :C].float()) ** 2)                     # L_simple, DDPM Eq. 14
        if self.mse_weight == "min_snr_5":                                    # MDTv2: min(SNR, 5) / SNR
            snr = self.gather(self.base, "snr", t, x).view(-1)
            mse = mse * snr.clamp(max=5.0) / snr
        terms = dict(mse=mse, loss=mse)
        if self.learn_sigma:
            frozen = torch.cat([out[:, :C].detach(), out[:, C:2 * C]], dim=1).float()  # stop-grad on the mean
            terms["vb"] = self.vb_terms_bpd(frozen, x, x_t, t)
            terms["loss"] = mse + terms["vb"]
        return terms

    def vb_terms_bpd(self, out, x0, x_t, t):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL L_0 at t = 0,
        in bits per dimension (DDPM Eq. 5)."""
        c = self.base
        true_mean = self.gather(c, "post_coef1", t, x0) * x0 + self.gather(c, "post_coef2", t, x0) * x_t
        true_logvar = self.gather(c, "post_logvar_clipped", t, x0)
        mean, logvar, _ = self.p_mean_variance(c, out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_loglik(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # --- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, z, y, steps=None, sampler="ddpm", eta=0.0, cfg_scale=1.0, cfg_channels=None,
               scale_pow=None, guidance_interval=None, clip_denoised=False, model_kwargs=None, progress=False):
        """Draw samples starting from noise z (N, C, H, W) with labels y (N,).
        sampler: 'ddpm' (ancestral, iDDPM's learned variance; the DiT default with steps=250),
                 'ddim' (eta = 0 deterministic; DDIM Eq. 12), 'dpm++' (DPM-Solver++(2M), ~20-50 steps).
        steps: model evaluations (default 250, or T if T < 250; 25 for dpm++); ddim also takes "ddimN" (an integer
        stride). Call model.eval() first: a model in train mode keeps dropping labels (a warning says so).
        eta applies to ddim only (eta = 1 draws DDPM's posterior variance), clip_denoised to ddpm and ddim."""
        warn_if_training(model)
        if sampler == "dpm++":
            return self.sample_dpmpp(model, z, y, 25 if steps is None else steps, cfg_scale, cfg_channels, scale_pow, guidance_interval,
                                     model_kwargs, progress)
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r} (choose ddpm, ddim, dpm++)")
        kept, c = self.respaced(min(250, self.num_timesteps) if steps is None else steps)
        if len(kept) < 2:     # the official respacing of 1 step keeps t = 0 alone: one call on pure noise returns it
            raise ValueError(f"{sampler} needs steps >= 2 (1 step keeps only t = 0 and returns the noise), got {steps}")
        x = z
        for i in tqdm(list(reversed(range(len(kept)))), disable=not progress, desc=sampler):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            w = guidance_weight(cfg_scale, kept[i] / self.num_timesteps, scale_pow, guidance_interval)
            out = guided_model(model, x, self.model_t(kept, t), y, w, cfg_channels, model_kwargs).float()
            mean, logvar, x0 = self.p_mean_variance(c, out, x, t, clip_denoised)
            if sampler == "ddpm":
                noise = torch.randn_like(x)                                   # drawn every step, as ADM
                x = mean + (i > 0) * torch.exp(0.5 * logvar) * noise          # Alg. 2 of DDPM
            else:
                abar, abar_prev = self.gather(c, "abar", t, x), self.gather(c, "abar_prev", t, x)
                eps = (self.gather(c, "sqrt_recip_abar", t, x) * x - x0) / self.gather(c, "sqrt_recipm1_abar", t, x)
                sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)  # DDIM Eq. 16
                # DDIM Eq. 12; at eta = 1, 1 - abar_prev - sigma^2 is 0 up to rounding: clamped, not NaN
                x = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
                if eta > 0 and i > 0:
                    x = x + sigma * torch.randn_like(x)
        return x

    @torch.no_grad()
    def sample_dpmpp(self, model, z, y, steps=25, cfg_scale=1.0, cfg_channels=None, scale_pow=None,
                     guidance_interval=None, model_kwargs=None, progress=False):
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in data prediction on this discrete schedule, as diffusers'
        DPMSolverMultistepScheduler with its defaults (timestep_spacing 'linspace', final_sigmas_type 'zero'):
        `steps` model evaluations at round(linspace(0, T-1, steps+1))[::-1][:-1], i.e. from T-1 down to
        round((T-1) / steps); first-order first and last steps, the last one to sigma = 0, so the result is the
        final x0 estimate. (A grid ending with an evaluation at t = 0, reached by a 2M step across lambda 1.9 ->
        4.6 with extrapolation weight 2, had 2 to 100 times this grid's error on an exact Gaussian model at 10 to
        50 steps of the linear schedule, 1.2 to 1.6 times with the scaled-linear one.)"""
        T = self.num_timesteps
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps < T:
            raise ValueError(f"dpm++ steps must be an integer in [1, {T - 1}], got {steps!r}")
        ts = np.round(np.linspace(0, T - 1, steps + 1)).astype(np.int64)[::-1][:-1]   # diffusers' 'linspace'
        abar = self.base["abar"]
        alpha = lambda s: math.sqrt(abar[s])          # alpha_t, sigma_t of x_t = alpha_t x0 + sigma_t eps
        sigma = lambda s: math.sqrt(1 - abar[s])
        lam = lambda s: math.log(alpha(s) / sigma(s))  # lambda_t = log(alpha_t / sigma_t)
        x, x0_prev, h_prev = z, None, None
        for i in tqdm(range(steps), disable=not progress, desc="dpm++"):
            s = int(ts[i])
            t = torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)
            w = guidance_weight(cfg_scale, s / self.num_timesteps, scale_pow, guidance_interval)
            eps = guided_model(model, x, t + self.timestep_offset, y, w, cfg_channels, model_kwargs).float()[:, :x.shape[1]]
            x0 = (x - sigma(s) * eps) / alpha(s)                                # data prediction
            if i == steps - 1:
                return x0                                                       # sigma_next = 0: x_next = x0 estimate
            s_next = int(ts[i + 1])
            h = lam(s_next) - lam(s)
            if x0_prev is None:                                                 # first step: DPM-Solver++(1) = DDIM
                d = x0
            else:                                                               # 2M: Alg. 2, r = h_prev / h
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma(s_next) / sigma(s)) * x - alpha(s_next) * math.expm1(-h) * d   # DPM-Solver++ Alg. 2
            x0_prev, h_prev = x0, h
        return x


if __name__ == "__main__":
    diffusion = GaussianDiffusion()
    print("abar_999 =", diffusion.base["abar"][999], "(official 4.0358e-05)")
    print("respaced '250' first/last:", space_timesteps(1000, 250)[:4], space_timesteps(1000, 250)[-3:])
    # A golden hybrid-loss value computed with the official DiT diffusion code (gaussian_diffusion.py) on these inputs
    x0 = (2 * torch.arange(32.0) / 31 - 1).reshape(2, 4, 2, 2)
    noise = torch.cos(torch.arange(32.0)).reshape(2, 4, 2, 2)
    out = (0.5 * torch.sin(torch.arange(64.0))).reshape(2, 8, 2, 2)
    fake = lambda x, t, y: out
    terms = diffusion.loss(fake, x0, None, t=torch.tensor([0, 500]), noise=noise)
    print("loss at t=[0,500]:", terms["loss"].tolist(), "(official [2.70188451, 0.78515083])")
    assert torch.allclose(terms["loss"], torch.tensor([2.70188451, 0.78515083]), rtol=1e-5), "golden loss differs"
