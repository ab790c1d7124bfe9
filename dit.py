"""
DiT: the Diffusion Transformer backbone with adaLN-Zero conditioning.

Paper:  W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023, arXiv 2212.09748
        (https://arxiv.org/abs/2212.09748).
Code:   facebookresearch/DiT @ ed81ce2 (models.py), read for names, shapes and constants only.
        SiT (arXiv 2401.08740, willisma/SiT) uses this exact network, so its checkpoint loads here too.

What is inside (top to bottom):
    timestep_embedding / sincos_pos_embed_2d   sinusoidal tables (Sec. 3.2 "Patchify"; App. A for t)
    PatchEmbed, TimestepEmbedder, LabelEmbedder   the three input embedders (Fig. 3)
    Attention, Mlp                              the transformer sub-layers, written out (SDPA attention)
    DiTBlock                                    adaLN-Zero block (Sec. 3.2, Fig. 3 right)
    FinalLayer                                  adaLN + linear decoder to p*p*C_out per token (Sec. 3.2)
    DiT                                         the model: patchify -> blocks -> unpatchify
    DiT_models                                  the 12 configs of Tab. 1/Tab. 4 plus DiT-Tiny/2, ours for CPU runs

Contract with the objectives (ddpm.py, sit.py): model(x, t, y) -> (N, out_channels, H, W).
    x: (N, C, H, W) image or latent; t: (N,) time value as the objective passes it (ddpm: integer
    timestep 0..999; sit: float in [0, 1]); y: (N,) int64 labels, y == num_classes is the null label
    of classifier-free guidance. out_channels is chosen by the objective (2C for learned sigma).

Letters in shape comments: N batch, C channels, H/W height/width, p patch size, h/w = H/p, W/p,
T = h*w tokens, D hidden size.

Deviations from the official code (none change the math or the state-dict keys):
    - Attention, Mlp and PatchEmbed are written here instead of imported from timm; attention uses
      F.scaled_dot_product_attention (equal to softmax(q k^T / sqrt(d)) v, tested).
    - No forward_with_cfg: classifier-free guidance lives in the objectives, once for every backbone
      (the official 3-channel guidance quirk is available there behind a flag).
    - out_channels is an explicit argument instead of learn_sigma (learn_sigma=True <=> out_channels=2C).
    - Optional gradient checkpointing of the blocks (off by default), as in fast-DiT.
    - PatchEmbed returns contiguous tokens; the official code keeps timm's transposed view, which every
      LayerNorm then copies, forward and backward (same values; 5% of a CPU training step of DiT-Tiny/2).
    - The module construction and init order follow the official code, so torch.manual_seed(s) gives
      the same initial weights as the official DiT built with the same seed (tested locally).
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ---------------------------------------------------------------------------------------------------
# Sinusoidal tables
# ---------------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """(N,) time values -> (N, dim) features [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half), in fp32."""
    if t.dim() != 1:
        raise ValueError(f"t must hold one time per sample, shape (N,); got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                      # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first (the DiT/ADM convention)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_1d(pos, dim):
    """(M,) positions -> (M, dim) float64 table [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.outer(pos.astype(np.float64), omega)                # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)    # sin first (the MAE convention)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D position table (T, dim), T = grid_size^2 in row-major token order.
    The first dim/2 channels encode the column (x) index, the last dim/2 the row (y) index (as MAE/DiT)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # (g, g) each
    return np.concatenate([sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)], axis=1)


def modulate(x, shift, scale):
    """adaLN modulation (Sec. 3.2): x * (1 + scale) + shift, with (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Patchify (Sec. 3.2): (N, C, H, W) -> (N, T, D) with a p x p stride-p convolution, row-major tokens."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # (N, D, h, w) -> (N, T, D), copied to a contiguous tensor: as a transposed view it would make every
        # LayerNorm of the network copy it again, in the forward and in the backward (same values either way)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal frequencies -> Linear -> SiLU -> Linear -> (N, D)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (N, D), with an extra null row (index num_classes) for guidance when dropout_prob > 0.
    In training mode each label is replaced by the null label with probability dropout_prob."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (a class-conditional backbone), got {num_classes}")
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y):
        if y is None:
            raise ValueError(f"this backbone is class-conditional: pass labels y (N,) in 0..{self.num_classes - 1}"
                             + (f", or {self.num_classes} for the null label" if self.dropout_prob > 0 else ""))
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# ---------------------------------------------------------------------------------------------------
# Transformer sub-layers
# ---------------------------------------------------------------------------------------------------

def attention_reference(q, k, v):
    """The explicit formula softmax(q k^T / sqrt(d)) v, for tests; q, k, v: (N, heads, T, d)."""
    w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, heads, T, T)
    return w.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q, k, v as in timm)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        # (N, T, 3D) -> (3, N, h, T, D/h): q, k, v per head; SDPA's output goes back to (N, T, D)
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                          # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)      # == attention_reference(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------------
# DiT block and final layer
# ---------------------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    """adaLN-Zero block (Sec. 3.2): c regresses shift/scale/gate for both sub-layers; the gates are
    zero-initialised, so every block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear decoder to p*p*C_out values per token (Sec. 3.2)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion Transformer: (x, t, y) -> (N, out_channels, H, W)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, out_channels=None, hidden_size=1152,
                 depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 grad_checkpointing=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if out_channels is None else out_channels  # official: learn_sigma
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.num_heads = num_heads
        self.grad_checkpointing = grad_checkpointing

        # registration order = the official one (keeps seeded initialisation identical)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # frozen, but a parameter (not a buffer) so the official state dicts load with strict=True
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation (Sec. 3.2 "adaLN-Zero", Sec. 4 "Training"; order matters for seeded runs)."""
        def basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(basic_init)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data  # patch conv initialised like a Linear on (D, C*p*p)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)   # adaLN-Zero: every gate starts at 0
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # the model outputs exactly 0 at init
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C_out) -> (N, C_out, H, W); each token's vector is ordered (p_row, p_col, channel)."""
        N, T, _ = x.shape
        p, c = self.patch_size, self.out_channels
        h = w = int(T ** 0.5)
        x = x.reshape(N, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)           # (N, C_out, h, p, w, p)
        return x.reshape(N, c, h * p, w * p)

    def forward(self, x, t, y):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"DiT built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        x = self.x_embedder(x) + self.pos_embed          # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)      # (N, D), Fig. 3: conditioning = t_emb + y_emb
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)                       # (N, T, p*p*C_out)
        return self.unpatchify(x)                        # (N, C_out, H, W)


# ---------------------------------------------------------------------------------------------------
# Registry: paper names (Tab. 1 sizes, Tab. 4 patch sizes). Parameter counts at input_size=32
# (256px latents), 2C outputs, pos_embed included -- asserted in test_all.py.
# ---------------------------------------------------------------------------------------------------

_XL = dict(depth=28, hidden_size=1152, num_heads=16)
_L = dict(depth=24, hidden_size=1024, num_heads=16)
_B = dict(depth=12, hidden_size=768, num_heads=12)
_S = dict(depth=12, hidden_size=384, num_heads=6)

DiT_models = {
    "DiT-XL/2": partial(DiT, patch_size=2, **_XL),   # 675,129,632
    "DiT-XL/4": partial(DiT, patch_size=4, **_XL),   # 675,074,432
    "DiT-XL/8": partial(DiT, patch_size=8, **_XL),   # 675,683,072
    "DiT-L/2": partial(DiT, patch_size=2, **_L),     # 458,102,816
    "DiT-L/4": partial(DiT, patch_size=4, **_L),     # 458,053,760
    "DiT-L/8": partial(DiT, patch_size=8, **_L),     # 458,594,816
    "DiT-B/2": partial(DiT, patch_size=2, **_B),     # 130,512,416
    "DiT-B/4": partial(DiT, patch_size=4, **_B),     # 130,475,648
    "DiT-B/8": partial(DiT, patch_size=8, **_B),     # 130,881,536
    "DiT-S/2": partial(DiT, patch_size=2, **_S),     # 32,963,360
    "DiT-S/4": partial(DiT, patch_size=4, **_S),     # 32,945,024
    "DiT-S/8": partial(DiT, patch_size=8, **_S),     # 33,148,160
    # ours, not in the paper: for CPU runs on the 8x8 digits (16 tokens at p=2)
    "DiT-Tiny/2": partial(DiT, patch_size=2, depth=4, hidden_size=128, num_heads=4),
}


if __name__ == "__main__":
    torch.manual_seed(0)
    for name in ["DiT-XL/2", "DiT-S/2", "DiT-Tiny/2"]:
        with torch.device("meta"):
            m = DiT_models[name](input_size=32)
        print(f"{name:12s} {sum(p.numel() for p in m.parameters()):>13,d} parameters at 32x32x4 latents")
    model = DiT_models["DiT-Tiny/2"](input_size=8, in_channels=1, num_classes=10).eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    out = model(x, t, y)
    assert out.shape == (4, 2, 8, 8) and out.abs().max() == 0, "adaLN-Zero: output must be 0 at init"
    print("DiT-Tiny/2 on (4, 1, 8, 8):", tuple(out.shape), "zero at init: ok")
