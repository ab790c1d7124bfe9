"""
DiffiT: Diffusion Vision Transformers with Time-dependent Multi-head Self-Attention (TMSA).

Paper: A. Hatamizadeh, J. Song, G. Liu, J. Kautz, A. Vahdat, "DiffiT: Diffusion Vision Transformers for
       Image Generation", ECCV 2024, arXiv 2312.02139
       (https://arxiv.org/abs/2312.02139, v3).
Code:  NVlabs/DiffiT @ 9f6f0a5 (diffit/diffit.py: the latent model and its sampler only), read for names,
       shapes and constants. There is no official image-space model or trainer: ours follows the paper and
       the choices listed below.

TMSA (Sec. 3.2, Eqs. 3-6): every block projects the spatial tokens x_s AND the time token x_t into q, k, v,
    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt            (Eqs. 3-5)
    Attn = softmax(q k^T / sqrt(d) + B) v,  B a learned relative position bias               (Eq. 6)
so the time token shifts q, k, v of every token by the same per-sample vector (it is not an extra token).
Block (Eqs. 7-8): x = x + TMSA(LN(x), x_t); x = x + MLP(LN(x)). No adaLN anywhere.

What is inside:
    timestep_embedding, sincos_pos_embed_2d, relative_position_index     tables
    TMSA                        the attention above (SDPA with the bias as an additive mask)
    DiffiTBlock                 Eqs. 7-8
    DiffiT                      latent DiffiT (Sec. 3.2 "Latent space"): patchify + fixed sin-cos positions,
                                c = t_emb + y_emb as the time token of every block, 28 global-TMSA blocks,
                                head LN -> SiLU -> Linear, 2C outputs (learned sigma) by default
    window_partition / window_merge, ResBlock, DiffiTUNet
                                image-space DiffiT (Sec. 3.2 "Image space", Fig. 4, Eqs. 9-10): a U-shaped
                                conv/transformer net with local-window TMSA
    DiffiT_models               'DiffiT-XL/2' (latent), 'DiffiT-CIFAR10', 'DiffiT-FFHQ64', and small configs
                                of ours

Letters: N batch, C channels, H/W size, p patch, L tokens, D width, w window side, nW windows per image.

Deviations from the official latent code (keys and outputs equal; checked locally against it):
    - SDPA instead of the written-out softmax; out_channels is an argument (official: learn_sigma).
    - PatchEmbed returns contiguous tokens instead of a transposed view that every LayerNorm copies (same values).
    - No forward_with_cfg: the power-cosine guidance (w = 4.4 at 256px, scale_pow 4, 3 channels) and the
      constant 1.49 at 512px are the shared guidance flags of ddpm.py/sit.py.
Choices for the image-space model (the paper leaves them open; ours, each a constructor argument):
    1. Blocks per level L = 4 at every level (App. H.1), `blocks` argument.
    2. Channels 128 at the first level, 256 after (App. I.1): CIFAR-10 (128, 256, 256) at 32/16/8,
       FFHQ-64 (128, 256, 256, 256) at 64/32/16/8; the last level is the bottleneck, run once.
    3. Skips: per level, the encoder level's output is concatenated to the decoder level's input; the
       first decoder ResBlock maps the concatenation back to the level's width.
    4. ResBlock (Eqs. 9-10): h = Conv3x3(SiLU(GN(x))); out = DiffiTBlock(h, x_t) + shortcut(x), with a
       1x1 conv shortcut when the width changes.
    5. Down: 3x3 conv, stride 2; Up: nearest x2 + 3x3 conv; widths change only inside ResBlocks.
    6. Tokenizer Conv3x3(C_in -> 128); head GN -> SiLU -> Conv3x3(128 -> C_out), zero-initialised.
    7. Head dim 32, MLP ratio 4, GroupNorm 32 groups (eps 1e-6), non-affine LayerNorms in the blocks.
    8. Windows: 4x4 (CIFAR-10), 8x8 (FFHQ-64), non-overlapping, no shift; one Swin-style bias table
       ((2w-1)^2, heads) per block shared by its windows.
    9. Time token: C1-dim sinusoid (C1 = channels[0], 128 in the paper configs) of the time value the
       objective passes -> Linear -> SiLU -> Linear to 512 (Tab. 3 best: time 512). The paper trains with
       EDM's preconditioning and c_noise = ln(sigma)/4; here the model is trained by our objectives (ddpm,
       sit) and embeds their time value instead.
   10. No absolute position embedding (relative bias + convolutions carry position).
   11. Class conditioning (not in the paper's unconditional image models) is optional: num_classes > 0 adds a
       label embedding to the time embedding (null row for guidance), so it also trains on labelled digits.
   12. No dropout and no augmentation-label input (the paper says it follows EDM, whose networks use dropout
       0.13 on CIFAR-10 / 0.05 on FFHQ-64 and take the augmentation labels as an input; not restated in it).
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """(N,) -> (N, dim) = [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half), fp32."""
    if t.dim() != 1:
        raise ValueError(f"t must hold one time per sample, shape (N,); got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def sincos_1d(pos, dim):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim, grid):
    """(g*g, dim), row-major tokens; first dim/2 channels encode the column, last dim/2 the row (MAE/DiT)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)], axis=1)


def relative_position_index(w):
    """(w*w, w*w) index of the offset (dh, dw) between tokens of a w x w window: (dh + w-1)(2w-1) + dw + w-1."""
    h, c = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    h, c = h.reshape(-1), c.reshape(-1)
    return (h[:, None] - h[None, :] + w - 1) * (2 * w - 1) + (c[:, None] - c[None, :] + w - 1)


# ---------------------------------------------------------------------------------------------------
# TMSA and the DiffiT transformer block (shared by both models)
# ---------------------------------------------------------------------------------------------------

def tmsa_reference(x, temb, attn):
    """Eqs. 3-6 written out for tests: separate W_s and W_t products, explicit softmax with the bias."""
    N, L, C = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias + (temb @ attn.qkv_temb.weight.T + attn.qkv_temb.bias)[:, None]
               ).reshape(N, L, 3, h, C // h).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1)) * (C // h) ** -0.5 + attn.bias()
    return attn.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(N, L, C))


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention over a window of w x w tokens (the whole grid for latents)."""

    def __init__(self, dim, temb_dim, num_heads, window):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.window = num_heads, window
        self.qkv_temb = nn.Linear(temb_dim, 3 * dim)                       # W_qt, W_kt, W_vt (with bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)                                 # W_qs, W_ks, W_vs (with bias)
        self.proj = nn.Linear(dim, dim)

    def bias(self):
        """B of Eq. 6: (heads, L, L)."""
        L = self.window ** 2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(L, L, -1).permute(2, 0, 1)

    def forward(self, x, temb):
        N, L, C = x.shape                                                   # temb: (N, temb_dim)
        qkv = self.qkv(x)                                                   # Eqs. 3-5: (N, L, 3C)
        qkv = qkv + self.qkv_temb(temb).unsqueeze(1).to(qkv.dtype)   # qkv's dtype: bf16 under autocast (x is fp32)
        # (N, L, 3C) -> (3, N, h, L, C/h): q, k, v per head; SDPA's output goes back to (N, L, C)
        q, k, v = qkv.reshape(N, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias().to(q.dtype))   # Eq. 6
        return self.proj(x.transpose(1, 2).reshape(N, L, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiffiTBlock(nn.Module):
    """Eqs. 7-8: x + TMSA(LN(x), x_t), then + MLP(LN(x)); non-affine LayerNorms (official)."""

    def __init__(self, dim, temb_dim, num_heads, window, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, temb_dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, temb):
        x = x + self.attn(self.norm1(x), temb)
        return x + self.mlp(self.norm2(x))


class TimestepEmbedder(nn.Module):
    """t -> sinusoid -> Linear -> SiLU -> Linear (the time token, Sec. 3.2)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Labels -> (N, D), with a null row (index num_classes) when dropout_prob > 0; labels dropped to it in training."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (a class-conditional backbone), got {num_classes}")
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y):
        if y is None:
            raise ValueError(f"this backbone is class-conditional: pass labels y (N,) in 0..{self.num_classes - 1}"
                             + (f", or {self.num_classes} for the null label" if self.dropout_prob > 0 else ""))
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# ---------------------------------------------------------------------------------------------------
# Latent DiffiT
# ---------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # (N, D, h, w) -> (N, L, D), contiguous: a transposed view makes every LayerNorm copy it (same values)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class FinalLayer(nn.Module):
    """LN (no affine) -> SiLU -> Linear to p*p*C_out per token (official head; no conditioning)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x):
        return self.linear(F.silu(self.norm_final(x)))


class DiffiT(nn.Module):
    """Latent DiffiT: (x, t, y) -> (N, out_channels, H, W)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, out_channels=None, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if out_channels is None else out_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        grid = input_size // patch_size                                    # global attention: window = grid
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)   # fixed
        self.blocks = nn.ModuleList([DiffiTBlock(hidden_size, hidden_size, num_heads, grid, mlp_ratio)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: xavier Linear (time projections included), N(0, .02) embeddings, zero head."""
        def basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(basic_init)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, L, p*p*C_out) -> (N, C_out, H, W), token vectors ordered (p_row, p_col, channel)."""
        N, L, _ = x.shape
        p, c, g = self.patch_size, self.out_channels, int(math.isqrt(L))
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(N, g, g, p, p, c))    # (N, C_out, g, p, g, p)
        return x.reshape(N, c, g * p, g * p)

    def forward(self, x, t, y):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"DiffiT built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        x = self.x_embedder(x) + self.pos_embed                            # (N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)                        # the time token x_t (class added)
        for blk in self.blocks:
            x = blk(x, c)
        return self.unpatchify(self.final_layer(x))


# ---------------------------------------------------------------------------------------------------
# Image-space DiffiT (U-shaped, local-window TMSA)
# ---------------------------------------------------------------------------------------------------

def window_partition(x, w):
    """(N, C, H, W) -> (N * nW, w*w, C) tokens of non-overlapping w x w windows."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // w, w, W // w, w).permute(0, 2, 4, 3, 5, 1)    # (N, H/w, W/w, w, w, C)
    return x.reshape(-1, w * w, C)


def window_merge(x, w, N, H, W):
    """Inverse of window_partition: (N * nW, w*w, C) -> (N, C, H, W)."""
    C = x.shape[-1]
    x = x.reshape(N, H // w, W // w, w, w, C).permute(0, 5, 1, 3, 2, 4)    # (N, C, H/w, w, W/w, w)
    return x.reshape(N, C, H, W)


class ResBlock(nn.Module):
    """DiffiT ResBlock (Eqs. 9-10): h = Conv3x3(SiLU(GN(x))); out = DiffiTBlock(h, x_t) + shortcut(x),
    the transformer block applied on local windows."""

    def __init__(self, in_ch, out_ch, temb_dim, window, head_dim=32, groups=32, mlp_ratio=4.0):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, in_ch), in_ch, eps=1e-6)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.block = DiffiTBlock(out_ch, temb_dim, max(1, out_ch // head_dim), window, mlp_ratio)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.window = window

    def forward(self, x, temb):
        N, _, H, W = x.shape
        h = self.conv(F.silu(self.norm(x)))                                # Eq. 9
        nW = (H // self.window) * (W // self.window)
        tok = self.block(window_partition(h, self.window), temb.repeat_interleave(nW, dim=0))  # each window
        return window_merge(tok, self.window, N, H, W) + self.skip(x)     # Eq. 10


class DiffiTUNet(nn.Module):
    """Image-space DiffiT: (x, t, y) -> (N, out_channels, H, W). See the choices in the module docstring."""

    def __init__(self, input_size=32, in_channels=3, out_channels=None, channels=(128, 256, 256), blocks=4,
                 window=4, temb_dim=512, head_dim=32, groups=32, mlp_ratio=4.0, num_classes=0, class_dropout_prob=0.1):
        super().__init__()
        levels = len(channels)
        if input_size % (window * 2 ** (levels - 1)):
            raise ValueError(f"input_size {input_size} must be divisible by window {window} x 2^{levels - 1}")
        # fail here, not deep inside: the heads of a block are width // head_dim, and every GroupNorm input (block
        # inputs, the decoder's concatenations included, and the head) is split into min(groups, width) groups
        if any(c % head_dim for c in channels):
            raise ValueError(f"channels {tuple(channels)}: every width must be a multiple of head_dim {head_dim}")
        norm_widths = set(channels) | {channels[i] + channels[i + 1] for i in range(levels - 1)}
        if bad := sorted(c for c in norm_widths if c % min(groups, c)):
            raise ValueError(f"channels {tuple(channels)}: GroupNorm inputs of widths {bad} (decoder concatenations "
                             f"included) do not divide into {groups} groups")
        self.input_size, self.in_channels = input_size, in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        # unconditional (num_classes 0): no labels to drop, so no null label and guidance is refused
        self.num_classes, self.class_dropout_prob = num_classes, (class_dropout_prob if num_classes > 0 else 0.0)
        self.freq_dim = channels[0]
        self.t_embedder = nn.Sequential(nn.Linear(self.freq_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, temb_dim, class_dropout_prob)
        res = partial(ResBlock, temb_dim=temb_dim, window=window, head_dim=head_dim, groups=groups, mlp_ratio=mlp_ratio)
        self.tokenizer = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.enc, self.down, self.up, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        ch = channels[0]
        for i, c in enumerate(channels):                                     # encoder; the last level = bottleneck
            self.enc.append(nn.ModuleList([res(ch if j == 0 else c, c) for j in range(blocks)]))
            ch = c
            if i < levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        for i in reversed(range(levels - 1)):                                # decoder, coarse to fine
            self.up.append(nn.Conv2d(ch, ch, 3, padding=1))                  # after nearest x2
            c = channels[i]
            self.dec.append(nn.ModuleList([res(ch + c if j == 0 else c, c) for j in range(blocks)]))
            ch = c
        self.head = nn.Sequential(nn.GroupNorm(min(groups, ch), ch, eps=1e-6), nn.SiLU(),
                                  nn.Conv2d(ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t, y):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"DiffiT built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        temb = self.t_embedder(timestep_embedding(t, self.freq_dim).to(x.dtype))   # (N, temb_dim)
        if self.num_classes > 0:
            temb = temb + self.y_embedder(y)
        h = self.tokenizer(x)
        skips = []
        for i, level in enumerate(self.enc):
            for blk in level:
                h = blk(h, temb)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)                                          # (N, C, H/2, W/2)
        for up, level in zip(self.up, self.dec):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips.pop()], dim=1)                           # per-level skip (concat)
            for blk in level:
                h = blk(h, temb)
        return self.head(h)


# ---------------------------------------------------------------------------------------------------
# Registry. DiffiT-XL/2 at 256px with 2C outputs: 561,330,144 parameters incl. the fixed position table
# (561.04M trainable; Tab. 9's 561M is what depth 28 gives, as do the weights; the text says 30 layers).
# ---------------------------------------------------------------------------------------------------

DiffiT_models = {
    "DiffiT-XL/2": partial(DiffiT, patch_size=2, depth=28, hidden_size=1152, num_heads=16),
    "DiffiT-CIFAR10": partial(DiffiTUNet, channels=(128, 256, 256), blocks=4, window=4),
    "DiffiT-FFHQ64": partial(DiffiTUNet, input_size=64, channels=(128, 256, 256, 256), blocks=4, window=8),
    # ours, not in the paper: small configs for CPU runs on the 8x8 digits
    "DiffiT-Tiny/2": partial(DiffiT, patch_size=2, depth=4, hidden_size=128, num_heads=4),
    "DiffiT-UNet-Tiny": partial(DiffiTUNet, channels=(64, 128), blocks=2, window=4, temb_dim=256, head_dim=32, groups=8),
}


if __name__ == "__main__":
    with torch.device("meta"):
        m = DiffiT_models["DiffiT-XL/2"](input_size=32)
        u = DiffiT_models["DiffiT-CIFAR10"](input_size=32)
    n = sum(p.numel() for p in m.parameters())
    print(f"DiffiT-XL/2: {n:,} parameters ({n - m.pos_embed.numel():,} trainable); "
          f"DiffiT-CIFAR10: {sum(p.numel() for p in u.parameters()):,}")
    assert n == 561_330_144, "not the released DiffiT-XL/2's parameter count"
    x = torch.randn(2, 1, 8, 8)
    for name in ("DiffiT-Tiny/2", "DiffiT-UNet-Tiny"):
        net = DiffiT_models[name](input_size=8, in_channels=1, out_channels=2, num_classes=10)
        out = net(x, torch.tensor([1, 500]), torch.tensor([3, 10]))
        print(name, tuple(out.shape))
        assert out.shape == (2, 2, 8, 8)
