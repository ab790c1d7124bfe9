"""
U-ViT: a ViT backbone for diffusion models that treats everything as tokens and adds long skips.

Paper: F. Bao, S. Nie, K. Xue, Y. Cao, C. Li, H. Su, J. Zhu, "All are Worth Words: A ViT Backbone for
       Diffusion Models", CVPR 2023, arXiv 2209.12152
       (https://arxiv.org/abs/2209.12152).
Code:  baofff/U-ViT (libs/uvit.py), read for names, shapes and constants only.

What is inside:
    timestep_embedding          the time token: a D-dim sinusoid [cos | sin] (Sec. 3, "time as a token")
    PatchEmbed, Attention, Mlp  the ViT parts (SDPA attention, no qkv bias as in every released config)
    Block                       pre-LN transformer block; out-blocks first fuse the long skip (Sec. 3.1)
    UViT                        tokens [label, time, patches] + learned positions -> in-blocks -> mid-block
                                -> out-blocks with long skips -> LN -> linear -> unpatchify -> optional 3x3 conv
    UViT_models                 the paper's sizes (Tab. 2) with the patch sizes of the released configs

Contract with the objectives: model(x, t, y) -> (N, out_channels, H, W); y == num_classes is the null label.
Time value the released checkpoints expect (the backbone embeds whatever it is given):
    U-ViT-H/2, H/4 (ImageNet latents, discrete time): the 1-indexed step n in 1..1000 of Stable Diffusion's
        scaled-linear schedule -> ddpm.py with beta_schedule='scaled_linear', learn_sigma=False,
        timestep_offset=1 (an eps model; its DPM-Solver also feeds float n).
    U-ViT-L/2, L/4 and the pixel models (continuous VP SDE, beta(s) = 0.1 + 19.9 s): 999 * s with s the
        diffusion time (s = 1 noise). That is sit.py's VP path with a noise model, fed 999 * (1 - t):
        Transport("VP", "noise", time_scale=999, time_reverse=True).

Letters: N batch, C channels, H/W size, p patch, T = (H/p)^2 patch tokens, E extra tokens (2 with a
label, 1 without), D width.

Deviations from the official code (none changes the state-dict keys or the outputs):
    - Label dropout for classifier-free guidance happens in the model in training mode (the official code
      drops labels in the dataset wrapper); the null label is num_classes (the official 1001-row table).
    - out_channels is an argument (official: always C, eps only); the final conv maps out_channels to itself.
    - SDPA runs in the input's dtype (the official SDPA path casts q, k, v to fp32).
    - num_classes=0 means unconditional (official: num_classes=-1).
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def timestep_embedding(t, dim, max_period=10000):
    """(N,) -> (N, dim): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/(dim/2)) (GLIDE order)."""
    if t.dim() != 1:
        raise ValueError(f"t must hold one time per sample, shape (N,); got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out, for tests; q, k, v: (N, heads, T, d)."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a p x p stride-p convolution (with bias), row-major tokens."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv (rows q, k, v), through F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, L, D = x.shape
        # (N, L, 3D) -> (3, N, h, L, D/h): q, k, v per head; SDPA's output goes back to (N, L, D)
        q, k, v = self.qkv(x).reshape(N, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)          # (N, heads, L, D/heads)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))


class Mlp(nn.Module):
    """fc1 -> GELU (exact, as U-ViT) -> fc2."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block. With skip=True (out-blocks) the long skip is fused first:
    x <- Linear(concat[x, skip]) (Sec. 3.1: the concatenation variant the paper keeps)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT: (x, t, y) -> (N, out_channels, H, W)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, out_channels=None, embed_dim=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False, conv=True, num_classes=1000,
                 class_dropout_prob=0.1, grad_checkpointing=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels if out_channels is None else out_channels   # official: eps only
        # unconditional (num_classes 0): no labels to drop, so no null label and guidance is refused
        self.num_classes, self.class_dropout_prob = num_classes, (class_dropout_prob if num_classes > 0 else 0.0)
        self.embed_dim, self.grad_checkpointing = embed_dim, grad_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        num_patches = (input_size // patch_size) ** 2
        self.time_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                        nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else nn.Identity()
        if num_classes > 0:   # + a null row for guidance when labels are dropped (official ImageNet: 1001 rows)
            self.label_emb = nn.Embedding(num_classes + int(class_dropout_prob > 0), embed_dim)
        self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        self.in_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2)])
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True)
                                         for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * self.out_channels)
        self.final_layer = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if conv else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """The official init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W), each token's vector ordered (p_row, p_col, channel)."""
        N, T, _ = x.shape
        p, c, h = self.patch_size, self.out_channels, int(math.isqrt(T))
        x = x.reshape(N, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)    # (N, C, h, p, w, p)
        return x.reshape(N, c, h * p, h * p)

    def run(self, block, x, skip=None):
        if self.grad_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward(self, x, t, y):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"U-ViT built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)                                                     # (N, T, D)
        # the raw sinusoid stays in the positions' dtype (fp32 under autocast, as official: not rounded to bf16)
        time_token = self.time_embed(timestep_embedding(t, self.embed_dim).to(self.pos_embed.dtype))[:, None]  # (N, 1, D)
        tokens = [time_token, x]
        if self.num_classes > 0:
            if y is None:
                null = f" (y = {self.num_classes} is the null label)" if self.class_dropout_prob > 0 else ""
                raise ValueError(f"this U-ViT is class-conditional (num_classes={self.num_classes}): "
                                 f"pass labels y{null}")
            if self.training and self.class_dropout_prob > 0:                       # label dropout (CFG)
                drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            tokens.insert(0, self.label_emb(y).unsqueeze(1))                        # [label, time, patches]
        x = torch.cat(tokens, dim=1) + self.pos_embed                               # (N, E + T, D)
        skips = []
        for blk in self.in_blocks:
            x = self.run(blk, x)
            skips.append(x)
        x = self.run(self.mid_block, x)
        for blk in self.out_blocks:                                                  # LIFO: long skips (Fig. 1)
            x = self.run(blk, x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]                        # (N, T, p*p*C_out)
        return self.final_layer(self.unpatchify(x))                                 # (N, C_out, H, W)


# ---------------------------------------------------------------------------------------------------
# Registry: Tab. 2 sizes (paper "#Layers" = depth + 1) with the patch size / conv head of each released
# config. Parameter counts (asserted in test_all.py) in the setting of the official config:
#   H/2 ImageNet-256 latents 500,832,016 | L/2 ImageNet-256 latents 286,763,172 | H/4 ImageNet-512 500,942,656
#   L/4 ImageNet-512 286,861,524 | L/4 ImageNet-64 pixels 286,827,652 | M/4 ImageNet-64 130,940,292
#   S/2 CIFAR-10 (uncond.) 44,255,328 | S/4 CelebA-64 (uncond.) 44,292,228
# ---------------------------------------------------------------------------------------------------

UViT_models = {
    "U-ViT-S/2": partial(UViT, patch_size=2, embed_dim=512, depth=12, num_heads=8, conv=True),
    "U-ViT-S/4": partial(UViT, patch_size=4, embed_dim=512, depth=12, num_heads=8, conv=True),
    "U-ViT-S-Deep/2": partial(UViT, patch_size=2, embed_dim=512, depth=16, num_heads=8, conv=True),
    "U-ViT-M/2": partial(UViT, patch_size=2, embed_dim=768, depth=16, num_heads=12, conv=True),
    "U-ViT-M/4": partial(UViT, patch_size=4, embed_dim=768, depth=16, num_heads=12, conv=True),
    "U-ViT-L/2": partial(UViT, patch_size=2, embed_dim=1024, depth=20, num_heads=16, conv=True),
    "U-ViT-L/4": partial(UViT, patch_size=4, embed_dim=1024, depth=20, num_heads=16, conv=True),
    "U-ViT-H/2": partial(UViT, patch_size=2, embed_dim=1152, depth=28, num_heads=16, conv=False),
    "U-ViT-H/4": partial(UViT, patch_size=4, embed_dim=1152, depth=28, num_heads=16, conv=False),
    # ours, not in the paper: for CPU runs on the 8x8 digits
    "U-ViT-Tiny/2": partial(UViT, patch_size=2, embed_dim=128, depth=6, num_heads=4, conv=True),
}


if __name__ == "__main__":
    for name, kw in [("U-ViT-H/2", dict(input_size=32)), ("U-ViT-L/2", dict(input_size=32))]:
        with torch.device("meta"):
            m = UViT_models[name](**kw)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name}: {n:,} parameters on 32x32x4 latents")
        assert n == {"U-ViT-H/2": 500_832_016, "U-ViT-L/2": 286_763_172}[name], "not the released model's count"
    m = UViT_models["U-ViT-Tiny/2"](input_size=8, in_channels=1, num_classes=10, out_channels=2).eval()
    out = m(torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 1000]), torch.tensor([0, 5, 10]))
    print("U-ViT-Tiny/2 on (3, 1, 8, 8) ->", tuple(out.shape), f"({sum(p.numel() for p in m.parameters()):,} parameters)")
    assert out.shape == (3, 2, 8, 8)
