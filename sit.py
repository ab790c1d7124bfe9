"""
The SiT interpolant objective: stochastic interpolants trained by regression, sampled by ODE or SDE.

Paper: N. Ma, M. Goldstein, M. Albergo, N. Boffi, E. Vanden-Eijnden, S. Xie, "SiT: Exploring Flow and
       Diffusion-based Generative Models with Scalable Interpolant Transformers", arXiv 2401.08740
       (https://arxiv.org/abs/2401.08740, v2).
Code followed for conventions and constants: willisma/SiT @ 947f95b (transport/).
The backbone is any model of this library (SiT's network is exactly DiT, see dit.py).

TIME CONVENTION (the official code's, which the released SiT-XL/2 checkpoint was trained with):
    t = 0 is pure noise, t = 1 is data;  x_t = alpha_t * x1 + sigma_t * x0,  x0 ~ N(0, I) noise, x1 data.
    The paper writes the same path with time reversed (paper t = 1 - code t, Eq. 1: x_t = alpha_t x_* + sigma_t eps
    with alpha_0 = 1). The backbone receives the raw code t in [0, 1] (not x1000).
Paths (alpha = data coefficient, sigma = noise coefficient; Sec. 2.3, Eqs. 11-12; their FIDs in Tab. 4):
    Linear  alpha = t,            sigma = 1 - t
    GVP     alpha = sin(pi t / 2), sigma = cos(pi t / 2)
    VP      alpha = exp(m(t)), sigma = sqrt(1 - alpha^2), m(t) = -(1-t)^2 (smax - smin) / 4 - (1-t) smin / 2,
            smin = 0.1, smax = 20 (the VP SDE of Song et al., beta(s) = smin + s (smax - smin), s = 1 - t)
Targets (Sec. 2.2): velocity u_t = dalpha x1 + dsigma x0 (Eq. 7); score s = -x0 / sigma_t (Eq. 6); noise x0.
Probability-flow drift v = -f + g s with f = -(dalpha/alpha) x and g = (dalpha/alpha) sigma^2 - sigma dsigma
(VP: f = -beta x / 2, g = beta / 2). SDE (Eq. 4): dX = [v + D(t) s] dt + sqrt(2 D(t)) dW, D = w_t / 2.

What is inside: class Transport with
    loss(model, x, y, t=None, noise=None)  per-sample regression loss (Sec. 2.2, Eqs. 6-7)
    sample(model, z, y, method='ode'|'sde', solver=..., num_steps=...)  Euler / Heun / adaptive dopri5 ODE;
                                           Euler-Maruyama / Heun SDE with the last-step options
    out_channels(C) = C (an official learn_sigma checkpoint has 2C outputs: the extra half is ignored)
    Transport(..., time_scale=1, time_reverse=False): the backbone is fed time_scale * t, or time_scale * (1 - t)
                                           (U-ViT-L/2's continuous-time checkpoints: 999, True)
plus classifier-free guidance shared by all samplers (same rules as ddpm.py).

Use (any backbone with the contract model(x, t, y) -> (N, >= C, H, W); dit.py's here, i.e. SiT-S/8):
    import torch; from dit import DiT_models; from sit import Transport
    tr = Transport("Linear", "velocity")                       # SiT's default path and prediction
    model = DiT_models["DiT-S/8"](input_size=32, in_channels=4, out_channels=tr.out_channels(4))
    x, y = torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,))   # a batch of latents and labels
    tr.loss(model, x, y)["loss"].mean().backward()
    model.eval()                                               # label dropout off before sampling
    z = tr.sample(model, torch.randn(4, 4, 32, 32), y[:4], method="ode", solver="heun", num_steps=10,
                  cfg_scale=4.0)                               # (4, 4, 32, 32); SiT's SDE: method="sde"

Deviations from the official code (the numbers of a sampler or loss are otherwise the same):
    - The eps margins: the official create_transport ignores a user train_eps/sample_eps for Linear/GVP
      velocity models and takes sample_eps's default from the wrong condition (`train_eps is None`). Here a
      given value is always used (times in [eps, 1 - eps]; VP [0, 1 - eps]) and each default is taken on its
      own, so the defaults give the official intervals. Linear/GVP score and noise models need eps > 0.
    - SDE with the 'SBDM' diffusion and a Linear/GVP velocity model: the official code starts at t0 = 0,
      where g(t) is infinite, and returns NaN. Here the SDE starts at t0 = 1e-3 in that case (sample_eps = 0).
    - SDE Heun with last_step=None: the official corrector evaluates the score at t = 1 (sigma = 0) on the last
      step; where that is not finite (a Linear model: the official returns NaN), or multiplied by a diffusion
      D(1) that does not vanish (GVP with 'constant', or 'decreasing' at norm != 1: the official diverges),
      that one step is an Euler step here. Otherwise (GVP with sigma, linear, SBDM) it is the official step.
      A last_step_size that leaves no interval (t0 >= t1) is a ValueError (the official asserts t0 < t1).
    - The 'constant' diffusion form and 'increasing-decreasing' work here; the official code fails on both
      (th.sqrt of a Python float; the key spelled 'inccreasing-decreasing').
    - The ODE/SDE samplers refuse num_steps < 2 and the SDE a last step of size 0 (the official ODE returns the
      noise for 1 step; a last step of size 0 evaluates the score at t = 1). VP needs eps > 0 (its dsigma is
      infinite at t = 1); the official defaults are > 0.
    - The velocity model is called once per drift evaluation (the official SDE calls it twice: once for
      the drift, once for the score, with the same output).
    - dopri5 is written here (no torchdiffeq): Dormand-Prince 5(4) with torchdiffeq's error control and step
      rule; it steps onto t1 where torchdiffeq steps past it and interpolates, so the two agree to the requested
      tolerance, not bitwise. `self.nfe` counts evaluations.
    - SDE noise is drawn on the model's device (the official draws it on the CPU, then copies), and for the
      batch itself: with guidance the official draws it for the doubled (cond + uncond) batch.
    - loss() draws t before the noise (the official draws the noise first), so a seeded run is not the
      official's sequence; with t and noise given, the loss is the official one.
    - dopri5 stops with a FloatingPointError at the first non-finite model output (the official keeps
      shrinking the step until it underflows).
    - Guidance on all channels by default; cfg_channels=3 reproduces the official quirk.
    - No likelihood evaluation (the official sample_ode_likelihood) yet.
    - Model outputs and times are taken in float32 (a bf16 output is upcast). Float32 runs equal the official
      ones bitwise; float64 inputs are not kept in float64 (the official keeps most of its terms in float64).
"""
import math
import warnings

import torch

try:
    from tqdm.auto import tqdm
except ImportError:          # progress bars only: the file runs on torch (+ numpy) alone when copied elsewhere
    def tqdm(iterable, **kwargs):
        return iterable


def mean_flat(x):
    """Mean over all non-batch dimensions -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def expand(t, x):
    """(N,) -> (N, 1, 1, 1) to broadcast against x."""
    return t.view(-1, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance (the same rules as ddpm.py; duplicated so that this file stands alone)
# ---------------------------------------------------------------------------------------------------

def guidance_weight(cfg_scale, tau, scale_pow=None, interval=None):
    """Guidance weight at noise level tau in [0, 1] (1 = pure noise; here tau = 1 - t).
    scale_pow: MDT's power-cosine schedule w(tau) = 1 + (w - 1) (1 - cos(pi (1 - tau)^pow)) / 2.
    interval (lo, hi): guide only for lo <= tau <= hi."""
    if interval is not None and not interval[0] <= tau <= interval[1]:
        return 1.0
    if scale_pow is not None:
        return 1.0 + (cfg_scale - 1.0) * 0.5 * (1.0 - math.cos(math.pi * (1.0 - tau) ** scale_pow))
    return cfg_scale


def first_channels(out, C):
    """The model output's first C channels in fp32 (a learned-sigma head's extra ones are not used here)."""
    if out.shape[1] < C:
        raise ValueError(f"the model gives {out.shape[1]} output channels; this objective needs {C}")
    return out[:, :C].float()


def warn_if_training(model):
    """A backbone left in train mode keeps dropping labels (and any dropout) while it samples: say so."""
    if getattr(model, "training", False):
        warnings.warn("sampling a model in train mode: its label dropout stays on (call model.eval() first)",
                      stacklevel=4)   # the caller of sample(), under its no_grad wrapper


def guided_model(model, x, t, y, w, cfg_channels=None, model_kwargs=None):
    """uncond + w (cond - uncond) on the first cfg_channels channels (default: all of x's C), the rest from
    the conditional pass; null label = model.num_classes; w == 1: one plain conditional pass."""
    kw = model_kwargs or {}
    if w == 1.0:
        return model(x, t, y, **kw)
    if getattr(model, "class_dropout_prob", None) == 0:       # our backbones keep a null row only with dropout
        raise ValueError("guidance (w != 1) needs a model trained with label dropout: this one has no null label")
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **kw).float()   # fp32 mix
    cond, uncond = out.chunk(2)
    k = x.shape[1] if cfg_channels is None else cfg_channels
    return torch.cat([uncond[:, :k] + w * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------

class Transport:
    """Interpolant x_t = alpha_t x1 + sigma_t x0 with a velocity, score or noise model."""

    SIGMA_MIN, SIGMA_MAX = 0.1, 20.0       # VP path
    DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")

    def __init__(self, path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                 time_scale=1.0, time_reverse=False):
        if path_type not in ("Linear", "GVP", "VP"):
            raise ValueError(f"unknown path_type {path_type!r} (Linear, GVP, VP)")
        if prediction not in ("velocity", "score", "noise"):
            raise ValueError(f"unknown prediction {prediction!r} (velocity, score, noise)")
        if loss_weight not in (None, "velocity", "likelihood"):
            raise ValueError(f"unknown loss_weight {loss_weight!r} (None, velocity, likelihood)")
        self.path_type, self.prediction, self.loss_weight = path_type, prediction, loss_weight
        # official defaults: VP 1e-5 (train) / 1e-3 (sample); Linear/GVP score/noise 1e-3 / 1e-3; velocity 0 / 0
        if path_type == "VP":
            d_train, d_sample = 1e-5, 1e-3
        elif prediction != "velocity":
            d_train, d_sample = 1e-3, 1e-3
        else:
            d_train, d_sample = 0.0, 0.0
        self.train_eps = d_train if train_eps is None else train_eps
        self.sample_eps = d_sample if sample_eps is None else sample_eps
        if (path_type == "VP" or prediction != "velocity") and min(self.train_eps, self.sample_eps) <= 0:
            raise ValueError(f"train_eps and sample_eps must be > 0 for a {path_type} {prediction} model: "
                             + ("VP's dsigma = -alpha dalpha / sigma is infinite at t = 1 (sigma = 0)" if path_type == "VP"
                                else "its score is singular at t = 1 (sigma = 0) and its drift dalpha / alpha at t = 0"))
        self.nfe = 0   # model evaluations of the last sample() call
        # what the backbone is fed: time_scale * t, or time_scale * (1 - t) with time_reverse (U-ViT's continuous
        # VP checkpoints were trained with 999 * s, s = 1 - t the diffusion time); SiT itself: raw t
        self.time_scale, self.time_reverse = time_scale, time_reverse

    def model_t(self, t):
        return self.time_scale * ((1 - t) if self.time_reverse else t)

    def out_channels(self, in_channels):
        return in_channels

    # --- the path -----------------------------------------------------------------------------------

    def alpha_sigma(self, t):
        """(alpha_t, dalpha_t, sigma_t, dsigma_t) for code time t (any shape)."""
        if self.path_type == "Linear":
            return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
        if self.path_type == "GVP":
            h = math.pi / 2
            return torch.sin(h * t), h * torch.cos(h * t), torch.cos(h * t), -h * torch.sin(h * t)
        s, smin, smax = 1 - t, self.SIGMA_MIN, self.SIGMA_MAX
        m = -0.25 * s ** 2 * (smax - smin) - 0.5 * s * smin        # log alpha_t
        dm = 0.5 * s * (smax - smin) + 0.5 * smin                  # d log alpha_t / dt = beta(1 - t) / 2
        alpha, alpha2 = torch.exp(m), torch.exp(2 * m)             # exp(2m), not alpha^2: sigma near t = 1
        sigma = torch.sqrt(1 - alpha2)                              # as the official code (alpha^2 was 2.4% low)
        return alpha, alpha * dm, sigma, -alpha2 * dm / sigma

    def drift_coeffs(self, t):
        """(a, g) with the probability-flow drift of the forward SDE f = -a x: a = dalpha / alpha and
        g = a sigma^2 - sigma dsigma (VP: a = g = beta / 2)."""
        if self.path_type == "VP":
            beta = self.SIGMA_MIN + (1 - t) * (self.SIGMA_MAX - self.SIGMA_MIN)
            return beta / 2, beta / 2
        alpha, dalpha, sigma, dsigma = self.alpha_sigma(t)
        a = math.pi / (2 * torch.tan(math.pi / 2 * t)) if self.path_type == "GVP" else dalpha / alpha
        return a, a * sigma ** 2 - sigma * dsigma

    def diffusion(self, t, form, norm):
        """D(t) of the sampling SDE (w_t / 2 in the paper's Eq. 4)."""
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "SBDM":
            return norm * self.drift_coeffs(t)[1]
        if form == "sigma":
            return norm * self.alpha_sigma(t)[2]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; choose one of {', '.join(self.DIFFUSION_FORMS)}")

    def interval(self, eps):
        """[t0, t1] of training (eps = train_eps) and of the ODE (eps = sample_eps): VP [0, 1 - eps], else
        [eps, 1 - eps]. With the default eps this is the official check_interval ([0, 1] for Linear/GVP velocity)."""
        return (0.0, 1 - eps) if self.path_type == "VP" else (eps, 1 - eps)

    # --- training -----------------------------------------------------------------------------------

    def loss(self, model, x, y, t=None, noise=None, model_kwargs=None):
        """Per-sample loss (Sec. 2.2, Eqs. 6-7): velocity ||v - u_t||^2; score ||sigma s + x0||^2; noise ||eps - x0||^2,
        the last two optionally weighted by (g / sigma)^2 ('velocity') or g / sigma^2 ('likelihood') as the
        official code does."""
        x1 = x
        if t is None:
            t0, t1 = self.interval(self.train_eps)
            t = torch.rand(x1.shape[0], device=x1.device) * (t1 - t0) + t0
        x0 = torch.randn_like(x1) if noise is None else noise
        te = expand(t.float(), x1)
        alpha, dalpha, sigma, dsigma = self.alpha_sigma(te)
        x_t = alpha * x1 + sigma * x0                                  # Eq. 1 (code time)
        out = first_channels(model(x_t, self.model_t(t), y, **(model_kwargs or {})), x1.shape[1])
        if self.prediction == "velocity":
            return dict(loss=mean_flat((out - (dalpha * x1 + dsigma * x0)) ** 2))   # Eq. 7
        g = self.drift_coeffs(te)[1]
        w = {None: 1.0, "velocity": (g / sigma) ** 2, "likelihood": g / sigma ** 2}[self.loss_weight]
        target = out * sigma + x0 if self.prediction == "score" else out - x0
        return dict(loss=mean_flat(w * target ** 2))

    # --- the model as a drift and a score ----------------------------------------------------------------

    def velocity_and_score(self, model, x, t, y, w, cfg_channels, model_kwargs, need_score):
        """Probability-flow velocity v(x, t) and (if needed) the score, from one (guided) model call."""
        self.nfe += 1
        tb = torch.full((x.shape[0],), float(t), device=x.device)
        out = first_channels(guided_model(model, x, self.model_t(tb), y, w, cfg_channels, model_kwargs), x.shape[1])
        te = expand(tb, x)
        alpha, dalpha, sigma, dsigma = self.alpha_sigma(te)
        if self.prediction == "velocity":
            v = out
            if not need_score:
                return v, None
            r = alpha / dalpha                                          # score from velocity (official path.py)
            return v, (r * v - x) / (sigma ** 2 - r * dsigma * sigma)
        a, g = self.drift_coeffs(te)
        score = out if self.prediction == "score" else -out / sigma    # noise model: s = -eps / sigma
        return a * x + g * score, score                                 # v = -f + g s

    # --- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, z, y, method="sde", solver="euler", num_steps=250, atol=1e-6, rtol=1e-3,
               diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04,
               cfg_scale=1.0, cfg_channels=None, scale_pow=None, guidance_interval=None, model_kwargs=None,
               progress=False):
        """Integrate from noise z (t = t0) to data (t = 1). Steps follow the official grid
        t = linspace(t0, t1, num_steps), i.e. num_steps - 1 steps (+ the SDE's last step).
        ODE solvers: 'euler', 'heun' (2nd order, 2 evaluations per step), 'dopri5' (adaptive; num_steps unused;
        under bf16 autocast its rtol 1e-3 is finer than the model's output precision, so it takes more steps: 56
        vs 44 evaluations in fp32 for 16 samples of a digits DiT-Tiny/2).
        SDE solvers: 'euler' (Euler-Maruyama), 'heun'; diffusion_form: constant, SBDM, sigma (the official CLI
        default), linear, decreasing, increasing-decreasing; last_step: 'Mean', 'Tweedie', 'Euler' or None."""
        warn_if_training(model)
        self.nfe = 0
        guide = dict(cfg_scale=cfg_scale, cfg_channels=cfg_channels, scale_pow=scale_pow,
                     guidance_interval=guidance_interval, model_kwargs=model_kwargs)
        if method == "ode":
            return self.sample_ode(model, z, y, guide, solver, num_steps, atol, rtol, progress)
        if method == "sde":
            return self.sample_sde(model, z, y, guide, solver, num_steps, diffusion_form, diffusion_norm, last_step,
                                   last_step_size, progress)
        raise ValueError(f"unknown method {method!r} (ode, sde)")

    def field(self, model, x, t, y, guide, need_score=False):
        """The (guided) velocity at time t, and the score if needed; guide: the guidance arguments of sample()."""
        w = guidance_weight(guide["cfg_scale"], 1.0 - float(t), guide["scale_pow"], guide["guidance_interval"])
        return self.velocity_and_score(model, x, t, y, w, guide["cfg_channels"], guide["model_kwargs"], need_score)

    def sample_ode(self, model, z, y, guide, solver, num_steps, atol, rtol, progress):
        """The probability-flow ODE dx = v(x, t) dt from t0 to t1 (the official sample_ode)."""
        t0, t1 = self.interval(self.sample_eps)
        if solver == "dopri5":
            return self.dopri5(lambda x, t: self.field(model, x, t, y, guide)[0], z, t0, t1, atol, rtol)
        if solver not in ("euler", "heun"):
            raise ValueError(f"unknown ODE solver {solver!r} (euler, heun, dopri5)")
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 for the ODE (the grid has num_steps points), got {num_steps}")
        ts = torch.linspace(t0, t1, num_steps)
        x = z
        for i in tqdm(range(num_steps - 1), disable=not progress, desc=f"ode-{solver}"):
            t, dt = ts[i].item(), (ts[i + 1] - ts[i]).item()
            k1 = self.field(model, x, t, y, guide)[0]
            if solver == "euler":
                x = x + dt * k1
            else:                                                  # Heun: trapezoid with an Euler predictor
                x = x + 0.5 * dt * (k1 + self.field(model, x + dt * k1, ts[i + 1].item(), y, guide)[0])
        return x

    def sde_drift(self, model, x, t, y, guide, diffusion_form, diffusion_norm):
        """The reverse SDE's drift v + D s (Eq. 4), D = the diffusion coefficient w(t) of diffusion_form."""
        v, s = self.field(model, x, t, y, guide, need_score=True)
        return v + self.diffusion(torch.tensor(t), diffusion_form, diffusion_norm).item() * s

    def sample_sde(self, model, z, y, guide, solver, num_steps, diffusion_form, diffusion_norm, last_step,
                   last_step_size, progress):
        """dx = (v + D s) dt + sqrt(2 D) dW from t0 to t1, then a noise-free last step (the official sample_sde)."""
        if solver not in ("euler", "heun"):
            raise ValueError(f"unknown SDE solver {solver!r} (euler, heun)")
        if last_step not in ("Mean", "Tweedie", "Euler", None):
            raise ValueError(f"unknown last_step {last_step!r} (Mean, Tweedie, Euler, None)")
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 for the SDE (the grid has num_steps points), got {num_steps}")
        if last_step is not None and not last_step_size > 0:   # a 0-size last step would evaluate the score at t = 1
            raise ValueError(f"last_step_size must be > 0 for last_step={last_step!r} (or last_step=None), "
                             f"got {last_step_size}")
        size = last_step_size if last_step is not None else 0.0
        t0 = self.interval(self.sample_eps)[0]
        if t0 == 0 and self.path_type != "VP" and diffusion_form == "SBDM":
            t0 = 1e-3                                              # SBDM's D(t) = g(t) is infinite at t = 0
        t1 = 1 - size if size > 0 else 1 - self.sample_eps
        if not t0 < t1:
            raise ValueError(f"the SDE runs from t0 = {t0:g} to t1 = {t1:g}, which must be later: last_step_size "
                             f"{last_step_size} leaves no interval")
        # Heun's corrector at t = 1 (last_step=None) meets the score, singular there (sigma = 0), times D(1)
        D1 = self.diffusion(torch.tensor(t1), diffusion_form, diffusion_norm).item() if t1 >= 1.0 else 0.0
        sigma1 = self.alpha_sigma(torch.tensor(t1))[2].item()     # 0 for Linear at t = 1: its score is infinite
        ts = torch.linspace(t0, t1, num_steps)
        dt = (ts[1] - ts[0]).item()
        drift = lambda x, t: self.sde_drift(model, x, t, y, guide, diffusion_form, diffusion_norm)
        x = z
        for i in tqdm(range(num_steps - 1), disable=not progress, desc=f"sde-{solver}"):
            t = ts[i].item()
            D = self.diffusion(torch.tensor(t), diffusion_form, diffusion_norm).item()
            dw = torch.randn_like(x) * math.sqrt(dt)
            if solver == "euler":                                  # Euler-Maruyama
                x = x + drift(x, t) * dt + math.sqrt(2 * D) * dw
            else:                                                  # stochastic Heun (official integrators.py)
                xhat = x + math.sqrt(2 * D) * dw
                k1 = drift(xhat, t)
                # last_step=None ends at t = 1, where the score is singular: Linear's is inf (the official gives
                # NaN), GVP's finite but ~1e7, harmless only where D(1) vanishes (sigma, linear, SBDM forms; the
                # official diverges for 'constant'). Otherwise that one step is an Euler step, and the corrector it
                # would throw away is not evaluated (the isfinite check below is the safety net for other models).
                at_one = i == num_steps - 2 and t1 >= 1.0
                k2 = None if at_one and (abs(D1) > 1e-6 or sigma1 == 0) else drift(xhat + dt * k1, t + dt)
                if k2 is None or (at_one and not torch.isfinite(k2).all()):
                    x = xhat + dt * k1
                else:
                    x = xhat + 0.5 * dt * (k1 + k2)
        if last_step == "Mean":                                    # a noise-free step of the same SDE drift
            return x + drift(x, t1) * size
        if last_step == "Euler":                                   # a noise-free probability-flow step
            return x + self.field(model, x, t1, y, guide)[0] * size
        if last_step == "Tweedie":                                 # E[x1 | x_t] = (x + sigma^2 s) / alpha
            alpha, _, sigma, _ = self.alpha_sigma(torch.tensor(t1))
            return x / alpha.item() + sigma.item() ** 2 / alpha.item() * self.field(model, x, t1, y, guide, True)[1]
        return x

    def dopri5(self, f, x, t0, t1, atol, rtol, max_steps=10_000):
        """Adaptive Dormand-Prince 5(4) from t0 to t1 (Hairer, Norsett & Wanner, Solving ODEs I, Tab. 5.2)."""
        A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
             [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
             [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
             [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
        c = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
        b5 = A[6] + [0]
        b4 = [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
        norm = lambda v: v.float().pow(2).mean().sqrt().item()     # RMS norm over all elements
        t, k1 = t0, f(x, t0)
        # initial step (Hairer's rule, as torchdiffeq)
        scale = atol + rtol * x.abs()
        d0, d1 = norm(x / scale), norm(k1 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        d2 = norm((f(x + h0 * k1, t0 + h0) - k1) / scale) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1, t1 - t0)
        for _ in range(max_steps):
            if t >= t1 - 1e-12:
                return x
            h = min(h, t1 - t)
            k = [k1]
            for i in range(1, 7):
                xi = x + h * sum(a * kj for a, kj in zip(A[i], k) if a != 0)
                k.append(f(xi, t + c[i] * h))
            x5 = x + h * sum(b * kj for b, kj in zip(b5, k) if b != 0)
            err = h * sum((p - q) * kj for p, q, kj in zip(b5, b4, k) if p != q)
            ratio = norm(err / (atol + rtol * torch.maximum(x.abs(), x5.abs())))
            if not math.isfinite(ratio):                           # a NaN/inf model output: no step size helps
                raise FloatingPointError(f"dopri5: non-finite values at t = {t:.4g} (step {h:.3g}); check the model")
            if ratio <= 1:                                         # accept (FSAL: k7 is the next k1)
                t, x, k1 = t + h, x5, k[6]
            lo = 1.0 if ratio < 1 else 0.2                        # an accepted step never shrinks the next (torchdiffeq)
            h = h * min(10.0, max(lo, 0.9 * ratio ** -0.2)) if ratio > 0 else 10 * h
            if t + h == t:
                raise FloatingPointError(f"dopri5: step size underflow at t = {t:.4g}")
        raise RuntimeError(f"dopri5 did not reach t1 in {max_steps} steps")


if __name__ == "__main__":
    for path in ("Linear", "GVP", "VP"):
        tr = Transport(path_type=path)
        a, da, s, ds = tr.alpha_sigma(torch.tensor(0.3))
        fa, g = tr.drift_coeffs(torch.tensor(0.3))                 # the forward drift is f = -fa x
        print(f"{path:6s} t=0.3: alpha {a:.6f} dalpha {da:.6f} sigma {s:.6f} dsigma {ds:.6f} -a {-fa:.4f} g {g:.4f}")
    # a 1-D Gaussian toy: the exact velocity of N(0,1) -> N(2, 0.25) along the Linear path
    tr = Transport()
    mu, sd = 2.0, 0.5

    class Exact(torch.nn.Module):
        num_classes = 1

        def forward(self, x, t, y):
            te = expand(t, x)
            var = (1 - te) ** 2 + (te * sd) ** 2                   # Var[x_t]
            return mu + (te * sd ** 2 - (1 - te)) / var * (x - te * mu)   # E[u_t | x_t]

    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(20000, dtype=torch.long)
    for kw in [dict(method="ode", solver="dopri5"), dict(method="ode", solver="heun", num_steps=50),
               dict(method="sde", solver="euler", num_steps=250)]:
        x = tr.sample(Exact().eval(), z, y, **kw)
        print(f"{kw}: mean {x.mean():.3f} (2.0), std {x.std():.3f} (0.5), nfe {tr.nfe}")
        assert abs(x.mean() - mu) < 0.03 and abs(x.std() - sd) < 0.03, "the sampler misses N(2, 0.5^2)"
