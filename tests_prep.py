"""Tests of prep_latents.py (run: python -m pytest -q tests_prep.py). Offline: a tiny random AutoencoderKL
saved to a temporary folder stands in for the SD-VAE, and images are cropped to 32 px."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import prep_latents

_PREP_REPO = os.path.dirname(os.path.abspath(__file__))
# slot order: sorted classes, sorted files; "dog" is an empty class that must still take label 3
_PREP_FILES = ["ant/a0.jpg", "ant/a1.png", "ant/a2.png", "ant/a3.JPEG",
               "bee/b0.jpg", "bee/b1.gif", "bee/b2.jpg", "bee/b3.bmp", "bee/b4.tif",
               "cat/c0.png", "cat/c1.jpg", "cat/c2.webp", "cat/garbage.png",
               "eel/e0.jpg", "eel/e1.png", "eel/sub/e2.jpg"]
_PREP_LABELS = [0] * 4 + [1] * 5 + [2] * 4 + [4] * 3
_PREP_BAD = {"bee/b2.jpg": 6, "cat/garbage.png": 12}  # truncated JPEG, not an image at all
_PREP_IGNORED = {".cache", "LICENSE", "ant/readme.txt"}


def _prep_handmade(w=530, h=260):
    """An image whose every column and row differs, so a crop off by one pixel shows."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x % 256, y % 256, (3 * x + 7 * y) % 256], -1).astype(np.uint8))


def _prep_make_tree(root):
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    for d in ("ant", "bee", "cat", "dog", "eel/sub", ".cache"):
        os.makedirs(root / d, exist_ok=True)
    rgb(50, 40).save(root / "ant/a0.jpg")
    rgb(33, 70).convert("L").save(root / "ant/a1.png")
    rgb(64, 64).convert("RGBA").save(root / "ant/a2.png")
    rgb(100, 75).save(root / "ant/a3.JPEG", format="JPEG")
    (root / "ant/readme.txt").write_text("not an image")
    rgb(45, 45).convert("CMYK").save(root / "bee/b0.jpg")
    rgb(40, 60).convert("P").save(root / "bee/b1.gif")
    rgb(80, 80).save(root / "bee/b2.jpg")
    data = (root / "bee/b2.jpg").read_bytes()
    (root / "bee/b2.jpg").write_bytes(data[:len(data) // 2])
    rgb(32, 32).save(root / "bee/b3.bmp")
    rgb(48, 36).save(root / "bee/b4.tif")
    _prep_handmade().save(root / "cat/c0.png")
    rgb(200, 150).save(root / "cat/c1.jpg")
    rgb(36, 48).save(root / "cat/c2.webp")
    (root / "cat/garbage.png").write_bytes(b"this is no png")
    for name in ("e0.jpg", "e1.png", "sub/e2.jpg"):
        rgb(40, 40).save(root / "eel" / name)
    rgb(40, 40).save(root / ".cache/x.jpg")
    (root / "LICENSE").write_text("top-level file, not a class")


@pytest.fixture(scope="session")
def _prep_vae(tmp_path_factory):
    """Random AutoencoderKL with SD-VAE's shape rules: 4 blocks (downsampling 8x), 4 latent channels."""
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def _prep_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _prep_make_tree(root)
    return root


def _prep_args(images, out, vae, *extra):
    # --device cpu even where a GPU exists: the runs must be comparable bit for bit, and gloo needs no GPUs
    return ["--images", str(images), "--out", str(out), "--vae", vae, "--resolution", "32", "--device", "cpu",
            "--batch-size", "2", "--shard-size", "4", "--workers", "0", *extra]


@pytest.fixture(scope="session")
def _prep_reference(tmp_path_factory, _prep_tree, _prep_vae):
    """One uninterrupted single-process run, the result the other runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    prep_latents.main(_prep_args(_prep_tree, out, _prep_vae))
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


def test_prep_center_crop_adm_rule():
    # 530x260: BOX-halved while the short side is >= 128 (265x130, then 132x65), BICUBIC to short side 64
    # (round(132 * 64 / 65) = 130 wide), then the middle 64 columns: (130 - 64) // 2 = 33.
    img = _prep_handmade()
    step = img.resize((265, 130), Image.BOX).resize((132, 65), Image.BOX).resize((130, 64), Image.BICUBIC)
    expected = np.asarray(step)[:, 33:97]
    got = prep_latents.center_crop(img, 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.array_equal(got, expected)
    # A small portrait image is upscaled (20x31 -> 64x99, round(99.2)) and cropped to rows (99 - 64) // 2 = 17..81.
    small = _prep_handmade(20, 31)
    assert np.array_equal(prep_latents.center_crop(small, 64), np.asarray(small.resize((64, 99), Image.BICUBIC))[17:81])


def test_prep_output_format(_prep_reference, _prep_tree, _prep_vae):
    out = _prep_reference
    arrays, m = _prep_read(out)
    n = len(_PREP_FILES)
    assert m["format"] == "gat-latents-v1" and m["complete"] is True
    assert (m["count"], m["num_valid"], m["resolution"], m["latent_shape"]) == (n, n - 2, 32, [4, 4, 4])
    assert (m["vae"], m["latent_scale"], m["num_classes"]) == (_prep_vae, 0.18215, 5)
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
    vae = AutoencoderKL.from_pretrained(_prep_vae)
    with torch.no_grad():
        post = vae.encode(torch.from_numpy(images[valid]).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    want = torch.cat([post.mean, post.std], 1).numpy()
    np.testing.assert_allclose(moments[valid].astype(np.float32), want, rtol=2e-3, atol=1e-4)
    assert (moments[valid][:, 4:] > 0).all()

    import gat  # the reader accepts the folder and trains on exactly the valid slots

    data = gat.load_latent_dataset(str(out))
    assert data["index"].tolist() == np.flatnonzero(valid).tolist() and data["num_classes"] == 5


def test_prep_resume_after_kill(_prep_reference, _prep_tree, _prep_vae, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = _prep_args(_prep_tree, out, _prep_vae)
    # SIGKILL (no cleanup, no flush) when the loader reaches cat/c1.jpg, slot 10: shards 0-1 (slots 0-7) are
    # done, shard 2 is half written (slots 8-9), shard 3 untouched.
    code = (f"import os, signal, sys; sys.path.insert(0, {_PREP_REPO!r}); import prep_latents\n"
            "load = prep_latents.load_image\n"
            "def dying(path, size):\n"
            "    if path.endswith('c1.jpg'):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return load(path, size)\n"
            "prep_latents.load_image = dying\n"
            f"prep_latents.main({args!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["num_valid"] is None
    assert sorted(os.listdir(out / "progress")) == ["000000.json", "000001.json"]
    assert np.load(out / "valid.npy")[8:10].all() and not (out / "skipped.jsonl").exists()
    import gat

    with pytest.raises(gat.DataError, match="incomplete"):
        gat.load_latent_dataset(str(out))

    loaded = []
    load = prep_latents.load_image
    monkeypatch.setattr(prep_latents, "load_image", lambda path, size: loaded.append(path) or load(path, size))
    prep_latents.main(args)
    assert sorted(loaded) == sorted(str(_prep_tree / f) for f in _PREP_FILES[8:])  # finished shards not redone
    _prep_assert_same(out, _prep_reference)


def test_prep_final_pass_catches_unwritten_slot(_prep_reference, _prep_tree, _prep_vae, tmp_path):
    # A shard marked done whose data never reached the file (say, a machine crash) is caught and redone.
    out = tmp_path / "out"
    shutil.copytree(_prep_reference, out)
    np.lib.format.open_memmap(out / "moments.npy", mode="r+")[5] = 0
    with pytest.raises(SystemExit, match="never written"):
        prep_latents.main(_prep_args(_prep_tree, out, _prep_vae))
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not (out / "progress/000001.json").exists() and (out / "progress/000000.json").exists()
    prep_latents.main(_prep_args(_prep_tree, out, _prep_vae))
    _prep_assert_same(out, _prep_reference)


def test_prep_two_ranks(_prep_reference, _prep_tree, _prep_vae, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(_PREP_REPO, "prep_latents.py"), *_prep_args(_prep_tree, out, _prep_vae), "--workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # gloo on the CPU, 1 loader worker each
    assert proc.returncode == 0, proc.stderr[-3000:]
    slots = {0: set(), 1: set()}
    for name in os.listdir(out / "progress"):
        shard = json.loads((out / "progress" / name).read_text())
        slots[shard["rank"]] |= set(range(shard["start"], shard["end"]))
    assert slots[0] and slots[1] and not slots[0] & slots[1]
    assert slots[0] | slots[1] == set(range(len(_PREP_FILES)))
    _prep_assert_same(out, _prep_reference)


def test_prep_refuses_bad_input(tmp_path, _prep_vae):
    def fails(*args):
        with pytest.raises(SystemExit) as e:
            prep_latents.main(["--out", str(tmp_path / "out"), "--vae", _prep_vae, "--resolution", "32",
                               "--device", "cpu", "--workers", "0", *args])
        return str(e.value)

    assert "not a folder" in fails("--images", str(tmp_path / "missing"))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    assert "no class subfolders" in fails("--images", str(flat))
    (flat / "empty").mkdir()
    assert "no image files" in fails("--images", str(flat))
    shutil.move(flat / "x.png", flat / "empty" / "x.png")
    assert "pass --vae DIR" in fails("--images", str(flat), "--vae", str(tmp_path / "no-such-vae"))
    assert "multiple of the VAE's downsampling factor 8" in fails("--images", str(flat), "--resolution", "36")

    prep_latents.main(["--images", str(flat), "--out", str(tmp_path / "out"), "--vae", _prep_vae,
                       "--resolution", "32", "--device", "cpu", "--workers", "0"])
    assert "other settings" in fails("--images", str(flat), "--resolution", "64")
    Image.new("RGB", (8, 8)).save(flat / "empty" / "y.png")
    assert "changed since" in fails("--images", str(flat))


def test_prep_ref_stats(tmp_path, _prep_vae):
    import fid

    torch.manual_seed(0)
    torch.save(fid.InceptionV3FID().state_dict(), tmp_path / "inception.pth")
    images = tmp_path / "images"
    (images / "one").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / "one" / f"{i}.png")
    (images / "one" / "bad.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    prep_latents.main(_prep_args(images, out, _prep_vae, "--ref-stats", str(tmp_path / "ref.npz"),
                                 "--inception", str(tmp_path / "inception.pth")))
    valid = np.load(out / "valid.npy")
    assert valid.tolist() == [True, True, False]
    model = fid.load_inception(str(tmp_path / "inception.pth"))
    feats = fid.inception_features(model, np.load(out / "images.npy")[valid])
    stats = np.load(tmp_path / "ref.npz")
    assert set(stats.files) == {"mu", "sigma", "mu_s", "sigma_s"}
    for key, kind in (("", "pool"), ("_s", "spatial")):
        f = feats[kind]
        np.testing.assert_allclose(stats["mu" + key], f.mean(0), rtol=1e-6, atol=1e-12 * np.abs(f).max())
        cov = np.cov(f, rowvar=False)
        np.testing.assert_allclose(stats["sigma" + key], cov, rtol=1e-6, atol=1e-9 * np.abs(cov).max())
