import dataclasses
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import gat
import sample

_SAMPLE_ROOT = os.path.dirname(os.path.abspath(__file__))


def _sample_save_checkpoint(path, **cfg_kw):
    """A tiny G as a gat.py checkpoint, its class means of w set to the mean w of each class (what the
    running mean of training approaches) so that truncation has somewhere to go. (A real short gat.py
    run takes over a minute on 2 shared cores, most of it outside G.)"""
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


def _sample_tiny_vae(path):
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(path)
    return str(path)


def _sample_run(*argv):
    sample.main([str(a) for a in argv])


def _sample_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        _sample_run(*argv)
    assert e.value.code == 1
    return capsys.readouterr().err


def _sample_expected(G, z, y, truncation=0.0):
    return sample.to_uint8(G.generate(z, y, truncation)).numpy()


def test_sample_one_and_two_processes_write_the_same_npz(_sample_pixel_ckpt, tmp_path):
    # 10 images in batches of 4: the ranks get 4 and 6 images, one of them a partial batch
    args = ["--ckpt", _sample_pixel_ckpt, "--num-images", "10", "--batch-size", "4", "--seed", "3"]
    _sample_run(*args, "--out", tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "sample.py", *args, "--out", tmp_path / "two"], cwd=_SAMPLE_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s on 2 process(es)" in proc.stdout
    # 1 image in batches of 4 on 2 processes: rank 0 gets none, rank 1 the one image
    _sample_run(*args[:3], 1, *args[4:], "--no-png", "--out", tmp_path / "one_1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "sample.py", *args[:3], "1", *args[4:], "--no-png", "--out", tmp_path / "two_1"],
                          cwd=_SAMPLE_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_1, two_1 = (tmp_path / d / "samples_1x8x8x3.npz" for d in ("one_1", "two_1"))
    assert one_1.read_bytes() == two_1.read_bytes()
    one, two = (tmp_path / d / "samples_10x8x8x3.npz" for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    with np.load(one) as f:
        x, y = f["arr_0"], f["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (10, 8, 8, 3)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grayscale in three channels
    assert x.max() - x.min() > 100 and len({im.tobytes() for im in x}) == 10
    assert y.dtype == np.int64 and y.shape == (10,) and ((0 <= y) & (y < 10)).all()
    assert (fid._npz_array(str(one)) == x).all()  # fid.py memory-maps it as it does ADM's batches
    for d in ("one", "two"):
        pngs = sorted(os.listdir(tmp_path / d / "images"))
        assert pngs == [f"{i:06d}.png" for i in range(10)]
        assert all((np.asarray(Image.open(tmp_path / d / "images" / p)) == x[i]).all() for i, p in enumerate(pngs))
        assert sorted(os.listdir(tmp_path / d)) == ["images", "samples_10x8x8x3.npz"]  # shards removed


def test_sample_images_come_from_seed_and_index_and_truncate_to_class_means(_sample_pixel_ckpt, tmp_path):
    G, _ = gat.load_generator(_sample_pixel_ckpt)
    z, y_random = sample.latent_codes(5, range(12), G.z_dim, 10)

    def npz(name, *extra):
        _sample_run("--ckpt", _sample_pixel_ckpt, "--num-images", 12, "--batch-size", 12, "--seed", 5, "--no-png",
                    "--out", tmp_path / name, *extra)
        with np.load(tmp_path / name / "samples_12x8x8x3.npz") as f:
            return f["arr_0"], f["arr_1"]

    x, y = npz("random")
    assert (y == y_random.numpy()).all() and len(set(y.tolist())) > 3
    assert (x == _sample_expected(G, z, y_random)).all()  # truncation 0 = the untruncated G
    x_bal, y_bal = npz("balanced", "--classes", "balanced")
    assert (y_bal == np.arange(12) % 10).all()
    assert (x_bal == _sample_expected(G, z, torch.arange(12) % 10)).all()
    x_full, y_full = npz("full", "--classes", "3,7", "--truncation", "1")
    assert (y_full == [3, 7] * 6).all()
    class_mean = sample.to_uint8(sample.synthesize(G, G.w_avg[[3, 7]])).numpy()
    assert (x_full[0::2] == class_mean[0]).all() and (x_full[1::2] == class_mean[1]).all()
    assert (class_mean[0] != class_mean[1]).any()
    x_half, _ = npz("half", "--classes", "3,7", "--truncation", "0.5")
    x_none = _sample_expected(G, z, torch.tensor([3, 7] * 6))
    assert (x_half != x_none).any() and (x_half != x_full).any()
    x_raw, _ = npz("raw", "--raw")
    assert (x_raw != x).any()
    x_seed, _ = npz("other_seed", "--seed", 6)
    assert (x_seed != x).any()


def test_sample_grid_rows_classes_columns_seeds_blocks_truncations(_sample_pixel_ckpt, tmp_path):
    _sample_run("--ckpt", _sample_pixel_ckpt, "--grid", "--classes", "0,1,2", "--cols", 4, "--truncation", 0, 1,
                "--out", tmp_path)
    im = np.asarray(Image.open(tmp_path / "grid_seed0_trunc0-1.png"))
    assert im.shape == (3 * 8, 2 * 4 * 8)  # 3 class rows; 2 truncation blocks of 4 columns; grayscale
    tiles = im.reshape(3, 8, 8, 8).transpose(0, 2, 1, 3)  # [row, column, 8, 8]
    assert all((tiles[r, 4:] == tiles[r, 4]).all() for r in range(3))  # truncation 1: one image per class
    assert all(len({t.tobytes() for t in tiles[r, :4]}) == 4 for r in range(3))  # truncation 0: one per seed
    assert (tiles[0, 4] != tiles[1, 4]).any()


def test_sample_interpolation_ends_at_the_two_images(_sample_pixel_ckpt, tmp_path):
    G, _ = gat.load_generator(_sample_pixel_ckpt)
    z, _ = sample.latent_codes(0, [2, 5], G.z_dim, 10)
    rounded = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()  # as gat.save_grid
    for classes, ends in (("4", ([4, 4], z)), ("4,9", ([4, 9], z[:1].expand(2, -1)))):
        i, j = (2, 5) if classes == "4" else (2, 2)
        _sample_run("--ckpt", _sample_pixel_ckpt, "--interpolate", i, j, "--classes", classes, "--frames", 5,
                    "--out", tmp_path)
        name = f"interp_seed0_{i}-{j}_class{classes.replace(',', '-')}_trunc0"
        strip = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert strip.shape == (8, 5 * 8) and sorted(os.listdir(tmp_path / name)) == [f"{k:03d}.png" for k in range(5)]
        expected = rounded(G.generate(ends[1], torch.tensor(ends[0])))
        frames = strip.reshape(8, 5, 8).transpose(1, 0, 2)  # [frame, 8, 8]
        assert np.abs(frames[[0, -1]].astype(int) - expected).max() <= 1
        assert (frames[2] != frames[0]).any() and (frames[2] != frames[-1]).any()


def test_sample_damaged_foreign_or_incomplete_checkpoints_fail_clearly(_sample_pixel_ckpt, tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(open(_sample_pixel_ckpt, "rb").read()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    no_raw = tmp_path / "no_raw.pt"
    ckpt = torch.load(_sample_pixel_ckpt)
    torch.save({k: v for k, v in ckpt.items() if k != "G"}, no_raw)
    cases = [(damaged, [], "damaged"), (foreign, [], "not a gat.py checkpoint"),
             (no_raw, ["--raw"], "does not hold a usable generator"), (tmp_path / "absent.pt", [], "does not exist")]
    for path, extra, message in cases:
        err = _sample_error(capsys, "--ckpt", path, "--num-images", 2, "--out", tmp_path / "out", *extra)
        assert err.startswith("error:") and message in err and str(path) in err
        assert not (tmp_path / "out").exists()  # nothing written before the model is whole
    for classes, message in (("12", "classes 0..9"), ("a,b", "comma-separated class indices")):
        assert message in _sample_error(capsys, "--ckpt", _sample_pixel_ckpt, "--classes", classes, "--out", tmp_path)
    _sample_run("--ckpt", _sample_pixel_ckpt, "--num-images", 2, "--out", tmp_path / "twice")
    assert "is not empty" in _sample_error(capsys, "--ckpt", _sample_pixel_ckpt, "--num-images", 2,
                                           "--out", tmp_path / "twice")


def test_sample_latent_checkpoint_decodes_with_a_vae_given_by_path(tmp_path, capsys):
    vae_dir = _sample_tiny_vae(tmp_path / "vae")
    ckpt = _sample_save_checkpoint(tmp_path / "latent.pt", num_classes=3, channels=4, input_size=4,
                                   data_kind="latent", vae=vae_dir)
    _sample_run("--ckpt", ckpt, "--num-images", 3, "--batch-size", 2, "--out", tmp_path / "s")
    with np.load(tmp_path / "s" / "samples_3x32x32x3.npz") as f:
        x, y = f["arr_0"], f["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (3, 32, 32, 3) and len(os.listdir(tmp_path / "s" / "images")) == 3
    G, _ = gat.load_generator(ckpt)
    vae = gat.load_vae(vae_dir, torch.device("cpu"))
    z, _ = sample.latent_codes(0, range(3), G.z_dim, 3)
    expected = sample.to_uint8(gat.decode_latents(vae, G.generate(z, torch.from_numpy(y)))).numpy()
    assert np.abs(x.astype(int) - expected).max() <= 1 and x.std() > 1
    _sample_run("--ckpt", ckpt, "--grid", "--cols", 2, "--out", tmp_path / "g")  # rows default to all 3 classes
    assert Image.open(tmp_path / "g" / "grid_seed0_trunc0.png").size == (2 * 32, 3 * 32)
    # a VAE path that is gone, overridden by --vae, or not a VAE: clear errors; a good --vae rescues
    missing = _sample_save_checkpoint(tmp_path / "missing.pt", num_classes=3, channels=4, input_size=4,
                                      data_kind="latent", vae=str(tmp_path / "moved_vae"))
    err = _sample_error(capsys, "--ckpt", missing, "--num-images", 1, "--out", tmp_path / "m")
    assert "moved_vae" in err and "neither a local folder nor a hub model" in err and "--vae" in err
    assert not (tmp_path / "m").exists()
    os.makedirs(tmp_path / "empty")
    err = _sample_error(capsys, "--ckpt", ckpt, "--vae", tmp_path / "empty", "--num-images", 1, "--out", tmp_path / "m")
    assert "is not a folder holding an AutoencoderKL" in err
    _sample_run("--ckpt", missing, "--vae", vae_dir, "--num-images", 1, "--no-png", "--out", tmp_path / "m")
    assert os.listdir(tmp_path / "m") == ["samples_1x32x32x3.npz"]
