"""
The test suite of gat: `python test_gat.py` (CPU, float32, no network; a few minutes on 2 cores).
Sections follow the files: gat.py's model and mathematics, its training loop, then prep_latents.py,
sample.py and fid.py.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub miss must fail at once, never wait on the network
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gat

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


def tiny_models(channels=1, input_size=8, num_classes=10, repa_dim=0, levels=4):
    G = gat.Generator("tiny", 2, num_classes, channels, input_size, num_levels=levels)
    D = gat.Discriminator("tiny", 2, num_classes, channels, input_size, levels, repa_dim=repa_dim)
    return G, D


def tiny_vae(path):
    """A random AutoencoderKL with SD-VAE's interface (4 latent channels, 8x downsampling), saved by path."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                  sample_size=64).save_pretrained(path)
    return str(path)


def tiny_teacher():
    return gat.build_repa_teacher(pretrained=False, depth=1, embed_dim=32, num_heads=2)


# ================================================================================================
# gat.py: model sizes, shapes, parameter counts
# ================================================================================================
PARAMS = {  # trainable parameters of the authors' code, 1000 classes, 768-dim REPA teacher
    ("S", 2): (29_256_512, 39_114_624), ("B", 2): (116_545_088, 104_480_256),
    ("L", 2): (408_469_024, 322_773_728), ("XL", 2): (601_936_640, 467_383_872),
    ("S", 4): (29_330_432, 39_188_352), ("S", 8): (29_626_112, 39_483_264), ("XL", 8): (603_043_520, 468_489_792),
}


@pytest.mark.parametrize("size,patch", list(PARAMS))
def test_parameter_counts_match_authors(size, patch):
    with torch.device("meta"):
        G, D = gat.Generator(size, patch), gat.Discriminator(size, patch)
    assert gat.count_params(G) == PARAMS[size, patch][0]
    assert gat.count_params(D) == PARAMS[size, patch][1]


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_output_shapes_every_size_and_patch(size, patch):
    with torch.device("meta"):
        G, D = gat.Generator(size, patch), gat.Discriminator(size, patch)
        z, y = torch.randn(3, 64), torch.zeros(3, dtype=torch.long)
        levels, w = G(z, y)
        logits, feats = D(gat.levels_to_channels(levels), y, repa_rows=2)
    assert levels.shape == (4, 3, 4, 32, 32) and w.shape == (3, gat.MODEL_SIZES[size]["width"])
    assert logits.shape == (3,) and feats.shape == (2, 1 + (32 // patch) ** 2, 768)
    assert G.head_after == [(k + 1) * gat.MODEL_SIZES[size]["depth"] // 4 - 1 for k in range(4)]


def test_tiny_forward_on_cpu_and_levels_accumulate():
    torch.manual_seed(0)
    G, D = tiny_models()
    z, y = torch.randn(5, 64), torch.arange(5)
    levels, _ = G(z, y)
    assert levels.shape == (4, 5, 1, 8, 8) and torch.isfinite(levels).all()
    # level k is the sum of heads 1..k: the increments are the heads' own outputs, all non-zero
    assert all((levels[k] - levels[k - 1]).abs().sum() > 0 for k in range(1, 4))
    logits, feats = D(gat.levels_to_channels(levels), y)
    assert logits.shape == (5,) and feats is None


def test_width_aware_lr():
    expected = {"S": 4e-4, "B": 2e-4, "L": 1.5e-4, "XL": 1.3333e-4}
    for size, lr in expected.items():
        assert gat.width_aware_lr(gat.MODEL_SIZES[size]["width"]) == pytest.approx(lr, rel=1e-4)


def test_sincos_and_rope_tables():
    pe = gat.sincos_pos_embed(16, 4)
    assert pe.shape == (16, 16) and len({tuple(r.tolist()) for r in pe}) == 16  # every token distinct
    cos, sin = gat.rope_2d(8, 4)
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


# ================================================================================================
# gat.py: MNG noise
# ================================================================================================
def test_mng_levels():
    assert gat.mng_noise_levels(4) == pytest.approx([0.885, 0.76, 0.51, 0.01], abs=1e-12)
    assert gat.mng_noise_levels(1) == []


def test_mng_nested_noise_std_and_correlation():
    torch.manual_seed(0)
    t = gat.mng_noise_levels(4)
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


def test_no_mng_ablation_has_one_level_and_no_noise():
    G, D = tiny_models(levels=1)
    levels, _ = G(torch.randn(2, 64), torch.arange(2))
    assert levels.shape[0] == 1 and D.patch_embed.in_channels == 1
    assert torch.equal(gat.mng_perturb(levels, torch.randn_like(levels)), levels)
    cfg, _ = gat.parse_args(["--no-mng"])
    assert cfg.num_levels == 1


# ================================================================================================
# gat.py: augmentation
# ================================================================================================
def test_augmentation_shared_across_levels():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, 32, 32)
    levels = x.expand(4, -1, -1, -1, -1)
    p = gat.sample_augment(6, 32, "cpu")
    out = gat.augment(levels, p)
    assert all(torch.equal(out[k], out[0]) for k in range(4))  # same parameters at every level
    assert torch.equal(out[0], gat.augment(x[0], p))


def test_teacher_image_moves_by_the_same_fraction():
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
    # translation (x) moves rows by +tx of the image: source row r + 3 lands at r
    assert frac(moved_lat)[0, 0].item() == pytest.approx((10 - 3 + 0.5) / 32)


def test_cutout_and_color_happen():
    torch.manual_seed(1)
    x = torch.ones(8, 4, 32, 32)
    p = gat.sample_augment(8, 32, "cpu", flip_prob=0.0)
    p.update(color=torch.zeros(8, dtype=torch.bool), tx=torch.zeros(8), ty=torch.zeros(8))
    out = gat.augment(x, p)
    hole = (out == 0).float().mean((1, 2, 3))
    assert (hole >= 1 / 16).all() and (hole <= 1 / 4).all()  # a half-size square, clipped at a corner at most
    p.update(color=torch.ones(8, dtype=torch.bool))
    assert not torch.equal(gat.augment(x, p), out)


# ================================================================================================
# gat.py: losses
# ================================================================================================
def test_relativistic_loss_values():
    a, b = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = np.mean([math.log1p(math.exp(-2)), math.log(2), math.log1p(math.exp(2))])
    assert gat.relativistic_loss(a, b).item() == pytest.approx(expected, rel=1e-6)
    assert gat.relativistic_loss(b, a).item() == pytest.approx(
        np.mean([math.log1p(math.exp(2)), math.log(2), math.log1p(math.exp(-2))]), rel=1e-6)


def test_repa_loss_aligned_and_opposite():
    f = torch.randn(3, 5, 16)
    cls, patch = gat.repa_loss(f, 2.5 * f)
    assert cls.item() == pytest.approx(0, abs=1e-6) and patch.item() == pytest.approx(0, abs=1e-6)
    cls, patch = gat.repa_loss(f, -f)
    assert cls.item() == pytest.approx(2, abs=1e-6) and patch.item() == pytest.approx(2, abs=1e-6)


def test_approximated_penalty_converges_to_exact_r1():
    torch.manual_seed(0)
    D = gat.Discriminator("tiny", 2, 10, 1, 8, num_levels=1, repa_dim=0).double()
    for p in D.parameters():  # a less trivial function than the near-identity init
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3])
    exact = gat.exact_gradient_penalty(D(x, y)[0], x).item()  # ||grad_x D||^2 by autograd
    N = 4096
    eps = torch.randn(N, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        base = D(x.detach(), y)[0]
        errors = []
        for sigma in (0.3, 0.01, 0.0001):
            approx = gat.approx_gradient_penalty(base.expand(N), D(x.detach() + sigma * eps, y.expand(N))[0], sigma)
            errors.append(abs(approx.item() - exact) / exact)
    assert errors[2] < errors[0] and errors[2] < 0.1, errors  # Monte Carlo error ~ sqrt(2/N) = 2%


def test_d_loss_exact_gp_ablation_runs_and_matches_approx_scale():
    torch.manual_seed(0)
    G, D = tiny_models()
    cfg = gat.Config(size="tiny", flip_prob=0.0)
    fake = G(torch.randn(4, 64), torch.arange(4))[0].detach()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    loss_a, logs_a = gat.d_loss(D, fake, x, torch.arange(4), cfg)
    cfg.exact_gp = True
    loss_e, logs_e = gat.d_loss(D, fake, x, torch.arange(4), cfg)
    loss_e.backward()
    assert torch.isfinite(loss_a) and torch.isfinite(loss_e) and logs_e["r1"] > 0
    assert all(p.grad is not None for p in D.parameters())


def test_equalized_lr_is_one_hundredth():
    torch.manual_seed(0)
    eq = gat.EqualizedLinear(8, 4, lr_mult=0.01)
    plain = torch.nn.Linear(8, 4)
    plain.weight.data.copy_(eq.weight.data * 0.01)
    plain.bias.data.copy_(eq.bias.data * 0.01)
    x, g = torch.randn(16, 8), torch.randn(16, 4)
    assert torch.allclose(eq(x), plain(x), atol=1e-6)
    # effective init is plain xavier: std sqrt(2 / (fan_in + fan_out))
    assert (eq.weight * 0.01).std().item() == pytest.approx(math.sqrt(2 / 12), rel=0.35)
    before_eq, before_plain = eq.weight.data * 0.01, plain.weight.data.clone()
    for m in (eq, plain):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        (m(x) * g).sum().backward()
        opt.step()
    step_eq = eq.weight.data * 0.01 - before_eq
    step_plain = plain.weight.data - before_plain
    assert torch.allclose(step_eq / step_plain, torch.full_like(step_eq, 0.01), rtol=1e-3)


def test_truncation_moves_w_toward_class_mean():
    torch.manual_seed(0)
    G, _ = tiny_models()
    G.w_avg.copy_(torch.randn_like(G.w_avg))
    z, y = torch.randn(6, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    w0, w_half, w1 = G.style(z, y), G.style(z, y, 0.5), G.style(z, y, 1.0)
    d = lambda w: (w - G.w_avg[y]).norm(dim=1)
    assert torch.allclose(d(w_half), 0.5 * d(w0), rtol=1e-4) and torch.allclose(w1, G.w_avg[y], atol=1e-6)
    img_full = G.generate(z, y, 1.0)
    assert torch.allclose(img_full[0], img_full[3], atol=1e-5)  # same class, any z: the class-mean image
    assert torch.equal(G.generate(z, y, 0.0), G.generate(z, y))


def test_class_means_update_only_present_classes():
    G, _ = tiny_models()
    w, y = torch.ones(3, 64), torch.tensor([1, 1, 4])
    G.update_class_means(w, y)
    assert torch.allclose(G.w_avg[1], torch.full((64,), 0.005)) and torch.allclose(G.w_avg[4], G.w_avg[1])
    assert G.w_avg[0].abs().sum() == 0


def test_gradients_reach_every_parameter():
    """One D step and one G step of the real loss functions (REPA on, tiny teacher): every parameter
    of D and of G, the first G block and the mapping network included, gets a non-zero gradient."""
    torch.manual_seed(0)
    teacher = tiny_teacher()
    G, D = tiny_models(channels=4, input_size=8, repa_dim=teacher.embed_dim)
    cfg = gat.Config(size="tiny")
    x, y = torch.randn(4, 4, 8, 8), torch.arange(4)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        fake = G(torch.randn(4, 64), y)[0]
    loss, logs = gat.d_loss(D, fake, x, y, cfg, teacher, images)
    loss.backward()
    assert {"repa_cls", "repa_patch", "r1", "r2"} <= set(logs)
    dead = [n for n, p in D.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    D.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    fake, _ = G(torch.randn(4, 64), y)
    gat.g_loss(D, fake, x, y, cfg).backward()
    dead = [n for n, p in G.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert all(p.grad is None for p in D.parameters())  # frozen D: no wasted weight gradients


def test_teacher_features_resize_to_d_grid():
    teacher = tiny_teacher()
    p = gat.sample_augment(2, 32, "cpu")
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    assert gat.teacher_features(teacher, images, p, 16).shape == (2, 257, 32)
    assert gat.teacher_features(teacher, images, p, 4).shape == (2, 17, 32)


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", "import gat"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    assert not os.path.exists(os.path.join(HERE, "results", "GAT-XL-2-imagenet256"))


# ================================================================================================
# gat.py: data, checkpoints and the training loop
# ================================================================================================
def digits_cfg(tmp_path, run="r", **overrides):
    cfg = gat.Config(**gat.DIGITS_PRESET)
    settings = dict(data="digits", results=str(tmp_path), run=run, batch_size=8, max_minutes=0.0, sample_every=0,
                    log_every=2, ckpt_every=3, steps=6)
    for k, v in (settings | overrides).items():
        setattr(cfg, k, v)
    return cfg


def ckpt_of(tmp_path, run="r"):
    return gat.load_checkpoint(os.path.join(tmp_path, run, "checkpoints", "latest.pt"))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_batch_rows_split_ranks_and_epochs():
    full = gat.batch_rows(100, 8, 8, 0, 0, 3)
    halves = np.concatenate([gat.batch_rows(100, 8, 4, r, 0, 3) for r in range(2)])
    assert np.array_equal(full, halves) and len(set(full)) == 8
    epoch0 = np.concatenate([gat.batch_rows(100, 8, 8, 0, 0, s) for s in range(12)])
    assert len(set(epoch0)) == 96  # no repeats within an epoch (drop-last leaves 4 out)
    assert not np.array_equal(gat.batch_rows(100, 8, 8, 0, 0, 0), gat.batch_rows(100, 8, 8, 0, 0, 12))


def test_resume_is_bit_exact(tmp_path):
    gat.train(digits_cfg(tmp_path, "straight", steps=6))
    gat.train(digits_cfg(tmp_path, "resumed", steps=3))
    assert ckpt_of(tmp_path, "resumed")["step"] == 3
    gat.train(digits_cfg(tmp_path, "resumed", steps=6))  # picks up latest.pt of its run automatically
    a, b = ckpt_of(tmp_path, "straight"), ckpt_of(tmp_path, "resumed")
    assert a["step"] == b["step"] == 6
    for k in ("G", "D", "G_ema"):
        assert_same_state(a[k], b[k])
    assert torch.equal(a["opt_G"]["state"][0]["exp_avg_sq"], b["opt_G"]["state"][0]["exp_avg_sq"])
    lines = [json.loads(l) for l in open(os.path.join(tmp_path, "straight", "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [2, 3, 4, 6] and all(math.isfinite(l["loss_D"]) for l in lines)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    gat.atomic_save({"format": gat.CKPT_FORMAT, "step": 1}, path)

    def crash(*args):
        raise KeyboardInterrupt("killed before the rename")
    monkeypatch.setattr(gat.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        gat.atomic_save({"format": gat.CKPT_FORMAT, "step": 2}, path)
    assert gat.load_checkpoint(path)["step"] == 1


def test_damaged_and_foreign_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(gat.CheckpointError, match="damaged"):
        gat.load_checkpoint(str(bad))
    torch.save({"generator": {}}, tmp_path / "other.pt")
    with pytest.raises(gat.CheckpointError, match="not a gat.py checkpoint"):
        gat.load_generator(str(tmp_path / "other.pt"))


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_d_loss = gat.d_loss

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss, logs = real_d_loss(*args, **kw)
        return (loss * float("nan") if calls["n"] >= 5 else loss), logs
    monkeypatch.setattr(gat, "d_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite .* last good checkpoint"):
        gat.train(digits_cfg(tmp_path, steps=20, ckpt_every=2, log_every=2))
    ckpt = ckpt_of(tmp_path)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["G"].values())


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "gat.py", "--data", "digits", "--results", str(tmp_path), "--run", "s", "--batch-size", "8",
           "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "0"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "s" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "signal" in out
    assert ckpt_of(tmp_path, "s")["step"] >= 2


def test_checkpoint_of_another_size_is_refused(tmp_path):
    gat.train(digits_cfg(tmp_path, steps=1))
    with pytest.raises(gat.CheckpointError, match="patch: checkpoint 2 vs requested 1"):
        gat.train(digits_cfg(tmp_path, steps=2, patch=1))


def test_missing_data_dir_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gat.main(["--data", str(tmp_path / "nowhere"), "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "prep_latents.py" in err and "--data digits" in err


def write_fake_latents(path, n=24, classes=3, res=64, complete=True):
    """A dataset in prep_latents.py's format (gat-latents-v1), with random content."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    h = res // 8
    np.save(os.path.join(path, "moments.npy"), np.concatenate(
        [rng.normal(size=(n, 4, h, h)), np.full((n, 4, h, h), 0.1)], 1).astype(np.float16))
    np.save(os.path.join(path, "images.npy"), rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8))
    np.save(os.path.join(path, "labels.npy"), np.arange(n) % classes)
    valid = np.ones(n, bool)
    valid[5] = False  # a skipped file keeps its slot
    np.save(os.path.join(path, "valid.npy"), valid)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(dict(format="gat-latents-v1", count=n, num_valid=n - 1, resolution=res, latent_shape=[4, h, h],
                       vae="none", latent_scale=0.18215, num_classes=classes,
                       class_names=[f"c{i}" for i in range(classes)], complete=complete), f)


def test_trains_on_latent_dataset_with_repa_and_workers(tmp_path, monkeypatch):
    write_fake_latents(tmp_path / "lat")
    teacher = tiny_teacher()
    monkeypatch.setattr(gat, "build_repa_teacher", lambda name, pretrained=True: teacher)
    cfg = gat.Config(size="tiny", data=str(tmp_path / "lat"), results=str(tmp_path), run="lat", batch_size=4,
                     num_workers=1, steps=3, log_every=1, ckpt_every=3, sample_every=0, snapshot_every=3,
                     vae=tiny_vae(tmp_path / "vae"))
    gat.train(cfg)
    assert os.path.isfile(tmp_path / "lat" / "samples_0000003_trunc0.png")  # decoded through the VAE
    ckpt = ckpt_of(tmp_path, "lat")
    assert ckpt["step"] == 3 and ckpt["config"]["data_kind"] == "latent" and ckpt["config"]["input_size"] == 8
    assert os.path.isfile(tmp_path / "lat" / "checkpoints" / "0000003.pt")
    lines = [json.loads(l) for l in open(tmp_path / "lat" / "metrics.jsonl")]
    assert all(l["repa_cls"] > 0 and math.isfinite(l["repa_patch"]) for l in lines)


def test_incomplete_or_malformed_dataset_is_refused(tmp_path):
    write_fake_latents(tmp_path / "half", complete=False)
    with pytest.raises(gat.DataError, match="rerun the same prep_latents.py command"):
        gat.load_latent_dataset(str(tmp_path / "half"))
    write_fake_latents(tmp_path / "broken")
    os.remove(tmp_path / "broken" / "labels.npy")
    with pytest.raises(gat.DataError, match="malformed"):
        gat.load_latent_dataset(str(tmp_path / "broken"))


DDP_SCRIPT = r'''
import os, sys, json
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import gat
torch.set_num_threads(1)
out = sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
# identity augmentation and noiseless MNG, R1/R2 weights 0: the step is then a deterministic function of
# the global batch, so one process and two must produce the same gradients
zeros = lambda B: torch.zeros(B)
gat.sample_augment = lambda B, size, device, flip_prob=0.4: dict(
    color=zeros(B).bool(), brightness=zeros(B), saturation=zeros(B) + 1, contrast=zeros(B) + 1, tx=zeros(B),
    ty=zeros(B), cut_x=zeros(B) + 10, cut_y=zeros(B) + 10, flip=zeros(B).bool())
gat.mng_perturb = lambda levels, eps: levels
cfg = gat.Config(size="tiny", r1_gamma=0.0, r2_gamma=0.0)
torch.manual_seed(0)
G = gat.Generator("tiny", 2, 10, 1, 8)
D = gat.Discriminator("tiny", 2, 10, 1, 8, repa_dim=0)
g = torch.Generator().manual_seed(1)
x, y, z = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g), torch.randn(8, 64, generator=g)
rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
Gd, Dd, _ = gat.wrap_models(G, D, cfg, world, torch.device("cpu"))
with torch.no_grad():
    fake = G(z[rows], y[rows])[0]
gat.d_loss(Dd, fake, x[rows], y[rows], cfg)[0].backward()
D.requires_grad_(False)
fake, w = Gd(z[rows], y[rows])
gat.g_loss(D, fake, x[rows], y[rows], cfg).backward()
G.update_class_means(w.detach(), y[rows])
if rank == 0:
    torch.save({"D": {n: p.grad for n, p in D.named_parameters()}, "G": {n: p.grad for n, p in G.named_parameters()},
                "w_avg": G.w_avg}, out)
if world > 1:
    tcfg = gat.Config(**gat.DIGITS_PRESET)
    tcfg.results, tcfg.run, tcfg.max_minutes, tcfg.sample_every, tcfg.log_every = os.path.dirname(out), "ddp", 0.0, 0, 1
    tcfg.batch_size, tcfg.steps, tcfg.data = 9, 2, "digits"
    try:
        gat.train(tcfg)
    except ValueError as e:
        print("BATCH_ERROR", e)
    tcfg.batch_size = 8
    gat.train(tcfg)
    if rank == 0:
        print("TRAIN_OK")
'''


def test_ddp_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), HERE, str(tmp_path / "one.pt")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          str(script), HERE, str(tmp_path / "two.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for part in ("D", "G"):
        for name in a[part]:
            assert torch.allclose(a[part][name], b[part][name], rtol=1e-4, atol=1e-7), (part, name)
    assert torch.allclose(a["w_avg"], b["w_avg"], atol=1e-7)  # class means all-reduced over ranks
    assert "BATCH_ERROR --batch-size 9 (global) must divide by the number of processes 2" in two.stdout
    assert "TRAIN_OK" in two.stdout and ckpt_of(tmp_path, "ddp")["step"] == 2
    assert len(ckpt_of(tmp_path, "ddp")["rng"]) == 2  # every rank's random state is saved


def test_training_time_fid_is_logged(tmp_path, monkeypatch):
    import fid

    def stand_in(images):  # a 12-d stand-in for the Inception pool features: 2x2 mean colours
        return {"pool": F.adaptive_avg_pool2d(images.permute(0, 3, 1, 2).float(), 2).flatten(1)}
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": stand_in)
    digits = gat.load_digits_dataset()
    real = ((digits["x"].expand(-1, 3, -1, -1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    fid.save_stats(tmp_path / "ref.npz", dict(zip(("mu", "sigma"), fid.stats_from_features(stand_in(real)["pool"]))))
    gat.train(digits_cfg(tmp_path, steps=4, fid_every=2, fid_num=60, fid_ref=str(tmp_path / "ref.npz")))
    lines = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    fids = [l["fid"] for l in lines if "fid" in l]
    assert len(fids) == 2 and all(math.isfinite(f) and f > 0 for f in fids)
    with pytest.raises(ValueError, match="--fid-ref"):
        gat.train(digits_cfg(tmp_path, run="nofid", steps=2, fid_every=2))


def test_benchmark_smoke():
    cfg = gat.Config(size="tiny", batch_size=2, repa_weight=0.0, device="cpu")
    r = gat.benchmark(cfg, warmup=1, iters=1)
    assert r["ms_per_iteration"] > 0 and 0 < r["mfu"] < 1.5 and r["sample_G_images_per_s"] > 0
    flops = gat.model_flops(gat.Config(size="XL", channels=4, input_size=32))
    # the paper's "119 GFLOPs" for GAT-XL/2's G count multiply-adds (as DiT does); we count 2 FLOPs per MAC
    assert flops["G"] / 2e9 == pytest.approx(119, rel=0.02)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"] + sys.argv[1:]))
