"""
GAT: "Scalable GANs with Transformers" (Hyun, Lee, Heo; arXiv 2509.24935), in one file: a GAN whose
generator and discriminator are plain vision transformers, trained in the Stable Diffusion VAE's latent
space. Read top to bottom, it is the paper's method in the order data flows (1-8), then the machinery:

  1. config       sizes and every default        9. data          memory-mapped latents, or the digits
  2. blocks       RMSNorm, RoPE, attention, FFN 10. checkpoints   atomic writes, exact resume
  3. generator    style-modulated ViT, K heads  11. training loop D step, G step; DDP via torchrun
  4. discriminator ViT on the K levels, REPA    12. watching      sample grids, training-time FID
  5. MNG noise    multi-level noise guidance    13. memory        --grad-ckpt auto's recomputed blocks
  6. augmentation DiffAugment on latents        14. benchmark     ms/iteration, images/s, MFU
  7. losses       relativistic, approx. R1/R2, REPA
  8. optimiser    width-aware AdamW, EMA of G

  python gat.py --data digits                                   # CPU demo: tiny GAT on 8x8 digits, 5 min
  torchrun --nproc_per_node=8 gat.py --size XL                  # the paper's recipe on data/imagenet256
  torchrun --nproc_per_node=2 gat.py --size XL --grad-accum 4   # the same global batch on 2 GPUs
  python gat.py --bench --size S --batch-size 8                 # speed: ms/it, images/s, MFU
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import operator
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

# The D step's 4B rows and the G step's B rows alternate every iteration: growable segments let the CUDA
# allocator reuse one step's memory for the other's shapes instead of fragmenting (read when CUDA starts)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fid  # training FID and the demo's judge; fid.py imports nothing of this project
from fid import UserError, check_device  # bad input: one `error: ...` line in every script
from prep_latents import load_latents, load_vae  # the latent folder's reader beside its writer

# ------------------------------------------------------------------------------------------------
# 1. Config. The model sizes are DiT's (paper, "Model configurations"); one table for G and D.
# proj_dim is D's projection-conditioning width and the REPA projector's hidden width (2048 in the
# paper); the tiny demo size uses 256 so that the 8x8-digit D is not dominated by its head.
MODEL_SIZES = {
    "tiny": dict(depth=4, width=64, heads=4, proj_dim=256),
    "S": dict(depth=12, width=384, heads=6, proj_dim=2048),
    "B": dict(depth=12, width=768, heads=12, proj_dim=2048),
    "L": dict(depth=24, width=1024, heads=16, proj_dim=2048),
    "XL": dict(depth=28, width=1152, heads=16, proj_dim=2048),
}
PATCH_SIZES = (1, 2, 4, 8)
LATENT_SCALE = 0.18215  # SD-VAE: latent = 0.18215 * posterior sample, roughly unit variance (other VAEs: manifest)
REPA_TEACHER = "vit_base_patch14_dinov2.lvd142m"  # DINOv2 ViT-B/14, 768-dim tokens, 16x16 at 224 px
AUGMENT_POLICY = "color,translation,cutout,flip"  # DiffAugment on D's inputs, as the authors' code

def setting(default, help, **allowed):
    """A Config field that is a flag: its default, its --help, and what it allows (choices, checked by
    argparse; bounds at_least / above / at_most / below, checked with the rest by validate_config)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **allowed))

@dataclass
class Config:
    # model
    size: str = setting("XL", "model size", choices=tuple(MODEL_SIZES))
    patch: int = setting(2, "patch size on the latent (32x32 at 256 px)", choices=PATCH_SIZES)
    z_dim: int = setting(64, "latent code z ~ N(0, I)", at_least=1)
    num_levels: int = setting(4, "K MNG output heads; 1 = the no-MNG ablation (no noise either)", at_least=1)
    fixed_pos_embed: bool = setting(False, "ablation: the paper's fixed sin-cos position tables (the code trains them)")
    # data
    data: str = setting("data/imagenet256", "prep_latents.py output folder, or 'digits' for the CPU demo")
    batch_size: int = setting(512, "global batch, split over the ranks", at_least=1)
    grad_accum: int = setting(1, "micro-batches per rank and step (the same global batch, less memory)", at_least=1)
    num_workers: int = setting(4, "DataLoader workers reading the memory-mapped arrays", at_least=0)
    # losses (paper: relativistic loss + approximated R1/R2 + REPA on D)
    r1_gamma: float = setting(0.1, "weight gamma of R1 (reals), added as gamma / 2", at_least=0)
    r2_gamma: float = setting(0.1, "weight gamma of R2 (fakes), added as gamma / 2", at_least=0)
    gp_sigma: float = setting(0.01, "finite-difference step of the approximated penalties", above=0)
    exact_gp: bool = setting(False, "ablation: exact R1/R2 by double backward")
    repa_weight: float = setting(1.0, "0 = the no-REPA ablation (no teacher is loaded)", at_least=0)
    repa_teacher: str = setting(REPA_TEACHER, "timm name of the frozen representation teacher")
    augment: str = setting(AUGMENT_POLICY, "DiffAugment operations on D's inputs ('' = none)")
    # optimisation
    base_lr: float = setting(2e-4, "width-aware: lr = base_lr * 768 / width, for G and D each", above=0)
    beta1: float = setting(0.0, "AdamW's beta1 (0: no momentum, as GANs prefer)", at_least=0, below=1)
    beta2: float = setting(0.99, "AdamW's beta2", at_least=0, below=1)
    grad_clip: float = setting(1.0, "gradient norm clipping", above=0)
    ema_decay: float = setting(0.999, "EMA of G's weights, used for sampling (0 = the raw G)", at_least=0, below=1)
    steps: int = setting(400_000, "iterations (one D step + one G step each)", at_least=1)
    # run
    results: str = setting("results", "runs live in results/<name>/")
    name: str = setting("", "the run's name; default from size, patch and data")
    resume: str = setting("auto", "auto (the run's latest.pt if any), none, or a checkpoint path")
    seed: int = setting(0, "the seed of the weights, the data order and every random stream", at_least=0)
    log_every: int = setting(10, "steps per log interval: host syncs (losses, NaN check, stop) only here", at_least=1)
    sample_every: int = setting(1250, "steps between EMA sample grids from fixed noise; 0 = off", at_least=0)
    sample_truncation: float = setting(0.0, "the grids' truncation (fraction toward the class mean)", at_least=0, at_most=1)
    ckpt_every: int = setting(2000, "steps between atomic writes of checkpoints/latest.pt; 0 = at the end or a stop",
                              at_least=0)
    snapshot_every: int = setting(20000, "steps between kept checkpoints/<step>.pt; 0 = off", at_least=0)
    max_minutes: float = setting(0.0, "stop (with a checkpoint) after this wall time; 0 = no limit", at_least=0)
    fid_every: int = setting(0, "steps between FID-5Ks of the EMA G against --fid-ref; 0 = off", at_least=0)
    fid_ref: str = setting("", "reference stats .npz (fid.py, or prep_latents.py --ref-stats)")
    fid_num: int = setting(5000, "images per training-time FID (a covariance needs 2; below 2,049 biased)", at_least=2)
    fid_inception: str = setting("", "Inception weights file; default: download to the torch hub cache")
    # speed
    device: str = setting("", "default: cuda if available, else cpu")
    precision: str = setting("auto", "auto = bf16 autocast on GPU, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    compile: bool = setting(False, "torch.compile G and D")
    grad_ckpt: str = setting("auto", "blocks recomputed in backward: auto (the fewest that fit), off, all, or N per model")
    vae: str = setting("", "VAE that decodes the sample grids; default: the one in the data's manifest")
    wandb: str = setting("", "wandb project to log metrics, grids and config to; '' = off")
    # not flags: what the data implies, filled in by prepare_data (and stored in checkpoints)
    num_classes: int = 0
    channels: int = 0
    input_size: int = 0
    data_kind: str = ""  # "latent" or "pixel"
    latent_scale: float = LATENT_SCALE  # the VAE's scaling_factor and shift_factor: latent = scale * (z - shift)
    latent_shift: float = 0.0
    image_size: int = 256  # the data's image side: the REPA teacher sees 224 * image_size / 256 px (448 at 512)

# The demo preset: what differs from the paper's ImageNet recipe for 8x8 digits on 2 CPU cores, and why
# (each choice measured at equal wall time; the figures are in git history).
DIGITS_PRESET = dict(
    size="tiny", patch=2,               # 8x8 pixels -> 4x4 = 16 tokens; every faster shape learned less
    batch_size=64, num_workers=0,       # batch 64 beat 32 at equal time
    base_lr=6e-4,                       # width-aware lr 7.2e-3 at width 64: 4e-4 learned slower; 8e-4 and
                                        # more collapsed within classes on more seeds
    repa_weight=0.0,                    # no representation teacher exists for 8x8 digits
    augment="",                         # a 1-pixel shift or a 4x4 cutout is a large change to an 8x8 digit, and a
                                        # mirrored 2 or 7 is no longer that digit: it slowed class learning
    ema_decay=0.99,                     # a short run wants a short EMA (0.998 lags)
    steps=100_000, max_minutes=4.75,    # the wall clock decides: with start-up and the report, 5 minutes
    log_every=25, sample_every=250, ckpt_every=250, snapshot_every=0,
)

# ------------------------------------------------------------------------------------------------
# 2. Building blocks shared by G and D.
class EqualizedLinear(nn.Module):
    """StyleGAN's equalized-learning-rate linear layer. The weight is stored 1/lr_mult times larger and
    scaled by lr_mult in forward, so with Adam (which normalises gradient scale) the effective step on
    the used weight is lr_mult times the optimiser's lr: the mapping network learns 100x slower."""

    def __init__(self, fan_in, fan_out, lr_mult=0.01):
        super().__init__()
        self.lr_mult = lr_mult
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out))
        nn.init.xavier_uniform_(self.weight, gain=1 / lr_mult)  # effective weight: plain xavier

    def forward(self, x):
        return F.linear(x, self.weight * self.lr_mult, self.bias * self.lr_mult)

def normalize_2nd_moment(x, eps=1e-8):
    return x * (x.square().mean(dim=-1, keepdim=True) + eps).rsqrt()

def sincos_pos_embed(width, grid):
    """Fixed 2D sin-cos table [grid*grid, width]: half the channels encode the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = []
    for pos in (cols.flatten(), rows.flatten()):  # the authors' (MAE's) order: column half first
        ang = pos[:, None].double() * omega[None]  # [T, width/4]
        out += [ang.sin(), ang.cos()]
    return torch.cat(out, dim=1).float()  # [T, width]

def add_pos_table(module, name, width, grid, fixed):
    """The [1, T, width] sin-cos table: a parameter initialised to sin-cos (the authors' train.py turns
    requires_grad on for all of G and D, so theirs train), or with fixed=True the paper's fixed buffer."""
    table = sincos_pos_embed(width, grid)[None]
    if fixed:
        module.register_buffer(name, table, persistent=False)
    else:
        setattr(module, name, nn.Parameter(table))

def rope_2d(head_dim, grid, base=10000.0):
    """2D rotary tables (cos, sin), each [T, head_dim]: the first half of a head's dims rotates with the
    token's row, the second half with its column, on interleaved pairs."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # [half/2]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang = torch.cat([(p.flatten()[:, None] * freqs).repeat_interleave(2, dim=1) for p in (rows, cols)], 1)
    return ang.cos(), ang.sin()

def add_rope_tables(module, head_dim, grid, prefix_tokens=0):
    """rope_2d's tables as buffers [prefix + T, head_dim]; prefix tokens (D's [cls]) are not rotated."""
    cos, sin = rope_2d(head_dim, grid)
    module.register_buffer("rope_cos", F.pad(cos, (0, 0, prefix_tokens, 0), value=1.0), persistent=False)
    module.register_buffer("rope_sin", F.pad(sin, (0, 0, prefix_tokens, 0), value=0.0), persistent=False)

def apply_rope(x, cos, sin):
    """Rotates each pair (x[2i], x[2i+1]) of x [B, T, H, hd] by its token's angle (cos, sin: [T, 1, hd])."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return x * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin

# GPU memory: RMSNorm and the SwiGLU gate through autograd Functions that keep only their inputs for
# backward and recompute the rest there (one reduction; one SiLU): the same values and gradients as
# autograd's (test_gat.py checks both), one [T, C] and one [T, hidden] tensor fewer per row and block.
def rms_norm(x, weight=None, eps=None):
    """RMSNorm over the last dim, x / rms(x) * weight. Without a weight (G's norms: modulation scales them)
    autograd's own op keeps only x: nothing to save for a weight's gradient, nothing to gain."""
    if torch.is_grad_enabled() and weight is not None and (x.requires_grad or weight.requires_grad):
        return RMSNormSavingInput.apply(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)

class RMSNormSavingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps if eps is None else eps  # as F.rms_norm
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        up = torch.promote_types(x.dtype, torch.float32)  # bf16 in, fp32 math (as the fused kernel)
        xf, gw = x.to(up), grad.to(up) * weight.to(up)
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + ctx.eps)  # [..., 1], recomputed
        n = xf * rstd
        dx = rstd * (gw - n * (gw * n).mean(-1, keepdim=True))
        dw = (grad.to(up) * n).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dw, None

class SiLUGate(torch.autograd.Function):
    """silu(a) * b, keeping a and b (views of w12's output, kept anyway); backward recomputes silu(a)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward (--exact-gp): silu_backward has no derivative
            sig = torch.sigmoid(a)
            return grad * b * sig * (1 + a * (1 - sig)), grad * a * sig
        return torch.ops.aten.silu_backward(grad * b, a), F.silu(a).mul_(grad)

class Attention(nn.Module):
    """Multi-head self-attention with per-head RMSNorm on q and k (qk-norm keeps the logits bounded,
    which GAN training needs) and 2D RoPE, through fused scaled-dot-product attention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // heads)  # eps None: the dtype's machine epsilon, as the authors'
        self.k_norm = nn.RMSNorm(width // heads)
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).unbind(2)  # 3 x [B, T, H, hd]
        cos, sin = (r[:, None] for r in rope)  # [T, 1, hd]: the same angles for every head
        # the norms' weights cast to the activations' dtype keep bf16 autocast on the fused kernel
        q = apply_rope(rms_norm(q, self.q_norm.weight.to(q.dtype)), cos, sin).to(v.dtype)
        k = apply_rope(rms_norm(k, self.k_norm.weight.to(k.dtype)), cos, sin).to(v.dtype)
        # heads as [B, H, T, hd] views of token-major tensors: the output comes back token-major, so the
        # [B, T, C] input of proj is a view of it, not a second copy kept for backward
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, T, hd]
        return self.proj(x.transpose(1, 2).reshape(B, T, C))

class SwiGLU(nn.Module):
    """FFN with a SiLU-gated linear unit; hidden int(2/3 * 4C) keeps the FLOPs of a 4C GELU MLP."""

    def __init__(self, width):
        super().__init__()
        hidden = int(2 / 3 * 4 * width)
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)  # 2 x [B, T, hidden]
        return self.w3(SiLUGate.apply(a, b))  # silu(a) * b, without keeping silu(a) for backward

def xavier_init(module):
    """DiT's rule: every Linear (and the patch conv, seen as a matrix) xavier-uniform, bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)

def run_blocks(blocks, x, *args, ckpt_blocks=0):
    """Yields each block's output; the first ckpt_blocks blocks keep only their input for backward and
    are recomputed there. The first: backward reaches them last, when the later blocks' tensors are
    already freed, so rebuilding one block's tensors does not raise the peak (unless all are recomputed)."""
    for i, block in enumerate(blocks):
        if i < ckpt_blocks and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
        yield x

# ------------------------------------------------------------------------------------------------
# 3. Generator. G has no image input: every token starts as the position table (trained, from sin-cos); all
# variation enters through the style w = mapping([class vector, z]), which scales and gates each block
# (RMSNorm "scale/gate" modulation, no shift). K output heads read the token stream after depth/K,
# 2*depth/K, ... blocks; their outputs are accumulated, so level k = heads 1..k (MNG, coarse to fine).
class GBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ffn = SwiGLU(width)
        self.modulation = nn.Linear(width, 4 * width)  # SiLU(w) -> (s1, g1, s2, g2)

    def forward(self, x, silu_w, rope):
        s1, g1, s2, g2 = self.modulation(silu_w).unsqueeze(1).chunk(4, dim=-1)  # 4 x [B, 1, C]
        x = x + g1 * self.attn(rms_norm(x, eps=1e-6) * (1 + s1), rope)
        return x + g2 * self.ffn(rms_norm(x, eps=1e-6) * (1 + s2))

class MNGHead(nn.Module):
    """One of the K output heads: modulated RMSNorm, then a linear map of each token to a p x p patch."""

    def __init__(self, width, patch, channels):
        super().__init__()
        self.modulation = nn.Linear(width, width)
        self.linear = nn.Linear(width, patch * patch * channels)

    def forward(self, x, silu_w):
        s = self.modulation(silu_w).unsqueeze(1)  # [B, 1, C]
        return self.linear(rms_norm(x, eps=1e-6) * (1 + s))

def unpatchify(x, patch, channels):
    B, T, _ = x.shape
    g = math.isqrt(T)
    x = x.view(B, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
    return x.reshape(B, channels, g * patch, g * patch)

def size_config(size, patch, input_size):
    """MODEL_SIZES[size] checked against the patch: -> (its dict, width C, token grid side)."""
    if size not in MODEL_SIZES or input_size % patch:
        raise ValueError(f"size must be one of {list(MODEL_SIZES)} (got {size!r}) and the input side {input_size} "
                         f"must divide by the patch {patch}")
    return MODEL_SIZES[size], MODEL_SIZES[size]["width"], input_size // patch

class Generator(nn.Module):
    def __init__(self, size="XL", patch=2, num_classes=1000, channels=4, input_size=32, z_dim=64,
                 num_levels=4, ckpt_blocks=0, fixed_pos_embed=False):
        super().__init__()
        cfg, C, grid = size_config(size, patch, input_size)
        if cfg["depth"] % num_levels:
            raise ValueError(f"depth {cfg['depth']} must divide by the number of MNG levels K={num_levels}")
        depth = cfg["depth"]
        self.size, self.patch, self.channels, self.input_size = size, patch, channels, input_size
        self.num_classes, self.z_dim, self.width, self.ckpt_blocks = num_classes, z_dim, C, ckpt_blocks
        self.class_embed = nn.Embedding(num_classes, z_dim)
        self.mapping = nn.Sequential(EqualizedLinear(2 * z_dim, C), nn.SiLU(), EqualizedLinear(C, C))
        self.blocks = nn.ModuleList(GBlock(C, cfg["heads"]) for _ in range(depth))
        self.heads = nn.ModuleList(MNGHead(C, patch, channels) for _ in range(num_levels))
        self.head_after = [(k + 1) * (depth // num_levels) - 1 for k in range(num_levels)]  # block index
        add_pos_table(self, "tokens", C, grid, fixed_pos_embed)  # [1, T, C]: G's only input besides w
        add_rope_tables(self, C // cfg["heads"], grid)
        self.register_buffer("w_avg", torch.zeros(num_classes, C))  # per-class running mean of w
        self.w_avg_beta = 0.995
        xavier_init(self)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [h.modulation for h in self.heads]:
            nn.init.xavier_uniform_(m.weight, gain=0.1)  # start close to identity: (1 + s) ~ 1, g ~ 0

    def style(self, z, y, truncation=0.0, guidance=1.0):
        """w = mapping([class vector, z]), each part normalised to unit second moment. truncation moves
        w that fraction toward its class's running mean: 0 = none, 1 = the class-mean image. (This is
        the authors' convention; StyleGAN's psi is 1 - truncation.) Then, as in their code, guidance s
        extrapolates from the class-free style of the same z: w = w_null + s (w - w_null); 1 = off."""
        w = self.mapping(torch.cat([normalize_2nd_moment(self.class_embed(y)), normalize_2nd_moment(z)], 1))
        if truncation:
            w = w.lerp(self.w_avg[y].to(w.dtype), truncation)
        return self.null_style(z).to(w.dtype).lerp(w, guidance) if guidance != 1 else w

    def null_style(self, z, chunk=64):
        """w_null [B, C]: the mean over all classes c of mapping([class vector of c, z]), in chunks of
        classes so that classes x B x C never sits in memory at once. (The authors' code normalises the
        class vectors and z over the class axis here, which turns z into sign(z); we normalise each
        vector as in every other use of the mapping.)"""
        z = normalize_2nd_moment(z)[:, None]  # [B, 1, z_dim]
        total = 0
        for e in normalize_2nd_moment(self.class_embed.weight).split(chunk):  # [chunk, z_dim]
            pairs = torch.cat([e.expand(len(z), -1, -1), z.expand(-1, len(e), -1)], -1)  # [B, chunk, 2 z_dim]
            total = total + self.mapping(pairs).sum(1)
        return total / self.num_classes

    def forward(self, z, y, truncation=0.0, guidance=1.0):
        """Returns (levels [K, B, channels, H, W] coarse to fine, w [B, C]); levels[-1] is the image."""
        w = self.style(z, y, truncation, guidance)
        return self.synthesis(w), w

    def synthesis(self, w):
        """Style w [B, C] -> levels [K, B, channels, H, W] (interpolations in w call this directly)."""
        silu_w = F.silu(w)  # shared by every modulation layer
        x = self.tokens.expand(w.shape[0], -1, -1)  # [B, T, C]; the residual stream stays fp32 under autocast
        levels, out = [], 0
        for i, x in enumerate(run_blocks(self.blocks, x, silu_w, (self.rope_cos, self.rope_sin),
                                         ckpt_blocks=self.ckpt_blocks)):
            if i in self.head_after:
                head = self.heads[self.head_after.index(i)]
                out = out + unpatchify(head(x, silu_w), self.patch, self.channels)
                levels.append(out)
        return torch.stack(levels)

    @torch.no_grad()
    def generate(self, z, y, truncation=0.0, guidance=1.0):
        """Sampling: one network evaluation, the finest level only."""
        return self(z, y, truncation, guidance)[0][-1]

    @torch.no_grad()
    def update_class_means(self, w, y):
        """w_avg[c] <- lerp(mean of this batch's w of class c, w_avg[c], 0.995), for classes present.
        Under DDP the sums are all-reduced so that every rank keeps the same means (a kept deviation:
        the authors' is a bf16 lerp under autocast, one copy per rank)."""
        w = w.to(self.w_avg.dtype)  # fp32 (or a double G's float64), whatever autocast made of w
        sums = w.new_zeros(self.num_classes, w.shape[1] + 1).index_add_(0, y, torch.cat([w, w.new_ones(len(y), 1)], 1))
        if dist.is_initialized():
            dist.all_reduce(sums)  # [classes, C + 1]: per-class sums of w and, last, the counts
        sums, counts = sums[:, :-1], sums[:, -1]
        batch_mean = sums / counts.clamp(min=1)[:, None]
        self.w_avg.copy_(torch.where(counts[:, None] > 0, batch_mean.lerp(self.w_avg, self.w_avg_beta), self.w_avg))

# ------------------------------------------------------------------------------------------------
# 4. Discriminator. One forward sees all K levels at once (concatenated on channels) and gives one
# logit: a [cls] token, LayerScale pre-norm blocks, and projection conditioning (the [cls] feature
# dotted with a mapped class vector). The REPA projector maps D's final tokens to the teacher's space.
class DBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)  # weights for rms_norm
        self.attn = Attention(width, heads)
        self.ffn = SwiGLU(width)
        self.ls1 = nn.Parameter(torch.full((width,), 0.1))  # LayerScale: residual branches start small
        self.ls2 = nn.Parameter(torch.full((width,), 0.1))

    def forward(self, x, rope):
        x = x + self.ls1 * self.attn(rms_norm(x, self.norm1.weight, 1e-6), rope)
        return x + self.ls2 * self.ffn(rms_norm(x, self.norm2.weight, 1e-6))

class Discriminator(nn.Module):
    def __init__(self, size="XL", patch=2, num_classes=1000, channels=4, input_size=32, num_levels=4,
                 repa_dim=768, ckpt_blocks=0, fixed_pos_embed=False):
        super().__init__()
        cfg, C, grid = size_config(size, patch, input_size)
        P = cfg["proj_dim"]
        self.size, self.patch, self.width, self.ckpt_blocks = size, patch, C, ckpt_blocks
        self.patch_embed = nn.Conv2d(num_levels * channels, C, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.blocks = nn.ModuleList(DBlock(C, cfg["heads"]) for _ in range(cfg["depth"]))
        self.final_norm = nn.RMSNorm(C, eps=1e-6)
        self.logit_proj = nn.Linear(C, P)
        self.class_embed = nn.Embedding(num_classes, P)
        self.class_mapping = nn.Sequential(EqualizedLinear(P, P), nn.SiLU(), EqualizedLinear(P, P))
        self.repa_projector = nn.Sequential(nn.Linear(C, P), nn.SiLU(), nn.Linear(P, P), nn.SiLU(),
                                            nn.Linear(P, repa_dim)) if repa_dim else None
        add_pos_table(self, "pos", C, grid, fixed_pos_embed)  # [1, T, C]
        add_rope_tables(self, C // cfg["heads"], grid, prefix_tokens=1)  # [cls] first
        xavier_init(self)
        nn.init.normal_(self.class_embed.weight, std=0.02)

    def forward(self, x, y, repa_rows=0):
        """x: [B, K*channels, H, W], the K levels on channels. Returns (logits [B], REPA features of the
        first repa_rows samples [repa_rows, 1+T, repa_dim] or None)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # [B, T, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B, 1+T, C]
        for x in run_blocks(self.blocks, x, (self.rope_cos, self.rope_sin), ckpt_blocks=self.ckpt_blocks):
            pass
        cls = self.logit_proj(rms_norm(x[:, 0], self.final_norm.weight, 1e-6))  # [B, P]
        logits = (cls * self.class_mapping(self.class_embed(y))).sum(-1)  # projection discriminator
        feats = self.repa_projector(x[:repa_rows]) if repa_rows else None
        return logits, feats

def levels_to_channels(levels):
    """[K, B, C, H, W] -> [B, K*C, H, W]: D's input, coarse level first."""
    K, B, C, H, W = levels.shape
    return levels.transpose(0, 1).reshape(B, K * C, H, W)

# ------------------------------------------------------------------------------------------------
# 5. Multi-level noise-perturbed image guidance (MNG). Level k of G (coarse to fine) is shown to D as
# (1 - t_k) x_k + n_k with t = 1 - 0.125^(1 - k/(K-1)) + 0.01, i.e. [0.885, 0.76, 0.51, 0.01] for
# K = 4: early heads are judged only on coarse structure, which guides G's early blocks directly. The
# noises are nested (built from the finest level up) so that all K levels lie on one forward-noising
# path: n_k = d n_(k+1) + sqrt(t_k^2 - (d t_(k+1))^2) eps_k, d = (1 - t_k)/(1 - t_(k+1)), std(n_k) = t_k.
def mng_noise_levels(K, min_info=0.125):
    if K < 2:
        return []  # no MNG: a single level and no noise
    return [1 - min_info ** (1 - k / (K - 1)) + 0.01 for k in range(K)]

def mng_perturb(levels, eps):
    """levels, eps: [K, B, C, H, W]; eps ~ N(0, I), passed in so that a penalty's nudged copy can reuse it."""
    t = mng_noise_levels(levels.shape[0])
    if not t:
        return levels
    out, n, t_prev = [None] * len(t), 0.0, 0.0
    for k in reversed(range(len(t))):
        d = (1 - t[k]) / (1 - t_prev)
        n = d * n + math.sqrt(t[k] ** 2 - (d * t_prev) ** 2) * eps[k]
        out[k] = (1 - t[k]) * levels[k] + n
        t_prev = t[k]
    return torch.stack(out)

# ------------------------------------------------------------------------------------------------
# 6. Augmentation: DiffAugment (color on half the batch, translation by up to 1/8, cutout of half
# size, horizontal flip with probability 0.4) on latents, always on for ImageNet. Parameters are drawn
# once per sample (the colour means from the clean finest level) and shared by all K levels and by a
# penalty's nudged copy, so D compares like with like. The REPA teacher's image gets the same
# translation and flip, by the same fraction of its own size (a kept deviation: the authors' integer
# arithmetic shifts their 224-px teacher image by floor(tx * 32 / 224) pixels, 0 or -1, whatever the
# latent's shift). `policy` names the operations used; the others are simply not drawn.
def sample_augment(x, policy=AUGMENT_POLICY):
    """Parameters for the batch whose clean finest level is x [B, C, H, W] (for reals the clean real)."""
    (B, _, size, _), device = x.shape, x.device
    u = lambda: torch.rand(B, device=device)
    ops, p = policy.split(","), {}
    if "color" in ops:  # the saturation and contrast means are x's, kept with the parameters (as the authors)
        p.update(color=u() < 0.5, brightness=u() - 0.5, saturation=2 * u(), contrast=u() + 0.5,
                 sat_mean=x.mean(dim=-3, keepdim=True), con_mean=x.mean(dim=(-3, -2, -1), keepdim=True))
    if "translation" in ops:
        shift = int(size * 0.125 + 0.5)
        p.update(tx=torch.randint(-shift, shift + 1, (B,), device=device) / size,  # fractions of the image
                 ty=torch.randint(-shift, shift + 1, (B,), device=device) / size)
    if "cutout" in ops:
        cut = int(size * 0.5 + 0.5)
        p.update(cut_x=torch.randint(0, size + 1 - cut % 2, (B,), device=device) / size,
                 cut_y=torch.randint(0, size + 1 - cut % 2, (B,), device=device) / size)
    if "flip" in ops:
        p.update(flip=u() < 0.4)
    return p

def translate(x, tx, ty):
    """x [..., B, C, H, W] shifted by (tx, ty) fractions of its size (rounded to pixels), zero fill."""
    H, W = x.shape[-2:]
    rows = torch.arange(H, device=x.device) + (tx * H).round().long()[:, None]  # [B, H] source rows
    cols = torch.arange(W, device=x.device) + (ty * W).round().long()[:, None]  # [B, W] source cols
    inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[:, None, None, :]
    x = x.gather(-2, rows.clamp(0, H - 1)[:, None, :, None].expand_as(x))
    x = x.gather(-1, cols.clamp(0, W - 1)[:, None, None, :].expand_as(x))
    return x * inside  # inside: [B, 1, H, W]

def augment(x, p, teacher=False):
    """x: [..., B, C, H, W] (leading level dim allowed). The teacher image gets translation and flip only."""
    if "color" in p and not teacher:
        # one affine map per sample, y = ((x + b - m_s) S + m_s - m_c) C + m_c, with the means m_s (over
        # channels, per pixel) and m_c (over everything) of the clean finest level rather than of x: a
        # nudged copy gets exactly the same map, and with S < 1 a coarse level is pulled toward the finest
        # level's channel mean (with C < 1 toward its overall mean), not toward its own
        b, S, C = (p[k][:, None, None, None] for k in ("brightness", "saturation", "contrast"))
        y = ((x + b - p["sat_mean"]) * S + p["sat_mean"] - p["con_mean"]) * C + p["con_mean"]
        x = torch.where(p["color"][:, None, None, None], y, x)
    if "tx" in p:
        x = translate(x, p["tx"], p["ty"])
    if "cut_x" in p and not teacher:
        H, W = x.shape[-2:]
        cut = int(H * 0.5 + 0.5)
        r0 = (p["cut_x"] * H).round().long()[:, None] - cut // 2  # [B, 1]
        c0 = (p["cut_y"] * W).round().long()[:, None] - cut // 2
        r, c = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        hole = ((r >= r0) & (r < r0 + cut))[:, :, None] & ((c >= c0) & (c < c0 + cut))[:, None, :]  # [B, H, W]
        x = x * (~hole)[:, None]
    if "flip" in p:
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
    return x

# ------------------------------------------------------------------------------------------------
# 7. Losses (one screen). D step: relativistic loss + gamma/2 (R1 + R2) + REPA. G step: the
# relativistic loss with the roles swapped. The approximated penalties replace ||grad_x D||^2 by the
# finite difference ((D(x) - D(x + sigma eps)) / sigma)^2, whose expectation over eps is the same to
# first order: no double backward, so the whole step can be compiled and uses fused attention.
def relativistic_loss(logits_a, logits_b):
    """The relativistic pairing loss for the player who wants a to score above b."""
    return F.softplus(-(logits_a - logits_b)).mean()

def approx_gradient_penalty(logits, logits_nudged, sigma):
    """Precision matters here: under bf16 autocast the two forwards round independently, and at the
    paper's sigma = 0.01 rounding dominates their difference (README). The authors' code rounds the same
    way and we keep their sigma; --precision fp32 or --gp-sigma 0.1 are the experiments to run."""
    return ((logits - logits_nudged) / sigma).square().mean()

def exact_gradient_penalty(logits, inputs):
    """||grad_x D(x)||^2, averaged over the batch; inputs [B, C, H, W] or, for the K levels, [K, B, C, H, W]."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.square().sum() / grad.shape[-4]

def repa_loss(d_feats, teacher_feats):
    """REPA on D: (1 - cos) on the [cls] token and the mean (1 - cos) over the patch tokens.
    Both [B, 1+T, dim]; returns (cls term, patch term), each 0 when aligned and 2 when opposite."""
    cos = F.cosine_similarity(d_feats.float(), teacher_feats.float(), dim=-1)  # [B, 1+T]
    return (1 - cos[:, 0]).mean(), (1 - cos[:, 1:]).mean()

@torch.no_grad()
def cknna(a, b, k=10):
    """A diagnostic, not a loss: CKNNA (Huh et al. 2024, the alignment REPA reports) between a [B, dim] and
    b [B, dim']: the centred kernel alignment of their cosine similarities, counted only over pairs that
    are among each other's k nearest in both spaces. It is relational (does D order the batch as the teacher
    does?), where the REPA loss is per sample; 1 = aligned, near 0 = unrelated. In float64, which autocast
    leaves alone."""
    n, k = len(a), min(k, len(a) - 1)
    K, L = (F.normalize(t.double(), dim=-1) @ F.normalize(t.double(), dim=-1).T for t in (a, b))  # [B, B]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    knn = lambda S: torch.zeros_like(S).scatter_(1, S.masked_fill(eye, -2).topk(k, dim=1).indices, 1.0)
    H = torch.eye(n, dtype=torch.float64, device=a.device) - 1 / n  # centring

    def hsic(X, Y, mask):  # biased HSIC of the masked kernels; constants cancel in the ratio
        return (H @ (X * mask) @ H * (Y * mask)).sum()
    kl = hsic(K, L, knn(K) * knn(L))
    return (kl / (hsic(K, K, knn(K)) * hsic(L, L, knn(L))).clamp_min(1e-12).sqrt()).float()

def build_repa_teacher(name=REPA_TEACHER, pretrained=True, img_size=224, **overrides):
    """Frozen DINOv2 ViT-B/14 from timm: [cls] + 16x16 patch tokens of 768 dims at 224 px; at 448 px (for
    512-px images, as REPA does) 32x32, timm resampling the position table. Tests pass pretrained=False
    (random weights, no download) and small overrides such as depth=1."""
    import timm
    model = timm.create_model(name, pretrained=pretrained, img_size=img_size, num_classes=0, **overrides)
    # its input normalisation as buffers: they move to the GPU with the model, so the step never copies
    # host data to the device (a torch.tensor(..., device=cuda) would stall the host on every step)
    model.register_buffer("pixel_mean", torch.tensor(model.pretrained_cfg["mean"])[:, None, None], persistent=False)
    model.register_buffer("pixel_std", torch.tensor(model.pretrained_cfg["std"])[:, None, None], persistent=False)
    return model.eval().requires_grad_(False)

@torch.no_grad()
def teacher_features(teacher, images_u8, aug, grid):
    """images_u8 [B, H, W, 3] -> teacher tokens [B, 1+grid*grid, dim], with the reals' translation/flip."""
    x = images_u8.permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W]
    size = teacher.patch_embed.img_size  # 224, or 448 for 512-px images
    x = F.interpolate((x - teacher.pixel_mean) / teacher.pixel_std, size=size, mode="bicubic")
    x = augment(x, aug, teacher=True)
    tokens = teacher.forward_features(x)  # [B, prefix + (size/14)^2, dim]
    cls, patches = tokens[:, :1], tokens[:, teacher.num_prefix_tokens:]
    g = math.isqrt(patches.shape[1])
    if g != grid:  # D has fewer tokens at patch 4 or 8: resize the teacher's token map to match
        patches = patches.transpose(1, 2).reshape(-1, patches.shape[2], g, g)  # [B, dim, g, g]
        patches = F.interpolate(patches.float(), size=grid, mode="bicubic").flatten(2).transpose(1, 2)
    return torch.cat([cls, patches.to(cls.dtype)], dim=1)

def exact_gp_attention(cfg):
    """--exact-gp differentiates D twice: the math attention kernel (the fused ones have no second derivative), in
    D's forward and in the D step's backward, where the blocks --grad-ckpt recomputes run D's forward again."""
    return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if cfg.exact_gp else contextlib.nullcontext()

def d_loss(D, fake_levels, x_real, y, cfg, teacher=None, images_u8=None):
    """The D step's loss. One D forward over a 4B batch [real, real nudged, fake, fake nudged]: the
    nudged copies are the approximated penalties' x + sigma*eps, under the same augmentation and the
    same MNG noise as x. REPA features are read on the first B rows (the clean reals) only."""
    K, B = fake_levels.shape[:2]
    aug_real, aug_fake = sample_augment(x_real, cfg.augment), sample_augment(fake_levels[-1], cfg.augment)
    eps_real = torch.randn((K, *x_real.shape), device=x_real.device, dtype=x_real.dtype)  # own noise per level
    eps_fake = torch.randn_like(fake_levels)
    # a real is the same image at every level: augmented once, then repeated over the K levels
    see_real = lambda x: levels_to_channels(mng_perturb(augment(x, aug_real).expand(K, *x.shape), eps_real))
    see_fake = lambda levels: levels_to_channels(mng_perturb(augment(levels, aug_fake), eps_fake))
    repa_rows = B if teacher is not None else 0
    if teacher is not None:  # before D's forward: the teacher's temporaries come and go below D's saved tensors
        target = teacher_features(teacher, images_u8, aug_real, x_real.shape[-1] // cfg.patch)
    if cfg.exact_gp:  # ablation: true R1/R2 by double backward
        x_real, fake_levels = x_real.detach().requires_grad_(), fake_levels.detach().requires_grad_()
        with exact_gp_attention(cfg):
            logits, feats = D(torch.cat([see_real(x_real), see_fake(fake_levels)]), y.repeat(2), repa_rows)
            l_real, l_fake = logits.float().chunk(2)
            r1, r2 = exact_gradient_penalty(l_real, x_real), exact_gradient_penalty(l_fake, fake_levels)
    else:
        nudged_real = x_real + cfg.gp_sigma * torch.randn_like(x_real)
        nudged_fake = fake_levels + cfg.gp_sigma * torch.randn_like(fake_levels)
        d_in = torch.cat([see_real(x_real), see_real(nudged_real),
                          see_fake(fake_levels), see_fake(nudged_fake)])  # [4B, K*C, H, W]
        logits, feats = D(d_in, y.repeat(4), repa_rows)
        l_real, l_real_n, l_fake, l_fake_n = logits.float().chunk(4)
        r1 = approx_gradient_penalty(l_real, l_real_n, cfg.gp_sigma)
        r2 = approx_gradient_penalty(l_fake, l_fake_n, cfg.gp_sigma)
    adv = relativistic_loss(l_real, l_fake)
    loss = adv + cfg.r1_gamma / 2 * r1 + cfg.r2_gamma / 2 * r2
    logs = dict(d_adv=adv, r1=r1, r2=r2, d_real=l_real.mean(), d_fake=l_fake.mean())
    if teacher is not None:
        repa_cls, repa_patch = repa_loss(feats, target)
        loss = loss + cfg.repa_weight * (repa_cls + repa_patch)
        logs.update(repa_cls=repa_cls, repa_patch=repa_patch, align_cknna=cknna(feats[:, 0], target[:, 0]))
    return loss, logs

def g_loss(D, fake_levels, x_real, y, cfg):
    """The G step's loss: fresh augmentation and noise; D(real) without gradient (it is a constant
    for G), D(fake) with gradient flowing back into G. D's weights are frozen by the caller."""
    K = fake_levels.shape[0]
    aug_real, aug_fake = sample_augment(x_real, cfg.augment), sample_augment(fake_levels[-1], cfg.augment)
    with torch.no_grad():
        real_levels = augment(x_real, aug_real).expand(K, *x_real.shape)  # augmented once, as in d_loss
        l_real = D(levels_to_channels(mng_perturb(real_levels, torch.randn_like(real_levels))), y)[0]
    l_fake = D(levels_to_channels(mng_perturb(augment(fake_levels, aug_fake), torch.randn_like(fake_levels))), y)[0]
    return relativistic_loss(l_fake.float(), l_real.float())

# ------------------------------------------------------------------------------------------------
# 8. Optimiser. Width-aware learning rate (paper): lr = base * C_base / C with C_base = 768, for G and
# D separately, so that an update changes a layer's output by the same amount at every width. AdamW
# with beta1 = 0 (no momentum, as GANs prefer), beta2 = 0.99, no weight decay; gradients clipped to 1.
def width_aware_lr(width, base_lr=2e-4, base_width=768):
    return base_lr * base_width / width

def make_optimizer(model, cfg):
    return torch.optim.AdamW(model.parameters(), lr=width_aware_lr(model.width, cfg.base_lr),
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=0.0,
                             fused=True)  # one kernel for all parameters, step counts kept on the device

@torch.no_grad()
def update_ema(ema, model, decay):
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)  # the class means of w are copied, not averaged

# ------------------------------------------------------------------------------------------------
# 9. Data. ImageNet: the folder prep_latents.py writes and its load_latents reads (memory-mapped float16
# posterior moments, uint8 images for REPA, labels). Every step draws a fresh posterior sample, latent =
# scale (mean + std eps - shift), on the device (SD-VAE: scale 0.18215, shift 0). The order is a seeded
# permutation per epoch; the global batch at step s is perm[s*B:(s+1)*B] and rank r takes its slice, so the
# data position is the step itself and a resume continues the exact sequence.
def batch_rows(n, B, b, rank, seed, step):
    """Rows (of n) in rank's share b of global batch `step` of size B, drop-last epochs."""
    epoch, j = divmod(step, n // B)
    return epoch_permutation(n, seed, epoch)[j * B + rank * b: j * B + (rank + 1) * b]

@functools.lru_cache(maxsize=2)  # 1.28M indices drawn once per epoch, not per step
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).numpy()

class LatentBatches(torch.utils.data.Dataset):
    """Item i = this rank's slice of global batch start + i: (moments f16, images u8, labels), read in
    DataLoader workers from the memory maps with one sorted fancy index per array (no per-file I/O)."""

    def __init__(self, data, cfg, rank, world, start):
        self.data, self.cfg, self.rank, self.world, self.start = data, cfg, rank, world, start

    def __len__(self):
        return self.cfg.steps - self.start

    def __getitem__(self, i):
        B, n = self.cfg.batch_size, len(self.data["index"])
        idx = np.sort(self.data["index"][batch_rows(n, B, B // self.world, self.rank, self.cfg.seed, self.start + i)])
        return tuple(torch.from_numpy(np.ascontiguousarray(self.data[k][idx])) for k in ("moments", "images", "labels"))

DIGITS_TRAIN = 1297  # training split of the digits (known before loading them, for validate_config)

def load_digits_dataset():
    """The 1,797 8x8 digits that scikit-learn ships (offline), in [-1, 1], split 1,297 train / 500
    held out (the demo judge's) with a fixed seed. The GAN trains on the first split only."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1  # [1797, 1, 8, 8], 0..16 -> -1..1
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
    return dict(x=x[train], y=y[train], x_held=x[held], y_held=y[held], num_classes=10)

def prepare_data(cfg):
    """Loads the data and fills in what it implies (classes, channels, size, kind, run name) on cfg."""
    if cfg.data == "digits":
        data = load_digits_dataset()
        cfg.channels, cfg.input_size, cfg.data_kind = 1, 8, "pixel"
    else:
        data = load_latents(cfg.data)
        man = data["manifest"]  # a folder written before other VAEs were read holds SD-VAE latents
        cfg.channels, cfg.input_size, cfg.data_kind = data["moments"].shape[1] // 2, data["moments"].shape[-1], "latent"
        cfg.latent_scale, cfg.latent_shift = man.get("latent_scale", LATENT_SCALE), man.get("latent_shift", 0.0)
        cfg.image_size = data["images"].shape[1]
        cfg.vae = cfg.vae or man.get("vae", "stabilityai/sd-vae-ft-ema")
    cfg.num_classes = data["num_classes"]
    cfg.name = cfg.name or f"GAT-{cfg.size}-{cfg.patch}-{os.path.basename(os.path.normpath(cfg.data))}"
    return data

def batch_iterator(data, cfg, rank, world, start, device):
    """Yields (x_real, images_u8 or None, labels) on the device, from step `start` on."""
    if cfg.data_kind == "pixel":
        for step in range(start, cfg.steps):
            rows = torch.from_numpy(batch_rows(len(data["x"]), cfg.batch_size, cfg.batch_size // world, rank, cfg.seed, step))
            yield data["x"][rows].to(device), None, data["y"][rows].to(device)
        return
    workers = cfg.num_workers
    # the iterator draws its workers' base seed from `generator`: its own, or the run's CPU stream would move
    # one draw at each start and a resumed run would not continue the stream it left
    loader = torch.utils.data.DataLoader(LatentBatches(data, cfg, rank, world, start), batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None, generator=torch.Generator())
    for moments, images, labels in loader:
        mean, std = moments.to(device, non_blocking=True).float().chunk(2, dim=1)  # [b, C, h, w] each
        x = cfg.latent_scale * (mean + std * torch.randn_like(mean) - cfg.latent_shift)  # a fresh posterior sample
        yield x, images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

# ------------------------------------------------------------------------------------------------
# 10. Checkpoints: written to a temporary file, fsynced, then renamed over the old one, so a crash at
# any moment leaves the previous checkpoint intact. They hold everything an exact resume needs: the
# models, the EMA, both optimisers, the step and every rank's random streams.
CKPT_FORMAT = "gat-ckpt-v1"

class CheckpointError(UserError):
    pass

def atomic_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(dir_fd)  # make the rename itself durable
    os.close(dir_fd)

def read_torch_file(path):
    """torch.load with weights_only=True (no pickled code runs; the authors' checkpoints' argparse
    Namespace allowed as plain data), memory-mapped: tensors are read as they are copied into the
    models, and a node's ranks share one copy in the page cache (not 8 x 15 GB of host memory at XL)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format: read whole
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # torch's are long
        raise CheckpointError(f"cannot read checkpoint '{path}' (damaged or not a torch file): {first}") from e

def load_checkpoint(path):
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"'{path}' is not a gat.py checkpoint (expected format '{CKPT_FORMAT}')")
    return upgrade_checkpoint(ckpt)

def upgrade_checkpoint(ckpt):
    """Older checkpoints' configs: without fixed_pos_embed they were trained with fixed position tables,
    so they resume and load as that ablation; without latent_scale, on SD-VAE latents; "run" is the name
    (torchrun on Python 3.11 refuses --run as ambiguous)."""
    if isinstance(ckpt.get("config"), dict):
        old = dict(fixed_pos_embed=True, latent_scale=LATENT_SCALE, latent_shift=0.0, name=ckpt["config"].pop("run", ""))
        ckpt["config"] = old | ckpt["config"]
    return ckpt

def check_compatible(ckpt_cfg, cfg, path):
    keys = ("size", "patch", "num_levels", "fixed_pos_embed", "z_dim", "num_classes", "channels", "input_size", "data_kind",
            "latent_scale", "latent_shift")
    diff = {k: (ckpt_cfg.get(k), getattr(cfg, k)) for k in keys if ckpt_cfg.get(k) != getattr(cfg, k)}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint '{path}' does not match this run ({what}). Use the same "
                              "--size/--patch/--data, or another --name to start fresh.")

def seed_streams(seed, device):
    """Seeds this process's own random streams: the CPU generator and, on a GPU, only this process's
    device (torch.manual_seed seeds every visible GPU: a later call with a common seed, an evaluator's,
    would give every rank the same z, noise and augmentation)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)

def rng_state(device):
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})

def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

# ------------------------------------------------------------------------------------------------
# 11. Training loop. Per iteration, as in the paper: one D step, then one G step on the same real
# batch, labels and z; then the EMA of G and the class means of w. Forward passes per iteration, each
# needed: G without grad (the D step's fakes) and with grad (the G step); D once over the D step's 4B
# batch (reals and fakes for the loss, their nudged copies for the approximated R1/R2: one batched pass
# instead of four); in the G step D on reals without grad (the relativistic partner, a constant for G)
# and on fakes with backward to the input (G's gradient); the REPA teacher once, on the reals. Host
# syncs (loss values, NaN check, stop flags) happen only at the end of a log interval.
def build_generator(cfg):
    return Generator(cfg.size, cfg.patch, cfg.num_classes, cfg.channels, cfg.input_size, cfg.z_dim,
                     cfg.num_levels, fixed_pos_embed=cfg.fixed_pos_embed)

def build_models(cfg, device, pretrained_teacher=True):
    """G, D, the EMA copy of G, and the frozen REPA teacher (None without REPA or in pixel space). The
    blocks to recompute are set afterwards (setup_recompute), once the models' sizes are known."""
    G = build_generator(cfg).to(device)
    use_repa = cfg.repa_weight > 0 and cfg.data_kind == "latent"
    teacher = (build_repa_teacher(cfg.repa_teacher, pretrained_teacher, img_size=224 * cfg.image_size // 256).to(device)
               if use_repa else None)
    D = Discriminator(cfg.size, cfg.patch, cfg.num_classes, cfg.channels, cfg.input_size, cfg.num_levels,
                      repa_dim=teacher.embed_dim if use_repa else 0, fixed_pos_embed=cfg.fixed_pos_embed).to(device)
    return G, D, copy.deepcopy(G).eval().requires_grad_(False), teacher

@dataclass
class Models:
    """G and D as each step calls them (DDP, compiled), and the plain modules underneath. G_fakes (the D
    step's fakes, no grad) and D_frozen (the G step's critic) run outside DDP: no weight gradients."""
    G: nn.Module
    D: nn.Module
    G_fakes: nn.Module
    D_frozen: nn.Module
    G_raw: nn.Module
    D_raw: nn.Module
    G_ema: nn.Module

def use_bf16(cfg, device):
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

def set_tf32(allowed):
    """TF32 for the fp32 matmuls left outside bf16 autocast in a bf16 run; --precision fp32 stays IEEE."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed

def wrap_models(G_raw, D_raw, G_ema, cfg, world, device):
    """DDP (several processes) and torch.compile around G and D -> (Models, autocast)."""
    G, D = G_raw, D_raw
    if world > 1:  # gradient_as_bucket_view: gradients live in DDP's buckets, not in a copy beside them (4 GiB at XL)
        ddp = functools.partial(nn.parallel.DistributedDataParallel, device_ids=[device.index] if device.type == "cuda"
                                else None, broadcast_buffers=False, gradient_as_bucket_view=True)
        G, D = ddp(G_raw), ddp(D_raw)
    models = Models(G=G, D=D, G_fakes=G_raw, D_frozen=D_raw, G_raw=G_raw, D_raw=D_raw, G_ema=G_ema)
    if cfg.compile:  # dynamic=False: each call site its own static graphs (D sees 4B rows, then B)
        models.G, models.D, models.G_fakes, models.D_frozen = map(functools.partial(torch.compile, dynamic=False),
                                                                  (G, D, G_raw, D_raw))
    return models, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device))

def clip_gradients(model, max_norm, name, groups=4):
    """clip_grad_norm_ that also measures, from its one pass over the gradients: the total norm (before clipping)
    and the RMS of the blocks' norms over each quarter of the depth (q1 earliest; the paper's signs of a failing
    run are per block: G's early blocks idle). On the device: no host sync."""
    params = [p for p in model.parameters() if p.grad is not None]
    norms = torch.stack(torch._foreach_norm([p.grad for p in params]))  # [parameters]
    total = torch.linalg.vector_norm(norms)
    torch._foreach_mul_([p.grad for p in params], (max_norm / (total + 1e-6)).clamp(max=1.0))
    block_params = list(model.blocks.parameters())  # one run of the parameter list, block after block
    first = next(i for i, p in enumerate(params) if p is block_params[0])
    per_block = norms[first:first + len(block_params)].square().view(len(model.blocks), -1)
    quarters = per_block.sum(1).view(groups, -1).mean(1).sqrt()
    return {f"grad_norm_{name}": total} | {f"grad_{name}_q{i + 1}": q for i, q in enumerate(quarters)}

def sync_on_last(model, i, n):
    """DDP all-reduces gradients in every backward; while accumulating, only the last micro-batch's."""
    no_sync = getattr(model, "no_sync", None)  # DDP, also seen through a torch.compile wrapper
    return no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()

def d_step(models, opt_D, teacher, micro, cfg, autocast):
    """D's update over the step's micro-batches [(x_real, images, y, z)]: each loss scaled by 1/N so
    that the gradient and the logged values are the whole batch's means; one clip, one step."""
    opt_D.zero_grad(set_to_none=True)
    logs = {}
    for i, (x_real, images, y, z) in enumerate(micro):
        # G's forward in an autocast block of its own: autocast caches the bf16 copies of weights that
        # require grad, even under no_grad, until its block ends; here they are freed before D's backward
        with torch.no_grad(), autocast:
            fake = models.G_fakes(z, y)[0]  # G's output is a constant for D
        with sync_on_last(models.D, i, len(micro)), autocast, exact_gp_attention(cfg):
            loss, parts = d_loss(models.D, fake, x_real, y, cfg, teacher, images)
            (loss / len(micro)).backward()
        for k, v in (parts | {"loss_D": loss}).items():
            logs[k] = logs.get(k, 0) + v.detach() / len(micro)
    logs |= clip_gradients(models.D_raw, cfg.grad_clip, "D")
    opt_D.step()
    return logs

def g_step(models, opt_G, micro, cfg, autocast):
    """G's update over the same micro-batches (same reals, labels and z as the D step), D frozen so
    that its weight gradients are not computed. -> (logs, the step's w [b, C] for the class means)."""
    models.D_raw.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    loss_G, ws = 0, []
    for i, (x_real, images, y, z) in enumerate(micro):
        with sync_on_last(models.G, i, len(micro)), autocast:
            fake, w = models.G(z, y)
            loss = g_loss(models.D_frozen, fake, x_real, y, cfg)
            (loss / len(micro)).backward()
        loss_G = loss_G + loss.detach() / len(micro)
        ws.append(w.detach())
    logs = clip_gradients(models.G_raw, cfg.grad_clip, "G") | dict(loss_G=loss_G)
    opt_G.step()
    models.D_raw.requires_grad_(True)
    return logs, torch.cat(ws)

def train_step(models, opt_G, opt_D, teacher, batch, cfg, autocast):
    """One iteration: the D step, then the G step, each over cfg.grad_accum micro-batches of this rank's
    batch; then the class means of w and the EMA."""
    x_real, images, y = batch
    z = torch.randn(x_real.shape[0], cfg.z_dim, device=x_real.device)  # drawn once: the same z for any N
    n = cfg.grad_accum
    micro = list(zip(x_real.chunk(n), images.chunk(n) if images is not None else [None] * n, y.chunk(n), z.chunk(n)))
    logs = d_step(models, opt_D, teacher, micro, cfg, autocast)
    logs_G, w = g_step(models, opt_G, micro, cfg, autocast)
    models.G_raw.update_class_means(w, y)  # once per step, over the whole batch
    update_ema(models.G_ema, models.G_raw, cfg.ema_decay)
    return logs | logs_G

STOP = {"signal": None}  # SIGTERM or Ctrl-C: a checkpoint and a clean exit after this step (several ranks: at the
                         # end of the log interval, where they agree)

def setup_distributed(cfg):
    """-> (rank, world, device): torchrun's process group (NCCL on GPUs, gloo on CPUs) or one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device

@dataclass
class Run:
    """What a run keeps between steps, declared in one place (open_run fills it in)."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    dir: str                            # results/<name>: config.json, metrics.jsonl, grids, checkpoints/
    data: dict                          # the memory-mapped latents, or the digits
    models: Models
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    teacher: nn.Module                  # the frozen REPA teacher, or None
    autocast: torch.autocast            # bf16 autocast, or disabled
    step: int                           # iterations done
    grid: tuple                         # the fixed (z, y) of the sample grids
    judge: object                       # the digits demo's fid.DigitsJudge, or None
    lazy: dict                          # loaded on first use: the VAE, Inception, FID reference stats
    flops_per_image: float              # model FLOPs per image and iteration, for the logged MFU
    log: object = None                  # rank 0's metrics.jsonl
    wandb: object = None                # the wandb module when logging there

    @property
    def master(self):
        return self.rank == 0

    @property
    def latest(self):
        return os.path.join(self.dir, "checkpoints", "latest.pt")

def open_run(cfg):
    """Everything a run needs before its first step, in the order that fails early and writes late."""
    rank, world, device = setup_distributed(cfg)
    set_tf32(use_bf16(cfg, device))
    data = prepare_data(cfg)
    check_batch_size(cfg, len(data["x"]) if cfg.data_kind == "pixel" else len(data["index"]), world)
    run_dir = os.path.join(cfg.results, cfg.name)
    resume_path = find_resume(cfg, os.path.join(run_dir, "checkpoints", "latest.pt"), world)
    if cfg.repa_weight > 0 and cfg.data_kind == "latent":
        import timm  # noqa: F401 (the teacher's library is part of the runtime measured next)
    outside = memory_outside_tensors(device, world)  # after NCCL's start (find_resume), before any model
    ckpt = load_checkpoint(resume_path) if resume_path else None  # read and checked before anything is written
    if ckpt:
        check_compatible(ckpt["config"], cfg, resume_path)
    if rank == 0:
        try:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg) | {"world_size": world}, f, indent=2)
        except OSError as e:
            raise UserError(f"--results {cfg.results!r}: cannot write the run folder {run_dir} ({e.strerror or e}); "
                            "give a writable folder") from e
    torch.default_generator.manual_seed(cfg.seed)  # identical initial weights on every rank (built on the CPU)
    G_raw, D_raw, G_ema, teacher = build_models(cfg, device)
    opt_G, opt_D = make_optimizer(G_raw, cfg), make_optimizer(D_raw, cfg)
    if ckpt:
        restore(ckpt, G_raw, D_raw, G_ema, opt_G, opt_D, cfg, rank, world, device)
    else:
        seed_streams(cfg.seed * 1000 + rank + 1, device)  # each rank its own z, augmentation and noise
    memory_line, _ = setup_recompute(cfg, G_raw, D_raw, teacher, device, world, outside)
    models, autocast = wrap_models(G_raw, D_raw, G_ema, cfg, world, device)
    # the sample grid: rows = classes (the authors' eight ImageNet classes, or the first ten), columns = z
    classes = [207, 360, 387, 974, 88, 979, 417, 279] if cfg.num_classes == 1000 else list(range(min(cfg.num_classes, 10)))
    grid_y = torch.tensor(classes).repeat_interleave(GRID_COLUMNS[cfg.data_kind])
    with torch.random.fork_rng(devices=[]):  # the judge neither shifts the run's CPU stream nor depends on it
        torch.default_generator.manual_seed(0)  # the CPU's only: fork_rng(devices=[]) restores no GPU stream
        judge = fid.DigitsJudge(data, device) if cfg.data_kind == "pixel" else None
    run = Run(cfg, rank, world, device, run_dir, data, models, opt_G, opt_D, teacher, autocast,
              step=ckpt["step"] if ckpt else 0, judge=judge, lazy={}, flops_per_image=model_flops(cfg, teacher)["per_iteration"],
              grid=(torch.randn(len(grid_y), cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)), grid_y))
    if run.master:
        if cfg.data_kind == "latent":  # fail now, not at the first sample grid hours later
            lazy_vae(run.lazy, cfg, device)
        run.log = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        run.wandb = start_wandb(cfg, run_dir, world) if cfg.wandb else None
        print(f"{'resumed from ' + resume_path + ' at step ' + str(run.step) + '; ' if ckpt else ''}GAT-{cfg.size}/{cfg.patch}: "
              f"G {count_params(G_raw):,} and D {count_params(D_raw):,} trainable parameters; lr G "
              f"{width_aware_lr(G_raw.width, cfg.base_lr):.3g}, D {width_aware_lr(D_raw.width, cfg.base_lr):.3g}; {world} "
              f"process(es) on {device}, {'bf16' if use_bf16(cfg, device) else 'fp32'}; run dir {run_dir}\n{memory_line}\n"
              f"stops at step {cfg.steps:,}" + (f" or after {cfg.max_minutes:g} minutes, whichever comes first"
                                                if cfg.max_minutes else "") + "; Ctrl-C saves a checkpoint and stops"
              + ("; then the demo prints what G learned" if judge else ""))
    return run

def find_resume(cfg, latest, world):
    """The checkpoint to resume from, or None. Rank 0 decides and every rank must see that file: a node
    without it would start at step 0 beside resumed ones and hang the job in mismatched collectives."""
    path = {"auto": latest if os.path.isfile(latest) else None, "none": None}.get(cfg.resume, cfg.resume)
    if world > 1:
        decided, seen = [path], [None] * world
        dist.broadcast_object_list(decided, src=0)
        path = decided[0]
        dist.all_gather_object(seen, path is None or os.path.isfile(path))
        if not all(seen):
            blind = [rank for rank, ok in enumerate(seen) if not ok]
            raise UserError(f"rank 0 resumes from '{path}', which rank(s) {blind} cannot see: --results must be a "
                            "folder shared by all nodes (a network file system), or copy the run's checkpoints/ "
                            "to every node before resuming")
    return path

def restore(ckpt, G, D, G_ema, opt_G, opt_D, cfg, rank, world, device):
    """Models, EMA, optimisers and this rank's random streams from a checkpoint."""
    for module, key in ((G, "G"), (D, "D"), (G_ema, "G_ema"), (opt_G, "opt_G"), (opt_D, "opt_D")):
        module.load_state_dict(ckpt[key])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    else:  # a different world size cannot continue the same random streams
        seed_streams(cfg.seed + 1000 * ckpt["step"] + rank, device)

def save_checkpoint(run, snapshot=False):
    """On every rank (each gives its random streams); rank 0 writes latest.pt, and a kept <step>.pt."""
    m = run.models
    state = dict(format=CKPT_FORMAT, config=dataclasses.asdict(run.cfg), step=run.step, G=m.G_raw.state_dict(),
                 D=m.D_raw.state_dict(), G_ema=m.G_ema.state_dict(), opt_G=run.opt_G.state_dict(), opt_D=run.opt_D.state_dict())
    rngs = [rng_state(run.device)] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng_state(run.device))
    if run.master:
        atomic_save(state | {"rng": [{k: v.cpu() for k, v in s.items()} for s in rngs]}, run.latest)
        if snapshot:
            snap = os.path.join(os.path.dirname(run.latest), f"{run.step:07d}.pt")
            shutil.copyfile(run.latest, f"{snap}.tmp.{os.getpid()}")
            os.replace(f"{snap}.tmp.{os.getpid()}", snap)

def progress_bar(cfg, step, master, terminal=None):
    """A bar on rank 0 in a terminal, over the time budget's seconds if there is one (else over steps).
    Off a terminal (nohup, SLURM), where each redraw stays in the log, log_interval prints plain lines."""
    from tqdm import tqdm
    off = not master or not (sys.stderr.isatty() if terminal is None else terminal)
    if cfg.max_minutes:
        return tqdm(total=round(cfg.max_minutes * 60), disable=off, dynamic_ncols=True,
                    bar_format="{desc} |{bar}| {elapsed} of the " + f"{cfg.max_minutes:g}-minute budget" + "{postfix}")
    return tqdm(total=cfg.steps, initial=step, disable=off, dynamic_ncols=True)

def start_wandb(cfg, run_dir, world):
    """The wandb run of this run folder, its id kept there so that a resume continues it -> the module."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"--wandb {cfg.wandb} needs the wandb package: pip install wandb") from None
    id_path = os.path.join(run_dir, "wandb_id.txt")
    if not os.path.isfile(id_path):
        with open(id_path, "w") as f:
            f.write(os.urandom(8).hex())  # any unique string names a wandb run
    with open(id_path) as f:
        run_id = f.read().strip()
    wandb.init(project=cfg.wandb, name=os.path.basename(run_dir), id=run_id, resume="allow", dir=run_dir,
               config=dataclasses.asdict(cfg) | {"world_size": world})
    return wandb

def sync_interval(run, sums, n_sum, seconds, stop):
    """The interval's one host sync: mean metrics over steps and ranks, the NaN check, and the stop flag
    (any rank's signal or clock stops every rank) -> (metrics, stop)."""
    names = sorted(sums)
    vec = torch.stack([sums[k] / n_sum for k in names] + [torch.tensor(float(bool(stop)), device=run.device)])
    if run.world > 1:
        dist.all_reduce(vec)
        vec[:-1] /= run.world
    *values, stop = vec.tolist()
    metrics = dict(zip(names, values))
    if not all(map(math.isfinite, values)):
        raise FloatingPointError(
            f"non-finite values ({', '.join(k for k, v in metrics.items() if not math.isfinite(v))}) between steps "
            f"{run.step - n_sum} and {run.step}: the run stopped. The last good checkpoint is kept untouched in "
            f"{os.path.dirname(run.latest)}; resume from it with a lower --base-lr or other changes.")
    metrics.update(step=run.step, lr_G=run.opt_G.param_groups[0]["lr"], lr_D=run.opt_D.param_groups[0]["lr"],
                   images_per_s=n_sum * run.cfg.batch_size / max(seconds, 1e-9))
    metrics["model_tflops"] = run.flops_per_image * metrics["images_per_s"] / run.world / 1e12  # per process
    if run.device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        metrics["mfu"] = metrics["model_tflops"] * 1e12 / gpu_peak_flops(run.device)[0]
    return metrics, stop > 0

def log_interval(run, metrics, bar):
    """Grid, demo figures and FID when due; then metrics.jsonl, wandb and the bar (or a plain line)."""
    cfg, step, images = run.cfg, run.step, {}
    if cfg.sample_every and step % cfg.sample_every == 0 or step == cfg.steps:
        if run.master:
            path = os.path.join(run.dir, f"samples_{step:07d}_trunc{cfg.sample_truncation:g}.png")
            write_sample_grid(run.models.G_ema, cfg, *run.grid, path, run.lazy, run.device, run.autocast)
            images = {"samples": run.wandb.Image(path)} if run.wandb else {}
        if run.judge:
            metrics.update(run.judge.evaluate(run.models.G_ema))
    if cfg.fid_every and step % cfg.fid_every == 0:
        metrics["fid"] = training_fid(run.models.G_ema, cfg, run.rank, run.world, run.device, run.lazy, run.autocast)
    if not run.master:
        return
    run.log.write(json.dumps(metrics) + "\n")
    run.log.flush()
    if run.wandb:
        run.wandb.log(metrics | images, step=step)
    shown = dict(D=f"{metrics['loss_D']:.3f}", G=f"{metrics['loss_G']:.3f}", r1=f"{metrics['r1']:.3g}",
                 img_s=f"{metrics['images_per_s']:.0f}") | ({"mfu": f"{metrics['mfu']:.0%}"} if "mfu" in metrics else {})
    if bar.disable:
        print(f"step {step:,} ({metrics['minutes']:.1f} min): " + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
    else:
        bar.set_postfix(**shown)

def finish_run(run, stop_reason, minutes):
    """Closes the logs, says where the checkpoint is, and for the demo prints what G learned."""
    if run.master:
        run.log.close()
        if run.wandb:
            run.wandb.finish()
        print(f"stopped at step {run.step} ({stop_reason or 'done'}); checkpoint {run.latest}")
        if run.judge:
            summary = run.judge.evaluate(run.models.G_ema, final=True) | {"step": run.step, "minutes": minutes}
            write_sample_grid(run.models.G_ema, run.cfg, *run.grid, os.path.join(run.dir, "digits_grid.png"), run.lazy,
                              run.device, run.autocast)
            print(run.judge.report(summary, run.step, minutes))
            with open(os.path.join(run.dir, "demo_summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    if dist.is_initialized():  # all ranks together: one that tears down while another still works can
        dist.barrier()         # abort at exit (SIGABRT seen with gloo across torchrun nodes, torch 2.14)
        dist.destroy_process_group()

def train(cfg):
    """train_step after train_step; at the end of an interval (log, grid, FID or checkpoint) the one host
    sync, the logs, and a checkpoint when due. A signal or the time budget ends it with a checkpoint; a
    NaN ends it without one, keeping the last good checkpoint."""
    run = open_run(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP.update(signal=signum))
    bar, sums, n_sum, stop_reason = progress_bar(cfg, run.step, run.master), {}, 0, None
    t_start = t_last = t_bar = time.time()
    due = lambda every: every and run.step % every == 0
    for batch in batch_iterator(run.data, cfg, run.rank, run.world, run.step, run.device):
        out = train_step(run.models, run.opt_G, run.opt_D, run.teacher, batch, cfg, run.autocast)
        sums = {k: sums.get(k, 0) + v.float() for k, v in out.items()}  # on the device: no host sync
        n_sum, run.step = n_sum + 1, run.step + 1
        if cfg.max_minutes:  # the bar counts seconds of the budget, on the host clock: never a device wait
            bar.set_description_str(f"step {run.step:,}", refresh=False)
            bar.update(min(time.time() - t_bar, bar.total - bar.n))
            t_bar = time.time()
        else:
            bar.update(1)
        stop = STOP["signal"] or cfg.max_minutes and time.time() - t_start > 60 * cfg.max_minutes
        if not (due(cfg.log_every) or due(cfg.ckpt_every) or due(cfg.snapshot_every) or due(cfg.sample_every)
                or due(cfg.fid_every) or run.step == cfg.steps or (run.world == 1 and stop)):
            continue
        metrics, stop = sync_interval(run, sums, n_sum, time.time() - t_last, stop)
        log_interval(run, metrics | {"minutes": (time.time() - t_start) / 60}, bar)
        sums, n_sum = {}, 0
        if stop:
            stop_reason = f"signal {STOP['signal']}" if STOP["signal"] else f"time limit {cfg.max_minutes} min"
        if stop or due(cfg.ckpt_every) or due(cfg.snapshot_every) or run.step == cfg.steps:
            save_checkpoint(run, snapshot=due(cfg.snapshot_every))
        if stop:
            break
        t_last = time.time()  # the next interval's images/s counts training: not these grids, FIDs or checkpoints
    bar.close()
    finish_run(run, stop_reason, (time.time() - t_start) / 60)
    return run.models.G_ema, run.step

def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

# ------------------------------------------------------------------------------------------------
# 12. Watching a run: a grid of EMA samples from fixed noise, and training-time FID as the authors monitor
# it: FID-5K of the EMA G (fixed z, uniformly random classes) against reference statistics, every rank
# generating and scoring its share. FID-5K is biased upward against FID-50K: use it for trends, not for
# comparison with papers. (The digits demo's judge is fid.DigitsJudge.)
GRID_COLUMNS = {"latent": 8, "pixel": 10}

def save_grid(images, nrow, path, pad=1):
    """images: float [N, C, H, W] in [-1, 1] -> one PNG, nrow images per row, separated by grey lines."""
    from PIL import Image
    x = F.pad(images.float().clamp(-1, 1), (0, pad, 0, pad), value=0.0)  # grey right/bottom border
    x = ((x + 1) * 127.5).round().to(torch.uint8).cpu()
    N, C, H, W = x.shape
    x = x.view(N // nrow, nrow, C, H, W).permute(0, 3, 1, 4, 2).reshape((N // nrow) * H, nrow * W, C)  # [rows*H, nrow*W, C]
    x = F.pad(x.permute(2, 0, 1), (pad, 0, pad, 0), value=128).permute(1, 2, 0)  # close the top/left edge
    Image.fromarray(x.squeeze(-1).numpy() if C == 1 else x.numpy()).save(path)

def decode_latents(vae, latents, scale=LATENT_SCALE, shift=0.0, batch=32):
    """VAE decoding of latents [N, C, h, w] made as scale * (z - shift) -> images in [-1, 1]."""
    return torch.cat([vae.decode(latents[i:i + batch].to(vae.dtype) / scale + shift).sample.float()
                      for i in range(0, len(latents), batch)])

def lazy_vae(lazy, cfg, device):
    """The run's VAE, loaded on first use into the dict of lazily loaded models."""
    if "vae" not in lazy:
        lazy["vae"] = load_vae(cfg.vae, device)
    return lazy["vae"]

def write_sample_grid(G_ema, cfg, grid_z, grid_y, path, lazy, device, autocast):
    with autocast:  # the run's precision, as sample.py samples
        x = G_ema.generate(grid_z.to(device), grid_y.to(device), cfg.sample_truncation)
    if cfg.data_kind == "latent":
        x = decode_latents(lazy_vae(lazy, cfg, device), x, cfg.latent_scale, cfg.latent_shift)
    save_grid(x, GRID_COLUMNS[cfg.data_kind], path)

@torch.no_grad()
def training_fid(G_ema, cfg, rank, world, device, lazy, autocast, batch=50):
    """-> the FID on rank 0; None on the others (the statistics and the 2048x2048 matrix square root are
    computed once, from the all-gathered features)."""
    if "inception" not in lazy:
        lazy["inception"] = fid.load_inception(cfg.fid_inception or None, device=device)
        lazy["fid_ref"] = fid.load_stats(cfg.fid_ref)
    gen = torch.Generator().manual_seed(cfg.seed + 12345)  # the same samples at every evaluation
    z = torch.randn(cfg.fid_num, cfg.z_dim, generator=gen)
    y = torch.randint(0, cfg.num_classes, (cfg.fid_num,), generator=gen)
    lo, hi = rank * cfg.fid_num // world, (rank + 1) * cfg.fid_num // world
    feats = []
    for i in range(lo, hi, batch):
        with autocast:  # the run's precision, as sample.py samples: the two FIDs of a checkpoint agree
            x = G_ema.generate(z[i:min(i + batch, hi)].to(device), y[i:min(i + batch, hi)].to(device))
        if cfg.data_kind == "latent":
            x = decode_latents(lazy_vae(lazy, cfg, device), x, cfg.latent_scale, cfg.latent_shift)
        x = x.expand(-1, 3, -1, -1)  # grey digits -> RGB
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # [b, H, W, 3]
        feats.append(lazy["inception"](images)["pool"])
    feats = fid.all_gather_rows(torch.cat(feats))
    if rank != 0:
        return None
    ref = lazy["fid_ref"]
    return fid.frechet_distance(*fid.stats_from_features(feats), ref["mu"], ref["sigma"])

# ------------------------------------------------------------------------------------------------
# 13. Memory, and the blocks --grad-ckpt auto recomputes so that one process fits its device. Tensors
# are counted from what each op saves for backward (test_gat.py holds the count to autograd's own), per
# row (sample) and block: under bf16 autocast the residual stream and RMSNorm's inputs stay fp32 and the
# matmuls keep bf16 copies of their inputs and weights. The D step's D sees 4B rows; the G step keeps G
# at B rows plus D frozen (only what the gradient to its input needs) at B rows; a recomputed block
# keeps only its fp32 input. What no count sees (the runtime, the CUDA context, NCCL) is measured.
TEACHER_SHAPE = dict(params=85_724_928, width=768, tokens=257)  # DINOv2 ViT-B/14 at 224 px (REPA_TEACHER)

def block_saved_bytes(T, C, H, bf16, flash=True, frozen=False, modulated=False):
    """Bytes one row leaves saved in one block of T tokens, width C, H heads. fp32: 12 [T, C] tensors
    (norm1 in and out, qkv's 3, q and k rotated, attention out = proj in, proj out, norm2 in and out, FFN
    out; G's modulated norms 2 more) and 3 [T, hidden] (w12's 2, the gated product). bf16: 2 fp32 [T, C]
    (the norms' inputs; G's 2 more) and 10 bf16, 3 bf16 [T, hidden]. Math attention returns head-major:
    one more copy. frozen (D in the G step): 8 / 2 in fp32, 2 fp32 + 6 bf16 / 2 bf16 in bf16."""
    F_ = int(2 / 3 * 4 * C)
    stats = 4 * (2 * T + 3 * H * T)  # RMSNorm, q/k-norm reciprocal RMS and attention log-sum-exp: fp32
    if bf16:
        act = (4 * 2 + 2 * 6) * T * C + 2 * 2 * T * F_ if frozen else \
            (4 * (2 + 2 * modulated) + 2 * (10 + (not flash))) * T * C + 2 * 3 * T * F_ + 2 * 7 * C * modulated
    else:
        act = 4 * (8 * T * C + 2 * T * F_) if frozen else \
            4 * ((12 + (not flash) + 2 * modulated) * T * C + 3 * T * F_ + 6 * C * modulated)
    # math attention keeps the [T, T] probabilities; under bf16 CPU's math kernel works in fp32: fp32
    # probabilities and fp32 copies of q, k and v in place of the bf16 ones
    maps = 0 if flash else 4 * H * T * T + (4 - 2) * 3 * T * C * bf16
    return act + stats + maps

def weight_copies(model, bf16):
    """Bytes of weights a forward with grad keeps as new tensors: bf16 casts of every matmul weight, or
    in fp32 the equalized layers' scaled weights."""
    if bf16:
        return 2 * sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    return 4 * sum(m.weight.numel() for m in model.modules() if isinstance(m, EqualizedLinear))

def memory_estimate(cfg, G, D, rows, ckpt=(0, 0), bf16=True, flash=True, teacher=None):
    """Estimated tensor bytes per process -> dict of parts and the peak. rows: one forward's batch
    (per_rank_rows); ckpt: blocks recomputed in (D, G); G and D may be on the meta device; teacher: the
    REPA teacher, TEACHER_SHAPE, or None."""
    m = MODEL_SIZES[cfg.size]
    depth, C, H = m["depth"], m["width"], m["heads"]
    T, P, K = (cfg.input_size // cfg.patch) ** 2, m["proj_dim"], cfg.num_levels
    nd, ng = ckpt
    a, f32 = (2 if bf16 else 4), 4

    def blocks(n, rows, tokens, **kind):  # n of depth blocks recomputed: they keep only their fp32 input
        return rows * ((depth - n) * block_saved_bytes(tokens, C, H, bf16, flash, **kind) + n * f32 * tokens * C)
    image = rows * K * cfg.channels * cfg.input_size ** 2
    n_G, n_D = sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())
    t = teacher if isinstance(teacher, dict) or teacher is None else dict(
        params=sum(p.numel() for p in teacher.parameters()), width=teacher.embed_dim,
        tokens=teacher.patch_embed.num_patches + teacher.num_prefix_tokens)
    buffers = sum(b.numel() * b.element_size() for mod in (G, D) for b in mod.buffers())
    resident = f32 * (2 * n_G + n_D + (t["params"] if t else 0)) + 2 * buffers  # weights, EMA, teacher, buffers
    persistent = resident + 3 * f32 * (n_G + n_D)  # + gradients and AdamW's two moments
    data = rows * (f32 * cfg.channels * cfg.input_size ** 2 + (cfg.image_size ** 2 * 3 if t else 0))
    repa = rows * (T + 1) * 4 * P * a if t else 0  # projector: 2 x (linear out, SiLU out)
    final = f32 * (T + 1) * C  # D's last block output, read by the head and the projector
    # D step: D over 4B rows, its stem's input and REPA head; G step: G at B rows with its K heads
    # (fp32 input and normalised, matmul input) and D frozen at B rows, each with the inputs' casts
    d_step = blocks(nd, 4 * rows, T + 1) + 4 * rows * final + 4 * image * a + repa + weight_copies(D, bf16)
    g_step = (blocks(ng, rows, T, modulated=True) + rows * K * T * C * (2 * f32 + a) + blocks(nd, rows, T + 1, frozen=True) + 2 * image * f32
              + rows * final + weight_copies(G, bf16) + (weight_copies(D, True) if bf16 else 0))
    # transients on top: the gradients of one block's tensors in backward (about one block's saved
    # bytes); a recomputed block's tensors, which add to the peak only when every block is recomputed
    # (run_blocks); and the teacher's no-grad forward in the D step
    blk_d = block_saved_bytes(T + 1, C, H, bf16, flash)
    work_d = 4 * rows * blk_d * (1 + (nd == depth))
    teacher_work = rows * t["tokens"] * (3 * t["width"] + 2 * 4 * t["width"]) * a if t else 0
    work_g = rows * (block_saved_bytes(T, C, H, bf16, flash, modulated=True) * (1 + (ng == depth)) + blk_d)
    saved = max(d_step, g_step)
    peak = persistent + data + max(d_step + max(work_d, teacher_work), g_step + work_g)
    return dict(persistent=persistent, resident=resident, data=data, d_step=d_step, g_step=g_step,
                saved=saved, peak=peak, depth=depth, rows=rows, ckpt=ckpt)

def parse_grad_ckpt(value, depth):
    """--grad-ckpt -> blocks recomputed per model, None for auto (old checkpoints stored a bool)."""
    if isinstance(value, bool):
        return depth if value else 0
    if value in ("auto", "off", "all"):
        return {"auto": None, "off": 0, "all": depth}[value]
    if str(value).isdigit() and int(value) <= depth:
        return int(value)
    raise UserError(f"--grad-ckpt {value!r}: expected auto, off, all or a number of blocks 0..{depth} per model")

# What the allocator holds beyond the step's live tensors: freed blocks malloc keeps (CPU), the caching
# allocator's reserved beyond allocated (GPU). test_gat.py holds the device figure to the measured one.
ALLOCATOR_SLACK = {"cuda": 0.15, "cpu": 0.60}

def memory_outside_tensors(device, world):
    """Bytes held before any tensor, the ranks' largest (so that all decide alike): on a GPU the CUDA
    context, NCCL and other processes (used memory less torch's reserved); on a CPU the runtime's RSS."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = total - free - torch.cuda.memory_reserved(device)
    else:
        held = process_memory("VmRSS")
    if world > 1:
        held = torch.tensor(float(held), device=device)
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        held = held.item()
    return held

def process_memory(key):
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in bytes (not ru_maxrss: the parent's)."""
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1))

def device_figure(est, outside, device):
    """The estimate as the device sees it: held outside tensors + persistent tensors + the step's with slack."""
    return outside + est["persistent"] + (est["peak"] - est["persistent"]) * (1 + ALLOCATOR_SLACK[device.type])

def memory_budget(device, held):
    """(bytes the device figure may reach, how found). CUDA: 95% of the total (not the free memory: every
    rank decides alike). CPU: 90% of MemAvailable shared by the host's processes, plus `held`, what this
    process holds already and MemAvailable no longer counts (the runtime, the models built)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return 0.95 * total, f"95% of {device}'s {total / 2**30:.1f} GiB"
    with open("/proc/meminfo") as f:
        avail = 1024 * int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return 0.9 * avail / local + held, f"90% of the host's {avail / 2**30:.1f} GiB available" + (f" / {local} processes" if local > 1 else "")

def choose_recompute(cfg, G, D, teacher, rows, bf16, budget, outside, device):
    """(blocks recomputed in D, in G), estimate. auto: the fewest for the device figure to fit, D's first
    (its 4B rows make the D step the peak), then G's; everything if even that does not fit."""
    depth = MODEL_SIZES[cfg.size]["depth"]
    n = parse_grad_ckpt(cfg.grad_ckpt, depth)
    options = [(n, n)] if n is not None else [(d, 0) for d in range(depth + 1)] + [(depth, g) for g in range(1, depth + 1)]
    for ckpt in options:
        est = memory_estimate(cfg, G, D, rows, ckpt, bf16, not cfg.exact_gp, teacher)
        est["device"] = device_figure(est, outside, device)
        if est["device"] <= budget:
            break
    return ckpt, est

def per_rank_rows(cfg, world):  # one forward's rows on one process: the micro-batch the estimate is for
    return cfg.batch_size // (world * cfg.grad_accum)

def setup_recompute(cfg, G, D, teacher, device, world, outside):
    """Chooses and sets the blocks G and D recompute -> (the line that says what and why, estimate)."""
    bf16, rows = use_bf16(cfg, device), per_rank_rows(cfg, world)
    budget, how = memory_budget(device, outside + memory_estimate(cfg, G, D, rows, teacher=teacher)["resident"])
    (nd, ng), est = choose_recompute(cfg, G, D, teacher, rows, bf16, budget, outside, device)
    D.ckpt_blocks, G.ckpt_blocks = nd, ng
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"
    why = (f"the fewest (D's first) for it to fit {gib(budget)} ({how})" if est["device"] <= budget else
           f"and it still exceeds {gib(budget)} ({how}): lower --batch-size") if cfg.grad_ckpt == "auto" else "as asked"
    line = (f"memory: estimated peak {gib(est['device'])} per process at {rows} rows ({'bf16' if bf16 else 'fp32'}): "
            f"{gib(outside)} held before the run ({'CUDA context, NCCL' if device.type == 'cuda' else 'runtime'}); "
            f"tensors {gib(est['peak'])} (weights, gradients, AdamW, EMA, teacher {gib(est['persistent'])}; saved "
            f"for backward: D step {gib(est['d_step'])}, G step {gib(est['g_step'])}) + "
            f"{ALLOCATOR_SLACK[device.type]:.0%} allocator slack on the step's. --grad-ckpt {cfg.grad_ckpt}: recomputes "
            f"{nd}/{est['depth']} D blocks and {ng}/{est['depth']} G blocks, {why}")
    return line, est

# ------------------------------------------------------------------------------------------------
# 14. Benchmark: full training iterations on random data of the real shapes, timed after warm-up, with
# model FLOPs counted from the architecture (matmuls only, backward = 2x forward), so that MFU says how
# much of the device's matmul peak the step turns into model arithmetic; the memory estimate beside the
# measured peak; and the rates of the data loader and of sampling.
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "A6000": 154.8,
                        "L40S": 362.0, "4090": 165.2}

def gpu_peak_flops(device):
    """(datasheet bf16 dense peak in FLOP/s or nan, its description) for the first key in the GPU's name."""
    name = torch.cuda.get_device_name(device)
    key = next((k for k in GPU_BF16_PEAK_TFLOPS if k in name), None)
    if key is None:
        return float("nan"), f"{name}: peak unknown"
    return GPU_BF16_PEAK_TFLOPS[key] * 1e12, f"{name} datasheet bf16 dense peak {GPU_BF16_PEAK_TFLOPS[key]:.0f} TFLOP/s"

def vit_forward_flops(depth, width, tokens, ffn_hidden, ffn_matrices=3, extra=0):
    """Matmul FLOPs of one sample through `depth` blocks (qkv, attention, proj, an FFN of 3 hidden-sized
    matrices for SwiGLU or 2 for a GELU MLP), plus `extra`."""
    attn = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
    return depth * (attn + 2 * tokens * width * ffn_hidden * ffn_matrices) + extra

def model_flops(cfg, teacher=None):
    """Per-sample forward FLOPs of G, D (on one K-level input), the REPA projector and the teacher, and
    the per-iteration total: D step = G fwd (no grad) + D fwd/bwd over 4B + teacher + projector fwd/bwd;
    G step = G fwd/bwd + D fwd (reals, no grad) + D fwd/bwd-to-input (fakes)."""
    m = MODEL_SIZES[cfg.size]
    C, P, T, patch_pixels = m["width"], m["proj_dim"], (cfg.input_size // cfg.patch) ** 2, cfg.patch ** 2 * cfg.channels
    mod = 2 * C * 4 * C * m["depth"] + cfg.num_levels * 2 * C * C  # per-sample modulation
    g = vit_forward_flops(m["depth"], C, T, int(8 / 3 * C), extra=cfg.num_levels * 2 * T * C * patch_pixels + mod
                          + 2 * (2 * cfg.z_dim * C + C * C))
    d = vit_forward_flops(m["depth"], C, T + 1, int(8 / 3 * C), extra=2 * T * cfg.num_levels * patch_pixels * C
                          + 2 * C * P + 2 * 2 * P * P)
    repa = t = 0
    if teacher is not None:
        repa = 2 * (T + 1) * (C * P + P * P + P * teacher.embed_dim)
        n = teacher.patch_embed.num_patches
        t = vit_forward_flops(len(teacher.blocks), teacher.embed_dim, n + teacher.num_prefix_tokens, 4 * teacher.embed_dim,
                              ffn_matrices=2, extra=2 * n * 3 * 14 * 14 * teacher.embed_dim)
    return dict(G=g, D=d, teacher=t, repa=repa, per_iteration=g * (1 + 3) + d * (4 * 3 + 1 + 2) + t + 3 * repa)

def cpu_matmul_peak(sizes=(1024, 2048), seconds=1.0):
    """The best fp32 matmul rate this CPU reaches now over a few square sizes (the CPU's MFU reference)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        best = max(best, 2 * n ** 3 / timed(lambda: a @ b, torch.device("cpu"), max(2, int(seconds * 5e10 / n ** 3))))
    return best

def timed(fn, device, iters):
    """Seconds per call of fn over iters calls (warmed up by the caller), waiting for the device's queue."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters

def loader_rate(cfg, device, batches=20):
    """Images/s that the data pipeline alone delivers at the run's batch size (memory maps, workers,
    pinned copies, the posterior sample on the device), to compare with the step's images/s."""
    c = copy.copy(cfg)
    data = prepare_data(c)
    c.steps = max(1, c.num_workers) + batches  # one warm-up batch per worker: all have started
    it = batch_iterator(data, c, 0, 1, 0, device)
    for _ in range(c.steps - batches):
        next(it)
    return c.batch_size / timed(lambda: next(it), device, batches)  # timed(): seconds per batch

def count_host_syncs(step, device):
    """How often one call of step() makes the host wait for the GPU (CUDA reports each); None on CPU."""
    if device.type != "cuda":
        return None
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)

def benchmark(cfg, warmup=3, iters=None):
    """Times train_step on random ImageNet-shaped data after warm-up (3 iterations reach the steady state:
    oneDNN's, the allocators' and the compiler's first passes are the slow ones) and prints the figures."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    iters = iters or (10 if device.type == "cuda" else 3)
    latents = cfg.data != "digits" and os.path.isdir(cfg.data)  # a latent folder here: its loader is timed too
    check_batch_size(cfg, len(load_latents(cfg.data)["index"]) if latents else None, 1)
    set_tf32(use_bf16(cfg, device))
    cfg.num_classes, cfg.channels, cfg.input_size, cfg.data_kind = 1000, 4, 32, "latent"
    # the CPU's peak before and after the run, the higher kept: a shared machine can depress one
    # measurement, and a low peak would flatter the MFU
    cpu_peak = cpu_matmul_peak() if device.type == "cpu" else 0.0
    if cfg.repa_weight > 0:
        import timm  # noqa: F401 (the teacher's library is part of the runtime measured next)
    outside = memory_outside_tensors(device, 1)
    seed_streams(cfg.seed, device)
    G_raw, D_raw, G_ema, teacher = build_models(cfg, device, pretrained_teacher=False)  # random weights: same speed
    memory_line, est = setup_recompute(cfg, G_raw, D_raw, teacher, device, 1, outside)
    opt_G, opt_D = make_optimizer(G_raw, cfg), make_optimizer(D_raw, cfg)
    models, autocast = wrap_models(G_raw, D_raw, G_ema, cfg, 1, device)
    b = cfg.batch_size
    batch = (torch.randn(b, 4, 32, 32, device=device), torch.randint(0, 256, (b, 256, 256, 3), dtype=torch.uint8, device=device),
             torch.randint(0, 1000, (b,), device=device))
    outs = []  # every step's logs, on the device: checked once timing is over
    step = lambda: outs.append(train_step(models, opt_G, opt_D, teacher, batch, cfg, autocast))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    dt = timed(step, device, iters)
    assert all(torch.isfinite(v).all() for out in outs for v in out.values()), "non-finite values in the benchmark"
    flops = model_flops(cfg, teacher)["per_iteration"] * b
    # measured as the estimate counts: the device's whole use (GPU: the allocator's reserved memory plus
    # what was held outside it at the start; CPU: the process's peak RSS) and, on a GPU, the tensors'
    if device.type == "cuda":
        (peak, peak_what), tensors = gpu_peak_flops(device), torch.cuda.max_memory_allocated(device)
        held = torch.cuda.max_memory_reserved(device) + outside
    else:
        tensors, held, peak = None, process_memory("VmHWM"), max(cpu_peak, cpu_matmul_peak())
        peak_what = f"fp32 matmul peak measured in this run on {torch.get_num_threads()} CPU threads: {peak / 1e9:.1f} GFLOP/s"
    sb = 256 if device.type == "cuda" else b  # sampling: sample.py's batch on a GPU
    sample = lambda: G_ema.generate(torch.randn(sb, cfg.z_dim, device=device), torch.randint(0, 1000, (sb,), device=device))
    with autocast:
        sample()
        sample_s = timed(sample, device, iters)
    r = dict(size=cfg.size, patch=cfg.patch, batch=b, device=str(device), compile=cfg.compile,
             precision="bf16" if use_bf16(cfg, device) else "fp32", repa=teacher is not None,
             ms_per_iteration=dt * 1e3, images_per_s=b / dt, gflops_per_iteration=flops / 1e9,
             achieved_tflops=flops / dt / 1e12, mfu=flops / dt / peak, peak=peak_what,
             host_syncs_per_step=count_host_syncs(step, device), recomputed_blocks_D_G=[D_raw.ckpt_blocks, G_raw.ckpt_blocks],
             estimated_device_gib=est["device"] / 2**30, measured_device_gib=held / 2**30,
             estimated_tensors_gib=est["peak"] / 2**30, measured_tensors_gib=tensors and tensors / 2**30,
             sample_G_images_per_s=sb / sample_s)
    if latents:
        r["loader_images_per_s"] = loader_rate(cfg, device)
    print(f"GAT-{cfg.size}/{cfg.patch} batch {b} on {device} ({r['precision']}, compile={cfg.compile}, REPA={r['repa']}): "
          f"{r['ms_per_iteration']:.1f} ms/iteration, {r['images_per_s']:.1f} images/s, MFU {r['mfu']:.1%} ({peak_what}); "
          f"sampling (G only) {r['sample_G_images_per_s']:.1f} images/s\n{memory_line} (measured: {held / 2**30:.1f} GiB)")
    print(json.dumps(r))
    return r

# ------------------------------------------------------------------------------------------------
# Command line: every Config setting is a flag (--batch-size, --no-compile, ...); --data digits applies
# the demo preset underneath whatever is given explicitly.
def check_batch_size(cfg, n_images, world):
    """The global batch must split evenly into world ranks x grad_accum micro-batches and fit in the data
    (batches drop the rest); n_images None = not known yet."""
    parts, what = world * cfg.grad_accum, f"the number of processes {world}"
    if cfg.grad_accum > 1:
        what += f" x --grad-accum {cfg.grad_accum} = {parts}"
    if cfg.batch_size % parts:
        raise UserError(f"--batch-size {cfg.batch_size} (global) must divide by {what}; "
                        f"use e.g. {cfg.batch_size // parts * parts or parts}")
    if n_images is not None and cfg.batch_size > n_images:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {n_images:,} training images; use at most {n_images}")

BOUNDS = {"at_least": (operator.ge, ">="), "above": (operator.gt, ">"), "at_most": (operator.le, "<="),
          "below": (operator.lt, "<")}

def validate_config(cfg):
    """Every setting checked before anything heavy is loaded: a UserError naming the flag, the value and
    what is allowed. Each setting's own bounds are declared with it (Config); the checks of several
    settings, files and libraries follow. (A latent set's size is checked in open_run, once opened.)"""
    for f in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, f.name), f.metadata
        bad = isinstance(value, float) and not math.isfinite(value)  # inf and nan pass most bounds
        bad |= "choices" in allowed and value not in allowed["choices"]
        bad |= any(k in allowed and not op(value, allowed[k]) for k, (op, _) in BOUNDS.items())
        if bad:
            what = (f"one of {', '.join(map(str, allowed['choices']))}" if "choices" in allowed else
                    ("an integer " if isinstance(f.default, int) else "a finite number ")
                    + " and ".join(f"{symbol} {allowed[k]}" for k, (_, symbol) in BOUNDS.items() if k in allowed))
            raise UserError(f"--{f.name.replace('_', '-')} {value!r}: expected {what.strip()}")
    if cfg.augment and not set(cfg.augment.split(",")) <= set(AUGMENT_POLICY.split(",")):
        raise UserError(f"--augment {cfg.augment!r}: expected a comma-separated subset of {AUGMENT_POLICY}, or '' for none")
    depth = MODEL_SIZES[cfg.size]["depth"]
    parse_grad_ckpt(cfg.grad_ckpt, depth)
    if depth % cfg.num_levels:
        raise UserError(f"--num-levels {cfg.num_levels}: GAT-{cfg.size} has {depth} blocks, which must divide into the "
                        f"levels; use one of {[k for k in range(1, depth + 1) if depth % k == 0]}")
    if cfg.resume not in ("auto", "none") and not os.path.isfile(cfg.resume):
        raise UserError(f"--resume {cfg.resume!r}: no such file; give 'auto', 'none' or a checkpoint file")
    if cfg.fid_every and not os.path.isfile(cfg.fid_ref):
        raise UserError(f"--fid-every {cfg.fid_every} needs --fid-ref, a reference stats .npz (got {cfg.fid_ref!r}); write one "
                        "with `python prep_latents.py ... --ref-stats` or `python fid.py REF.npz REF.npz --save-stats`")
    if cfg.fid_inception and not os.path.isfile(cfg.fid_inception):
        raise UserError(f"--fid-inception {cfg.fid_inception!r}: no such file (see fid.py for the weights)")
    if cfg.device:
        check_device("--device", cfg.device)
    if cfg.repa_weight > 0 and cfg.data != "digits":
        import timm
        if not timm.is_model(cfg.repa_teacher):
            raise UserError(f"--repa-teacher {cfg.repa_teacher!r}: not a timm model name (default {REPA_TEACHER})")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb {cfg.wandb} needs the wandb package: pip install wandb")
    # the digits' size is known without loading them; a latent set's is checked in open_run() once opened
    check_batch_size(cfg, DIGITS_TRAIN if cfg.data == "digits" else None, int(os.environ.get("WORLD_SIZE", 1)))

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GAT: Scalable GANs with Transformers (train, demo, benchmark). "
                                "--data digits: the CPU demo preset (DIGITS_PRESET) under the flags given.")
    for f in dataclasses.fields(Config):
        if "help" in f.metadata:  # a setting; the others are filled in from the data
            kind = (dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else
                    dict(type=type(f.default), choices=f.metadata.get("choices")))
            p.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{f.metadata['help']} (default "
                           f"{f.default!r})", **kind)
    p.add_argument("--no-mng", action="store_true", help="ablation: one output level, no MNG noise")
    p.add_argument("--bench", action="store_true", help="measure speed on random data instead of training")
    args = vars(p.parse_args(argv))
    cfg = Config(**(DIGITS_PRESET if args["data"] == "digits" else {}))
    for k, v in args.items():
        if v is not None and k not in ("no_mng", "bench"):
            setattr(cfg, k, v)
    if args["no_mng"]:
        cfg.num_levels = 1
    return cfg, args["bench"]

def main(argv=None):
    cfg, bench = parse_args(argv)
    try:
        validate_config(cfg)
        benchmark(cfg) if bench else train(cfg)
    except (UserError, FloatingPointError) as e:  # a NaN run exits 3: the settings were fine, the run diverged
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, UserError) else 3)

if __name__ == "__main__":
    main()
