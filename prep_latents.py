"""
Turn a folder of class subfolders of images (ImageNet's train/ layout; or a flat folder, one class) into the
Stable Diffusion VAE posterior moments that gat.py trains on, plus the cropped images for the REPA teacher.

    torchrun --nproc_per_node=8 prep_latents.py --images /path/imagenet/train --out data/imagenet256
    python prep_latents.py --images /path/imagenet/train            # one GPU, or the CPU

Every image gets a slot (sorted class folders, then sorted file names), is center-cropped the ADM way
and encoded by diffusers' AutoencoderKL; the results go into memory-mapped .npy arrays in --out with a
manifest.json (format "gat-latents-v1", see README). Slots are cut into shards dealt out to the ranks;
a shard is marked done in OUT/progress/ only after its data is on disk, so rerunning the same command
after an interruption redoes at most the unfinished shards. A file that fails to decode keeps its slot
(and label) but is marked invalid and listed in skipped.jsonl. manifest.json says "complete": true only
after a final pass has checked that every slot was written.

The posterior's moments are stored rather than one sample of it, so that every training step can draw a
fresh sample. No flipped copies are stored: gat.py's augmentation flips the latents and the teacher's
images together during training.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from fid import UserError, check_device  # one `error: ...` convention in every script

FORMAT = "gat-latents-v1"  # load_latents (gat.py's reader, below) refuses a folder of any other format
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# written next to each array in manifest.json, so that the folder describes itself
HOLDS = {
    "moments": "VAE posterior per slot, unscaled: the first C channels mean, the next C std; zeros where not valid",
    "images": "ADM center-cropped RGB image, NHWC uint8 (the REPA teacher's input); zeros where not valid",
    "labels": "class index into class_names (sorted folder names; one class for a flat folder), set for every slot",
    "valid": "True where the slot holds an encoded image, False for a file that failed to decode",
}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder with one subfolder of images per class, or of images (one class)")
    p.add_argument("--out", default="data/imagenet256", help="output folder (resumed if it exists)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="Hugging Face id (stabilityai/sd-vae-ft-ema or stabilityai/sd-vae-ft-mse) or a local "
                        "diffusers folder saved with save_pretrained")
    p.add_argument("--resolution", type=int, default=256, help="side of the center crop")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call, per rank")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per rank (default: this machine's cores / ranks on it)")
    p.add_argument("--shard-size", type=int, default=1024, help="slots per shard, the unit of resuming")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                   help="encoder autocast precision (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--ref-stats", default=None,
                   help="also write the Inception statistics of the valid images to this .npz, for fid.py")
    p.add_argument("--inception", default=None, help="local Inception weights for --ref-stats (see fid.py)")
    args = p.parse_args(argv)
    validate_args(args)
    if args.precision is None:  # fp16, not bf16: 3 more mantissa bits, and encode() redoes an overflow in fp32
        args.precision = "fp16" if args.device.startswith("cuda") else "fp32"
    if args.workers is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        # the cores this process may use (a container or taskset can allow fewer than cpu_count), shared by
        # the ranks on this machine
        args.workers = max(1, len(os.sched_getaffinity(0)) // local_world)
    return args

def validate_args(args):
    """Every setting checked before torch.distributed, the scan or the VAE: one `error: ...` line (exit 1),
    so that a typo costs a second, not a VAE download or a scan of ImageNet's 1.28M files."""
    for flag, value, least in (("--resolution", args.resolution, 8), ("--batch-size", args.batch_size, 1),
                               ("--shard-size", args.shard_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: expected an integer >= {least}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file: give a folder (created if missing, resumed if not)")
    if args.inception and not os.path.isfile(args.inception):
        raise UserError(f"--inception {args.inception!r}: no such file")
    check_device("--device", args.device)

# -----------------------------------------------------------------------------
# what the slots are

def scan(root):
    """Sorted class folders and, in slot order, their image files; everything else comes back as ignored.
    A folder of images without class subfolders (FFHQ-style) is one class: unconditional data."""
    if not os.path.isdir(root):
        raise UserError(f"--images {root!r} is not a folder: pass the folder whose subfolders are the classes "
                         f"(for ImageNet, the train/ folder), or a flat folder of images (unconditional)")
    # Sorted throughout: sorted folder names give ImageNet's standard class indices (n01440764, tench, is 0;
    # 207 is the golden retriever), and a rerun must find the same slots to resume (prepare compares files.txt).
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    # A hidden folder (.ipynb_checkpoints, .cache) would otherwise become a class and shift every later label.
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    ignored = [e.name for e in entries if not (e.is_dir() and not e.name.startswith("."))]
    flat = not classes and any(os.path.splitext(e.name)[1].lower() in IMAGE_EXTS for e in entries if e.is_file())
    if flat:
        classes, ignored = [""], []  # one class, the folder itself: every label 0
    elif not classes:
        raise UserError(f"--images {root!r} has neither class subfolders nor images: expected one folder per class "
                         f"(ImageNet's train/n01440764/*.JPEG layout) or a flat folder of images (unconditional)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirs, names in os.walk(os.path.join(root, name), followlinks=True):
            if flat:
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders hold no training images
            found += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
        for rel in sorted(found):
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTS:
                files.append(rel)
                labels.append(label)
            else:
                ignored.append(rel)
    if not files:
        raise UserError(f"--images: no image files ({', '.join(sorted(IMAGE_EXTS))}) found in the class folders of {root!r}")
    return classes, files, labels, ignored

def center_crop(img, size):
    """ADM's center crop (guided-diffusion's center_crop_arr), the field's ImageNet preprocessing."""
    # Halving with BOX first keeps the final BICUBIC step under 2x, where it does not alias.
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]

def load_image(path, size):
    with Image.open(path) as img:
        img.load()  # decode everything now, so that a truncated file fails here
        # Grayscale, CMYK, palette and RGBA all become plain RGB (alpha is dropped, as ADM does).
        return center_crop(img.convert("RGB"), size)

class Slots(torch.utils.data.Dataset):
    def __init__(self, root, files, size):
        self.root, self.files, self.size = root, files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, slot):
        try:
            return slot, load_image(os.path.join(self.root, self.files[slot]), self.size), ""
        except Exception as e:  # whatever a bad file raises, the run goes on and the slot stays put
            return slot, np.zeros((self.size, self.size, 3), np.uint8), f"{type(e).__name__}: {e}"

# -----------------------------------------------------------------------------
# the output folder

def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one

def read_json(path):
    with open(path) as f:
        return json.load(f)

def settings(args, vae):
    """What the contents depend on; a resumed run must match them exactly."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # each encoder block but the last halves the side
    if args.resolution % factor:
        raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    side = args.resolution // factor
    return {"resolution": args.resolution, "latent_shape": [vae.config.latent_channels, side, side],
            "vae": args.vae, "latent_scale": vae.config.scaling_factor, "latent_shift": latent_shift(vae),
            "shard_size": args.shard_size, "precision": args.precision}

def latent_shift(vae):
    """The VAE's shift_factor (SD3 and FLUX VAEs; None or absent for the SD-VAE): latent = scale * (z - shift)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)

def prepare(args, vae, classes, files, labels):
    """Rank 0: create the output folder, or check that the one there belongs to this same job."""
    out, want = args.out, settings(args, vae)
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        manifest = read_json(path)
        have = {k: manifest.get(k, 0.0 if k == "latent_shift" else None) for k in want}  # older: no shift
        if manifest.get("format") != FORMAT or have != want:
            raise UserError(f"{out} holds a run with other settings ({have}, this run: {want}): "
                             f"pass the same arguments to resume it, or another --out")
        # surrogateescape, here and below: file names that are not valid UTF-8 round-trip byte for byte
        with open(os.path.join(out, "files.txt"), encoding="utf-8", errors="surrogateescape") as f:
            old = f.read().splitlines()
        if old != files or manifest["class_names"] != classes:
            raise UserError(f"the images under {args.images} changed since {out} was started ({len(old)} files "
                             f"then, {len(files)} now): pass another --out, or delete {out} to start over")
        return manifest
    os.makedirs(os.path.join(out, "progress"), exist_ok=True)
    for name in os.listdir(os.path.join(out, "progress")):  # left by a start that died before its manifest
        os.remove(os.path.join(out, "progress", name))
    n, (c, h, w), r = len(files), want["latent_shape"], args.resolution
    # float16 moments: its rounding error (2^-11 relative, ~0.003 on latents whose spread is ~5.5 = 1/0.18215)
    # is far below what the generator can resolve, its range (65504) holds SD-VAE moments with room to spare,
    # and it halves the ImageNet file (21 GB instead of 42 GB).
    arrays = {"moments": ("float16", [n, 2 * c, h, w]), "images": ("uint8", [n, r, r, 3]),
              "labels": ("int64", [n]), "valid": ("bool", [n])}
    for name, (dtype, shape) in arrays.items():
        open_memmap(os.path.join(out, name + ".npy"), mode="w+", dtype=dtype, shape=tuple(shape))  # zero-filled
    open_memmap(os.path.join(out, "labels.npy"), mode="r+")[:] = labels
    with open(os.path.join(out, "files.txt"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("".join(rel + "\n" for rel in files))
    manifest = {"format": FORMAT, "count": n, "num_valid": None, **want, "num_classes": len(classes),
                "class_names": classes, "complete": False,
                "arrays": {name: {"file": name + ".npy", "dtype": dtype, "shape": shape, "holds": HOLDS[name]}
                           for name, (dtype, shape) in arrays.items()},
                "files": "files.txt", "skipped": "skipped.jsonl", "source": os.path.abspath(args.images),
                "num_shards": math.ceil(n / args.shard_size),
                "created": datetime.datetime.now().isoformat(timespec="seconds")}
    write_json(path, manifest)  # last: a folder without a manifest is simply started again
    return manifest

def marker(out, shard):
    return os.path.join(out, "progress", f"{shard:06d}.json")

def finish(out, manifest, ignored):
    """Rank 0, after all ranks are done: check every slot, write skipped.jsonl, mark the manifest complete."""
    path = os.path.join(out, "manifest.json")

    def fail(message):
        manifest.update(num_valid=None, complete=False)  # also when an earlier run had called it complete
        write_json(path, manifest)
        raise UserError(f"{message}")

    missing = [s for s in range(manifest["num_shards"]) if not os.path.exists(marker(out, s))]
    if missing:
        fail(f"{len(missing)} of {manifest['num_shards']} shards are unfinished (first: {missing[0]}): "
             f"run the same command again to finish them")
    shards = [read_json(marker(out, s)) for s in range(manifest["num_shards"])]
    n = manifest["count"]
    covered = sum(m["end"] - m["start"] for m in shards)
    valid = np.load(os.path.join(out, "valid.npy"), mmap_mode="r")
    moments = np.load(os.path.join(out, "moments.npy"), mmap_mode="r")
    skipped = [e for m in shards for e in m["skipped"]]
    if covered != n or len(valid) != n or sorted(e["slot"] for e in skipped) != np.flatnonzero(~valid).tolist():
        fail(f"{out} is inconsistent (shards cover {covered} of {n} slots, or the skipped files in progress/ "
             f"disagree with valid.npy): delete {out} and start over")
    # A slot is written whole, and an encoded std is exp(>= -15) > 0 (a float16 subnormal at worst), so one
    # std value per slot tells whether its write reached the file.
    unwritten = np.flatnonzero(np.asarray(valid) & ~(moments[:, manifest["latent_shape"][0], 0, 0] > 0))
    if len(unwritten):
        for s in sorted({int(i) // manifest["shard_size"] for i in unwritten}):
            os.remove(marker(out, s))
        fail(f"{len(unwritten)} valid slots were never written (first: {unwritten[0]}); their shards are "
             f"unmarked now: run the same command again to redo them")
    with open(os.path.join(out, "skipped.jsonl"), "w") as f:
        for e in skipped + [{"slot": None, "file": rel, "reason": "not an image file: ignored"} for rel in ignored]:
            f.write(json.dumps(e) + "\n")
    manifest.update(num_valid=n - len(skipped), complete=True)
    write_json(path, manifest)
    print(f"{out}: {n} slots verified, {n - len(skipped)} valid, {len(skipped)} skipped and {len(ignored)} "
          f"non-image files ignored (see skipped.jsonl)")

# -----------------------------------------------------------------------------
# encoding

def load_vae(name, device, dtype=None):
    """The SD-VAE (diffusers AutoencoderKL) by hub name or local folder (default dtype bf16 on GPU, as
    gat.py decodes; encode() here loads it in float32 and picks its precision by autocast)."""
    from diffusers.models import AutoencoderKL
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:  # low_cpu_mem_usage=False: the same load, without the request to install `accelerate`
        vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError, ValueError or hub errors for a bad name
        where = ("is not a folder holding an AutoencoderKL" if os.path.exists(name) else
                 "is neither a local folder nor a hub model available here (offline? not cached?)")
        raise UserError(f"cannot load the VAE '{name}': it {where}. Give --vae DIR, a folder saved with "
                        "AutoencoderKL.save_pretrained (offline: on a machine with internet run AutoencoderKL"
                        ".from_pretrained('stabilityai/sd-vae-ft-ema').save_pretrained(DIR), copy DIR over and "
                        f"pass --vae DIR). Cause: {type(e).__name__}: {e}") from e
    return vae.to(device).eval().requires_grad_(False)

@torch.inference_mode()
def encode(vae, images, precision):
    """uint8 [B, R, R, 3] -> float16 posterior moments [B, 2C, R/8, R/8] (mean, then std)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, R, R] in [-1, 1], as the VAE was trained
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    with torch.autocast(x.device.type, dtype=dtype, enabled=precision != "fp32"):
        h = vae.encode(x).latent_dist.parameters.float()  # [B, 2C, R/8, R/8]: mean, logvar
    if not torch.isfinite(h).all():  # fp16 overflowed somewhere in the encoder: this batch in float32
        h = vae.encode(x).latent_dist.parameters.float()
    mean, logvar = h.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
    return torch.cat([mean, std], dim=1).half()  # float16 on disk: see prepare

def encode_shards(args, vae, files, todo, rank, world, device):
    """This rank's shards (todo) encoded into the memory-mapped arrays, each marked done as it completes;
    returns the number of slots encoded."""
    out, size, n = args.out, args.shard_size, len(files)
    spans = {s: (s * size, min(n, (s + 1) * size)) for s in todo}
    # Batches never straddle shards, so a shard is finished the moment its last batch is written, and a
    # resumed run forms exactly the same batches as an uninterrupted one.
    batches = [list(range(i, min(i + args.batch_size, b))) for a, b in spans.values()
               for i in range(a, b, args.batch_size)]
    # pinned memory makes the non_blocking copy to the GPU asynchronous; DataLoader refuses a prefetch_factor
    # when there are no workers
    loader = torch.utils.data.DataLoader(Slots(args.images, files, args.resolution), batch_sampler=batches,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if args.workers else None)
    arrays = {name: open_memmap(os.path.join(out, name + ".npy"), mode="r+") for name in ("moments", "images", "valid")}
    left = {s: b - a for s, (a, b) in spans.items()}
    skipped = {s: [] for s in todo}
    total = sum(left.values())
    bar = tqdm(total=total, unit="img", disable=rank != 0 or total == 0, smoothing=0.1,
               desc=f"rank 0 of {world}" if world > 1 else "encoding")
    for slots, images, reasons in loader:
        a, b = int(slots[0]), int(slots[-1]) + 1
        ok = torch.tensor([not r for r in reasons])
        moments = encode(vae, images.to(device, non_blocking=True), args.precision).cpu()
        moments = moments * ok.view(-1, 1, 1, 1)  # a skipped slot holds zeros, not its placeholder's encoding
        arrays["moments"][a:b] = moments.numpy()
        arrays["images"][a:b] = images.numpy()
        arrays["valid"][a:b] = ok.numpy()
        s = a // size  # the batch's shard (batches never straddle shards)
        for slot, reason in zip(slots.tolist(), reasons):
            if reason:
                skipped[s].append({"slot": slot, "file": files[slot], "reason": reason})
                tqdm.write(f"skipped {files[slot]}: {reason}")
        left[s] -= b - a
        if left[s] == 0:
            for arr in arrays.values():
                arr.flush()  # the data reaches the file before the marker that vouches for it
            write_json(marker(out, s), {"shard": s, "start": spans[s][0], "end": spans[s][1], "rank": rank,
                                        "skipped": skipped.pop(s)})
        bar.update(b - a)
    bar.close()
    return total

# -----------------------------------------------------------------------------
# Inception reference statistics for fid.py

def ref_stats(args, rank, world, device):
    import fid  # only this optional step needs it (and the Inception weights)

    model = fid.load_inception(args.inception, device)
    images = np.load(os.path.join(args.out, "images.npy"), mmap_mode="r")
    # valid slots only (an invalid one holds a black placeholder), in one contiguous share per rank
    mine = np.array_split(np.flatnonzero(np.load(os.path.join(args.out, "valid.npy"))), world)[rank]
    # Running sums of x and x x^T (float64) rather than the features themselves: ImageNet's features would
    # take 21 GB, the sums are a vector and a matrix per kind, which all_reduce adds up across ranks.
    f64 = dict(dtype=torch.float64, device=device)
    sums = {k: (torch.zeros(d, **f64), torch.zeros(d, d, **f64)) for k, d in (("pool", 2048), ("spatial", 2023))}
    for i in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, desc="inception features"):
        with torch.no_grad():
            feats = model(torch.from_numpy(images[mine[i:i + args.batch_size]]).to(device))
        for k, (s1, s2) in sums.items():
            f = feats[k].double()  # [B, D]
            s1 += f.sum(0)
            s2 += f.T @ f
    n = torch.tensor(float(len(mine)), dtype=torch.float64, device=device)  # a tensor: all_reduce adds it too
    if world > 1:
        for t in (n, *(s for pair in sums.values() for s in pair)):
            dist.all_reduce(t)
    if rank == 0:
        stats = {}
        for (s1, s2), suffix in zip(sums.values(), ("", "_s")):  # ADM's key names: mu, sigma, mu_s, sigma_s
            mu = s1 / n
            stats["mu" + suffix] = mu.cpu().numpy()
            stats["sigma" + suffix] = ((s2 - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()  # np.cov's n - 1
        fid.save_stats(args.ref_stats, stats)
        print(f"wrote the Inception statistics of {int(n)} images to {args.ref_stats}")

# -----------------------------------------------------------------------------
# reading: gat.py's loader of the folder this script writes

class DataError(UserError):
    pass

def load_latents(path):
    """-> dict(moments, images, labels, valid, index of the valid slots, num_classes, manifest), the
    arrays memory-mapped; a DataError that says what to do for a missing, partial or malformed folder."""
    hint = (f"Prepare ImageNet latents with `python prep_latents.py --images /path/to/train --out {path}`"
            " or run the CPU demo with `python gat.py --data digits`.")
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise DataError(f"no dataset at '{path}' (missing {manifest_path}). {hint}")
    try:
        with open(manifest_path) as f:
            man = json.load(f)
        if man.get("format") != FORMAT:
            raise DataError(f"{manifest_path} has format {man.get('format')!r}, expected '{FORMAT}'. {hint}")
        if not man.get("complete"):
            raise DataError(f"'{path}' is incomplete (an interrupted prep_latents.py run): rerun the same "
                            "prep_latents.py command, it resumes where it stopped.")
        arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in HOLDS}
        n = man["count"]
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"malformed dataset at '{path}': {e}. {hint}") from e
    channels = man.get("latent_shape", [4])[0]
    if not (arrays["moments"].shape[:2] == (n, 2 * channels) and len(arrays["images"]) == n
            and arrays["labels"].shape == arrays["valid"].shape == (n,)):
        raise DataError(f"malformed dataset at '{path}': array shapes disagree with count {n}. {hint}")
    index = np.flatnonzero(arrays["valid"])
    if len(index) == 0:
        raise DataError(f"'{path}' holds no valid images. {hint}")
    return dict(arrays, index=index, num_classes=man["num_classes"], manifest=man)

# -----------------------------------------------------------------------------

def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as e:  # bad input, as in the other scripts: one line, exit 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

def run(args):
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    else:
        rank, world = 0, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every batch has the same shape
        if args.precision == "fp32":
            torch.backends.cudnn.allow_tf32 = False  # fp32 asked for is fp32, not cuDNN's TF32 convolutions
    barrier = dist.barrier if distributed else (lambda: None)

    # Rank 0 scans, loads the VAE first (one download into the Hugging Face cache, not eight racing ones) and
    # sets up the folder; the others then read the slot list it wrote.
    if rank == 0:
        classes, files, labels, ignored = scan(args.images)
        # float32 (encode() picks the precision); NHWC images viewed as NCHW are channels_last, the layout
        # GPU tensor cores convolve fastest
        vae = load_vae(args.vae, device, torch.float32).to(memory_format=torch.channels_last)
        prepare(args, vae, classes, files, labels)
    barrier()
    if rank != 0:
        vae = load_vae(args.vae, device, torch.float32).to(memory_format=torch.channels_last)
    manifest = read_json(os.path.join(args.out, "manifest.json"))
    with open(os.path.join(args.out, "files.txt"), encoding="utf-8", errors="surrogateescape") as f:
        files = f.read().splitlines()
    done = {s for s in range(manifest["num_shards"]) if os.path.exists(marker(args.out, s))}
    barrier()  # everyone has seen the same finished shards before anyone adds to them
    # dealt round-robin: the shards a resumed run has left spread evenly over however many ranks it has now
    todo = [s for s in range(manifest["num_shards"]) if s not in done][rank::world]
    if rank == 0:
        what = ("no class subfolders: one class, unconditional" if manifest["class_names"] == [""] else
                f"{manifest['num_classes']} classes")
        print(f"{len(files)} images ({what}) -> {args.out}: {manifest['num_shards']} "
              f"shards, {len(done)} already done, {world} rank(s) on {device.type}, {args.precision}, "
              f"{args.workers} loader workers per rank")

    t0 = time.time()
    count = torch.tensor(encode_shards(args, vae, files, todo, rank, world, device), device=device)
    barrier()
    if distributed:
        dist.all_reduce(count)  # the rate printed below is over all ranks
    seconds = time.time() - t0
    if rank == 0:
        print(f"encoded {int(count)} images in {seconds:.1f}s: {int(count) / seconds:.1f} images/s")
        finish(args.out, manifest, ignored)
    barrier()  # ref_stats reads the arrays only once rank 0 has checked them
    if args.ref_stats:
        ref_stats(args, rank, world, device)
    if distributed:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
