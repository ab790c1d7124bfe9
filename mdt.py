"""
MDT / MDTv2: the Masked Diffusion Transformer, a DiT-style backbone trained with mask latent modeling.

Paper: S. Gao, P. Zhou, M.-M. Cheng, S. Yan, "Masked Diffusion Transformer is a Strong Image Synthesizer",
       ICCV 2023, arXiv 2303.14389
       (https://arxiv.org/abs/2303.14389; v1 is the ICCV MDT paper, v2 of Feb 2024 describes MDTv2). Sections
       are cited by heading, with v1's numbers (its method is Sec. 4): v2's could not be checked here.
Code:  sail-sg/MDT, branch main (MDTv2, masked_diffusion/models.py), read for names, shapes and constants only.

The idea (Sec. 4): during training a random subset of the latent tokens is dropped; the encoder sees only
the visible tokens, a small side-interpolater predicts the dropped ones from the visible ones, and the
decoder reconstructs the full sequence. The diffusion loss is computed both on the full input and on the
masked input (train.py does the second pass when `model.trains_with_mask`). At inference nothing is
masked and the side-interpolater is unused. Outside train.py, one step's loss is (same t, fresh noise):

    import torch; from mdt import MDT_models; from ddpm import GaussianDiffusion
    D = GaussianDiffusion(mse_weight="min_snr_5")              # MDTv2's objective (see ddpm.py)
    model = MDT_models["MDTv2-S/2"](input_size=16, in_channels=4, out_channels=D.out_channels(4))
    x, y = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,))   # latents of 128px images, labels
    t = torch.randint(0, 1000, (4,))
    loss = D.loss(model, x, y, t=t)["loss"].mean() + \
        D.loss(model, x, y, t=t, model_kwargs=dict(mask_ratio=0.3))["loss"].mean()   # full + masked pass
    loss.backward()

What is inside:
    timestep_embedding, sincos_pos_embed_2d   as DiT (the position tables are learnable here, sin-cos init)
    PatchEmbed, TimestepEmbedder, LabelEmbedder
    relative_position_index                   BEiT-style pairwise (dh, dw) index into a bias table
    RelativePositionBias, Attention           attention with a learned relative bias per head, via SDPA
    MDTBlock                                  adaLN-Zero block, optionally fusing a long skip first
    FinalLayer
    MDTv2                                     encoder in-blocks -> out-blocks (U-Net skips) -> [side-interpolater
                                              when masking] -> decoder blocks (each fed the pre-masking input)
    random_masking, side_interpolate          mask latent modeling ("Latent masking", Sec. 4.2), both versions
    MDT                                       v1: one plain stack; its last decode_layer blocks are the decoder
    MDT_models                                the paper's sizes

Letters: N batch, C channels, H/W size, p patch, g = H/p token grid side, L = g^2 tokens, K kept tokens,
D width, h heads.

Deviations from the official code (state-dict keys and outputs are the same; tested locally):
    - Attention goes through F.scaled_dot_product_attention with the relative bias as an additive mask
      (the official code writes the softmax out).
    - The masked bias is one embedding lookup of the kept pairs' table offsets instead of repeat + two gathers,
      and those offsets are built once per forward for all blocks, not in each block.
    - The mask ratio is an argument of forward (mask_ratio None or 0: no masking; the official v2 built
      with mask_ratio 0 still masks, r in [0, 0.2)) instead of a constructor argument + enable_mask; one
      ratio per batch r = mask_ratio + 0.2 U[0, 1) as in v2 (in float32, as the official, so K = int(L (1 - r))
      agrees for every draw), drawn from the CPU generator (official: on x's device; ours needs no device
      sync). The mask token is always trainable (official: frozen when built for inference, which only
      matters for training).
    - A mask ratio that could leave no token visible raises a ValueError (official: a slice with
      int(L (1 - r)) <= 0 wraps around or keeps nothing, silently); so does a decode_layer the official
      arithmetic cannot build as asked (v2: depth - decode_layer odd or negative; v1: outside 1..depth).
    - Label dropout and the null label as in DiT; out_channels is an argument (official: learn_sigma).
    - PatchEmbed returns contiguous tokens instead of a transposed view that every LayerNorm copies (same values).
    - MDT v1 (branch mdtv1) is the class MDT ('MDT-XL/2', decode_layer 2 as its released checkpoint);
      only XL/2, the size of the released v1 checkpoint, is registered. The v1 paper's convergence
      comparison with DiT (Fig. 1) and its ablations use S/2; build that size as the official MDT_S_2:
      MDT(depth=12, hidden_size=384, num_heads=6).
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    """(N,) -> (N, dim) = [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half), fp32 (DiT's embedder)."""
    if t.dim() != 1:
        raise ValueError(f"t must hold one time per sample, shape (N,); got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def sincos_1d(pos, dim):
    """(M,) positions -> (M, dim) float64 [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim, grid):
    """(g*g, dim) table, row-major tokens; first dim/2 channels encode the column, last dim/2 the row."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)], axis=1)


def relative_position_index(grid):
    """(L, L) int64: for tokens i = (h_i, w_i), j = (h_j, w_j):  (h_i - h_j + g - 1)(2g - 1) + (w_i - w_j + g - 1)."""
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    h, w = h.reshape(-1), w.reshape(-1)                                        # (L,) each
    return (h[:, None] - h[None, :] + grid - 1) * (2 * grid - 1) + (w[:, None] - w[None, :] + grid - 1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, L, D) with a p x p stride-p convolution, row-major tokens."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # (N, D, h, w) -> (N, L, D), contiguous: a transposed view makes every LayerNorm copy it (same values)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """t -> 256 frequencies -> Linear -> SiLU -> Linear."""

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


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset (BEiT): table ((2g-1)^2 + 3, h); the 3 extra rows are
    BEiT's class-token leftovers, unused but kept for checkpoint compatibility."""

    def __init__(self, grid, num_heads):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid))  # persistent, as official
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, pairs=None):
        """(h, L, L) bias of all token pairs, or (N, h, K, K) among the kept tokens, whose offset indices
        pairs (N, K, K) = kept_pairs(relative_position_index, ids_keep) are built once per forward.
        One table lookup per pair (an embedding of the pair's offset index), so the backward is one
        embedding gradient of N*K*K rows, not a scatter over every (sample, head, pair)."""
        index = self.relative_position_index if pairs is None else pairs      # (L, L) / (N, K, K) table rows
        return F.embedding(index, self.relative_position_bias_table).movedim(-1, -3)  # (h, L, L) / (N, h, K, K)


def kept_pairs(relative_position_index, ids_keep):
    """The (N, K, K) offset indices among the kept tokens ids_keep (N, K): the same in every block (all tables
    are indexed alike), so built once per forward and kept once for backward, not once per block."""
    return relative_position_index[ids_keep[:, :, None], ids_keep[:, None, :]]


def attention_reference(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + B) v written out, for tests."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(dim=-1) @ v


class Attention(nn.Module):
    """Self-attention with relative position bias (Sec. 4.3, "Position-aware encoder and decoder"), through
    SDPA with the bias as an additive mask."""

    def __init__(self, dim, num_heads, grid):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads)

    def forward(self, x, pairs=None):
        N, K, D = x.shape
        # (N, K, 3D) -> (3, N, h, K, D/h): q, k, v per head; SDPA's output goes back to (N, K, D)
        q, k, v = self.qkv(x).reshape(N, K, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.rel_pos_bias(pairs)                                        # (h, L, L) or (N, h, K, K)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # == attention_reference
        return self.proj(x.transpose(1, 2).reshape(N, K, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MDTBlock(nn.Module):
    """adaLN-Zero block (as DiT) with relative-bias attention; skip=True fuses a long skip first:
    x <- Linear(concat[x, skip])."""

    def __init__(self, hidden_size, num_heads, grid, mlp_ratio=4.0, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, grid)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x, c, skip=None, pairs=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), pairs)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------------
# Mask latent modeling and helpers shared by MDTv2 and MDT (v1)
# ---------------------------------------------------------------------------------------------------

def init_mdt_weights(model):
    """As the official code: xavier Linear, sin-cos positions, N(0, .02) embeddings, adaLN-Zero."""
    def basic_init(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    model.apply(basic_init)
    grid = model.input_size // model.patch_size
    table = torch.from_numpy(sincos_pos_embed_2d(model.pos_embed.shape[-1], grid)).float()[None]
    model.pos_embed.data.copy_(table)
    model.decoder_pos_embed.data.copy_(table)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    blocks = [m for m in model.modules() if isinstance(m, MDTBlock)]
    for layer in [b.adaLN_modulation[-1] for b in blocks] + [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    nn.init.normal_(model.mask_token, std=0.02)


def unpatchify(x, p, c):
    """(N, L, p*p*C_out) -> (N, C_out, H, W), token vectors ordered (p_row, p_col, channel)."""
    N, L, _ = x.shape
    g = int(math.isqrt(L))
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(N, g, g, p, p, c))           # (N, C_out, g, p, g, p)
    return x.reshape(N, c, g * p, g * p)


def random_masking(x, ratio):
    """Keep a random subset of K = int(L (1 - ratio)) tokens per sample (MAE-style shuffle), so L - K are
    dropped (ratio 0.3 of L = 256 drops 77). Returns kept tokens (N, K, D), mask (N, L) in x's dtype with
    1 = dropped, ids_restore (N, L), ids_keep (N, K)."""
    N, L, D = x.shape
    keep = int(L * (1 - ratio))     # ratio: a float, or MDTv2's float32 (1,) CPU tensor (no device sync)
    if not 1 <= keep <= L:      # keep <= 0 would slice from the end (official: silently wrong)
        raise ValueError(f"mask ratio {float(ratio):g} keeps int({L} (1 - ratio)) = {keep} of {L} tokens; need 1..{L}")
    ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)      # small noise = kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)   # x's dtype: a bf16 model stays bf16
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)                                  # back to token order
    return torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D)), mask, ids_restore, ids_keep


def side_interpolate(model, x, c, mask, ids_restore):
    """Fill the dropped positions with the mask token, restore the token order, add the decoder positions,
    run the side block and keep its output only at the dropped positions (Sec. 4.3, "Side-interpolater")."""
    N, K, D = x.shape
    x = torch.cat([x, model.mask_token.expand(N, ids_restore.shape[1] - K, D)], dim=1)
    x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, D)) + model.decoder_pos_embed   # (N, L, D)
    out = x
    for blk in model.sideblocks:
        out = blk(out, c)
    mask = mask[..., None]
    return out * mask + (1 - mask) * x


def check_input(model, x):
    if x.shape[-2:] != (model.input_size, model.input_size):
        raise ValueError(f"MDT built for {model.input_size}x{model.input_size} inputs, got {tuple(x.shape[-2:])}")


def check_mask_ratio(model, mask_ratio, spread):
    """The drawn ratio is r = mask_ratio + spread u, u ~ U[0, 1) (v2: spread 0.2; v1: 0, r = mask_ratio); every
    r must keep int(L (1 - r)) >= 1 of the L tokens, i.e. about mask_ratio <= 1 - spread - 1/L (L = 256: 0.796
    in v2, 0.996 in v1). Checked with the largest u torch.rand gives, before drawing: a bad ratio fails at once,
    not at an unlucky step."""
    L = (model.input_size // model.patch_size) ** 2
    if mask_ratio < 0 or int(L * (1 - (mask_ratio + spread * (1 - 2 ** -24)))) < 1:
        drawn = f"r in [mask_ratio, mask_ratio + {spread})" if spread else "r = mask_ratio"
        raise ValueError(f"mask_ratio {mask_ratio} is invalid for {type(model).__name__}: it masks with {drawn} and "
                         f"keeps int(L (1 - r)) of the L = {L} tokens, so it needs 0 <= mask_ratio <= about "
                         f"1 - {spread} - 1/L = {1 - spread - 1 / L:.6g} (at least one kept token)")


class MDTv2(nn.Module):
    """MDTv2: (x, t, y, mask_ratio=None) -> (N, out_channels, H, W)."""

    trains_with_mask = True   # train.py adds the masked pass (Sec. 4.4, "Training")

    def __init__(self, input_size=32, patch_size=2, in_channels=4, out_channels=None, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, decode_layer=4):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if out_channels is None else out_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        if not 0 <= decode_layer <= depth or (depth - decode_layer) % 2:
            # official: half = (depth - decode_layer) // 2 in- and out-blocks + decode_layer decoder blocks, so
            # an odd difference silently builds depth - 1 blocks, and decode_layer > depth more than depth
            raise ValueError(f"MDTv2 needs 0 <= decode_layer <= depth with depth - decode_layer even (equal numbers "
                             f"of in- and out-blocks), got depth {depth}, decode_layer {decode_layer}")
        grid = input_size // patch_size
        half = (depth - decode_layer) // 2
        block = partial(MDTBlock, hidden_size, num_heads, grid, mlp_ratio)
        # registration order = the official one (same state-dict order). A seeded init differs from the official
        # one in the relative-bias tables alone (torch's trunc_normal_ draws differently from timm's)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))          # learnable, sin-cos init
        self.en_inblocks = nn.ModuleList([block() for _ in range(half)])
        self.en_outblocks = nn.ModuleList([block(skip=True) for _ in range(half)])
        self.de_blocks = nn.ModuleList([block(skip=True) for _ in range(decode_layer)])
        self.sideblocks = nn.ModuleList([block()])                                       # the side-interpolater
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        init_mdt_weights(self)

    @torch.compiler.disable
    def draw_mask(self, x, mask_ratio):
        """v2: one ratio per batch, r ~ U[mask_ratio, mask_ratio + 0.2), drawn on the CPU generator (no device
        sync), then random_masking(x, r). Kept out of torch.compile: a compiled forward would bake each r into
        its graph and recompile every step; this way it sees index tensors whose length K is a dynamic size."""
        check_mask_ratio(self, mask_ratio, 0.2)
        r = torch.rand(1) * 0.2 + mask_ratio           # float32 as the official (in float64, K differs for 83 of
        return random_masking(x, r)                     # the 2^24 draws at L = 256)

    def forward(self, x, t, y, mask_ratio=None):
        check_input(self, x)
        x = self.x_embedder(x) + self.pos_embed                               # (N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)                           # (N, D)
        input_skip = x                                                        # every decoder block sees all tokens
        masked = bool(mask_ratio)
        pairs = None
        if masked:
            x, mask, ids_restore, ids_keep = self.draw_mask(x, mask_ratio)    # (N, K, D)
            pairs = kept_pairs(self.sideblocks[0].attn.rel_pos_bias.relative_position_index, ids_keep)   # (N, K, K)
        skips = []
        for blk in self.en_inblocks:
            x = blk(x, c, pairs=pairs)
            skips.append(x)
        for blk in self.en_outblocks:                                         # U-Net pairing, LIFO
            x = blk(x, c, skip=skips.pop(), pairs=pairs)
        x = side_interpolate(self, x, c, mask, ids_restore) if masked else x + self.decoder_pos_embed
        for blk in self.de_blocks:
            x = blk(x, c, skip=input_skip)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)   # (N, C_out, H, W)


class MDT(nn.Module):
    """MDT v1 (branch mdtv1): (x, t, y, mask_ratio=None) -> (N, out_channels, H, W). One stack of `depth`
    blocks without long skips: the first depth - decode_layer are the encoder (kept tokens only when masking),
    then the side-interpolater (masking) or + decoder_pos_embed, then the last decode_layer blocks. The ratio
    is fixed (no random range in v1): it masks L - int(L (1 - mask_ratio)) tokens, e.g. 77 of 256 at 0.3."""

    trains_with_mask = True

    def __init__(self, input_size=32, patch_size=2, in_channels=4, out_channels=None, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, decode_layer=2):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if out_channels is None else out_channels
        if not 1 <= decode_layer <= depth:
            # official: the switch to the decoder happens at block depth - decode_layer; outside 1..depth it never
            # does (no decoder positions; masked, the kept tokens reach unpatchify and it fails there)
            raise ValueError(f"MDT (v1) needs 1 <= decode_layer <= depth, got depth {depth}, "
                             f"decode_layer {decode_layer}")
        self.num_classes, self.class_dropout_prob, self.decode_layer = num_classes, class_dropout_prob, decode_layer
        grid = input_size // patch_size
        block = partial(MDTBlock, hidden_size, num_heads, grid, mlp_ratio)
        # registration order = the official one (same state-dict order). A seeded init differs from the official
        # one in the relative-bias tables alone (torch's trunc_normal_ draws differently from timm's)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))
        self.blocks = nn.ModuleList([block() for _ in range(depth)])
        self.sideblocks = nn.ModuleList([block()])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        init_mdt_weights(self)

    def forward(self, x, t, y, mask_ratio=None):
        check_input(self, x)
        x = self.x_embedder(x) + self.pos_embed                               # (N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)                           # (N, D)
        masked, pairs = bool(mask_ratio), None
        if masked:
            check_mask_ratio(self, mask_ratio, 0)
            x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio)    # (N, K, D), K fixed by the ratio
            pairs = kept_pairs(self.blocks[0].attn.rel_pos_bias.relative_position_index, ids_keep)     # (N, K, K)
        first_decoder = len(self.blocks) - self.decode_layer
        for i, blk in enumerate(self.blocks):
            if i == first_decoder:                                            # encoder -> decoder
                x = side_interpolate(self, x, c, mask, ids_restore) if masked else x + self.decoder_pos_embed
                pairs = None
            x = blk(x, c, pairs=pairs)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)   # (N, C_out, H, W)


# ---------------------------------------------------------------------------------------------------
# Registry (paper sizes; decode_layer: 4 for XL as the released scripts and checkpoint, 6 for S as run.sh; B/L
# take the constructor default 4, no released script builds them; the paper's S/B values could not be checked). Parameter counts at 256px,
# everything included (side block and mask token): XL/2 742,263,904; used at inference 718,342,176.
# MDT v1 XL/2: 699,778,144; used at inference 675,856,416 (the paper's "676M").
# ---------------------------------------------------------------------------------------------------

MDT_models = {
    "MDTv2-XL/2": partial(MDTv2, patch_size=2, depth=28, hidden_size=1152, num_heads=16, decode_layer=4),
    "MDTv2-L/2": partial(MDTv2, patch_size=2, depth=24, hidden_size=1024, num_heads=16, decode_layer=4),
    "MDTv2-B/2": partial(MDTv2, patch_size=2, depth=12, hidden_size=768, num_heads=12, decode_layer=4),
    "MDTv2-S/2": partial(MDTv2, patch_size=2, depth=12, hidden_size=384, num_heads=6, decode_layer=6),
    "MDT-XL/2": partial(MDT, patch_size=2, depth=28, hidden_size=1152, num_heads=16, decode_layer=2),   # v1
    # ours, not in the paper: for CPU runs on the 8x8 digits (16 tokens; 30-50% masked keeps 8-11)
    "MDTv2-Tiny/2": partial(MDTv2, patch_size=2, depth=6, hidden_size=128, num_heads=4, decode_layer=2),
}


if __name__ == "__main__":
    with torch.device("meta"):
        m = MDT_models["MDTv2-XL/2"](input_size=32)
    n = sum(p.numel() for p in m.parameters())
    side = sum(p.numel() for p in m.sideblocks.parameters()) + m.mask_token.numel()
    print(f"MDTv2-XL/2: {n:,} parameters, {n - side:,} used at inference")
    assert (n, n - side) == (742_263_904, 718_342_176), "not the released checkpoint's parameter count"
    torch.manual_seed(0)
    m = MDT_models["MDTv2-Tiny/2"](input_size=8, in_channels=1, num_classes=10)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 999]), torch.tensor([0, 1, 2, 10])
    full, masked = m(x, t, y), m(x, t, y, mask_ratio=0.3)
    print("full:", tuple(full.shape), " masked (ratio 0.3):", tuple(masked.shape),
          " zero at init:", bool(full.abs().max() == 0))
    assert full.shape == masked.shape == (4, 2, 8, 8) and full.abs().max() == 0, "adaLN-Zero: output must be 0 at init"
