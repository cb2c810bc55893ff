"""
Sampling from a GAT checkpoint: images for FID, class grids and interpolations. One network evaluation
per image (plus the VAE decoder for latent checkpoints), so 50,000 samples take minutes.

  torchrun --nproc_per_node=8 sample.py --ckpt results/RUN/checkpoints/latest.pt --num-images 50000 --out samples/
      -> samples/images/000000.png ... and samples/samples_50000x256x256x3.npz (ADM sample batch:
         arr_0 uint8 N x H x W x 3, arr_1 the class labels), ready for `python fid.py samples/....npz REF`
  python sample.py --ckpt CKPT --grid --classes 207,360,387,974 --cols 8 --truncation 0 0.3 0.6
  python sample.py --ckpt CKPT --interpolate 0 1 --classes 207 --frames 10        # between two z
  python sample.py --ckpt CKPT --interpolate 0 0 --classes 207,360                 # between two classes
  python sample.py --ckpt CKPT --block-contributions 256     # the MNG analysis: each G block skipped in turn
  python sample.py --ckpt results/GAT-tiny-2-digits/checkpoints/latest.pt --num-images 1000   # the digits demo

Everything is rebuilt from the checkpoint (size, patch, classes, pixel or latent data, VAE name); the
authors' checkpoints (train.py's dict, generate.py's "model" or a bare state dict) load too.
The .npz has the layout of ADM's sample batches because the field's FID-50K numbers (the paper's among
them) come from ADM's evaluator, which reads that layout; fid.py reproduces that evaluator.
Image i is a function of (--seed, i) alone: its z and its random class come from a generator seeded
with both, so the output does not depend on the number of processes, and batches are fixed chunks of
global indices, so each image also goes through the same batch whatever the number of processes.
Truncation (the authors' convention): w moves that fraction toward its class's running mean of w;
0 = none, 1 = every z gives the class-mean image. StyleGAN's psi is 1 - truncation.
Guidance s (the authors' guidance_scale), applied after truncation: w = w_null + s (w - w_null), w_null
the mean style of the same z over all classes; 1 = off, 0 = the class-free image, > 1 more class-typical.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

import gat

TRUNCATION_HELP = (
    "fraction by which w moves toward its class's mean w: 0 = none (the default), 1 = the class-mean image "
    "(the authors' convention; StyleGAN's psi = 1 - this). Several values for --grid. FIDs compare only at "
    "equal truncation: the authors' released sampler defaults to 0.3, their in-training FID uses 0; which one "
    "the paper's FID-50K used is not stated (see README)")
GUIDANCE_HELP = (
    "w-space guidance s, after truncation: w = w_null + s (w - w_null), w_null = the mean w of the same z over "
    "all classes; 1 = off (the default), 0 = class-free. Several values for --grid")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GAT sampling: FID samples (.png + ADM .npz), class grids, interpolations",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a gat.py checkpoint, e.g. results/RUN/checkpoints/latest.pt, or one of the "
                   "authors' (github hse1032/GAT: their EMA G unless --raw; VAE sd-vae-ft-ema unless their args say mse)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-images", "--num", type=int, default=50_000,
                   help="number of images (default mode). Under torchrun write --num-images: torchrun takes a "
                        "bare --num for an abbreviation of its own --numa-binding")
    p.add_argument("--classes", default=None,
                   help="'random' (uniform; default for --num-images), 'balanced' (image i gets class i mod "
                        "classes) or a list '207,360' (cycled over images; grid rows; the 1 or 2 classes of "
                        "--interpolate). --grid defaults to the first 10 classes, --interpolate to class 0")
    p.add_argument("--truncation", type=float, nargs="+", default=[0.0], help=TRUNCATION_HELP)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0], help=GUIDANCE_HELP)
    p.add_argument("--seed", type=int, default=0, help="image i uses z (and random class) from (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="images per G call and per VAE decode, per process")
    p.add_argument("--raw", action="store_true", help="sample the raw generator instead of its EMA")
    p.add_argument("--vae", default="", help="AutoencoderKL folder or hub name; default: the one in the checkpoint")
    p.add_argument("--no-png", action="store_true", help="write only the .npz, no PNG files")
    p.add_argument("--grid", action="store_true", help="one PNG: rows = classes, columns = seeds, per truncation and guidance")
    p.add_argument("--cols", type=int, default=8, help="--grid: columns; column j uses the z of image j")
    p.add_argument("--interpolate", type=int, nargs=2, metavar=("I", "J"),
                   help="frames from (z of image I, first --classes class) to (z of image J, last class), "
                        "linear in w")
    p.add_argument("--frames", type=int, default=8, help="--interpolate: number of frames")
    p.add_argument("--block-contributions", type=int, default=0, metavar="N",
                   help="the MNG analysis: per block of G, how much N images change when that block is skipped "
                        "(LPIPS if installed, else RMS); a table and OUT/block_contributions.json")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    return p.parse_args(argv)

def validate_args(args):
    """Every setting checked before the checkpoint is read: a gat.UserError naming the flag, the value
    and what is allowed (classes are checked against the checkpoint once it is loaded). So a typo costs a
    second, not the load of a checkpoint and a VAE on every rank."""
    for flag, value, least in (("--num-images", args.num_images, 1), ("--batch-size", args.batch_size, 1),
                               ("--cols", args.cols, 1), ("--frames", args.frames, 2), ("--seed", args.seed, 0)):
        if value < least:
            raise gat.UserError(f"{flag} {value}: expected an integer >= {least}")
    if (args.grid, bool(args.interpolate), args.block_contributions != 0).count(True) > 1:
        raise gat.UserError("--grid, --interpolate and --block-contributions are separate modes: give one of them")
    if args.block_contributions < 0:
        raise gat.UserError(f"--block-contributions {args.block_contributions}: expected a number of images >= 1")
    for flag, values, high, meaning in (("--truncation", args.truncation, 1, "0 = none, 1 = class-mean image"),
                                        ("--guidance", args.guidance, 100, "1 = off, 0 = class-free")):
        bad = [v for v in values if not 0 <= v <= high]
        if bad:
            raise gat.UserError(f"{flag} {bad[0]:g}: expected values in [0, {high}] ({meaning})")
        if len(values) > 1 and not args.grid:  # one image per (z, class) outside a grid
            raise gat.UserError(f"{flag} {' '.join(f'{v:g}' for v in values)}: several values are for --grid "
                                "only; give one value")
    if args.interpolate and min(args.interpolate) < 0:
        raise gat.UserError(f"--interpolate {args.interpolate[0]} {args.interpolate[1]}: image indices must be >= 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise gat.UserError(f"--out {args.out!r} is a file: give a folder (it is created if missing)")
    if not os.path.isfile(args.ckpt):
        raise gat.UserError(f"--ckpt: checkpoint '{args.ckpt}' does not exist")
    if args.device:
        gat.check_device("--device", args.device)

def parse_classes(spec, num_classes, default):
    """'random' -> None, 'balanced' -> all classes, '3,1,4' -> [3, 1, 4]; checked against the checkpoint."""
    spec = spec or default
    if spec == "random":
        return None
    if spec == "balanced":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in spec.split(",")]
    except ValueError:
        raise gat.UserError(f"--classes '{spec}': give 'random', 'balanced' or comma-separated class indices") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise gat.UserError(f"--classes {bad}: this checkpoint has classes 0..{num_classes - 1}")
    return classes

def latent_codes(seed, indices, z_dim, num_classes):
    """z [n, z_dim] and a uniformly random class [n] for each global image index, each drawn from a
    generator seeded by (seed, index) alone. (numpy's SeedSequence mixes both words; torch's CPU
    generator keeps only the low 32 bits of its seed, so (seed, index) pairs would collide there.)"""
    rngs = [np.random.default_rng([seed, i]) for i in indices]
    # the reshape keeps z [0, z_dim] for a rank that has no images
    z = np.array([r.standard_normal(z_dim, dtype=np.float32) for r in rngs]).reshape(len(rngs), z_dim)
    y = np.array([r.integers(num_classes) for r in rngs], dtype=np.int64)
    return torch.from_numpy(z), torch.from_numpy(y)

# ------------------------------------------------------------------------------------------------
# Checkpoints to generators: gat.py's, or the authors' converted by their tensors' names and shapes
# ------------------------------------------------------------------------------------------------
def load_generator(path, ema=True, device="cpu"):
    """(G in eval mode, its gat.Config) rebuilt from a checkpoint alone, gat.py's or the authors' (github
    hse1032/GAT)."""
    ckpt = gat.read_torch_file(path)
    try:
        if isinstance(ckpt, dict) and ckpt.get("format") == gat.CKPT_FORMAT:
            cfg = gat.Config(**gat.upgrade_checkpoint(ckpt)["config"])
            G, state = gat.build_generator(cfg), ckpt["G_ema" if ema else "G"]
        elif (theirs := authors_generator_state(ckpt, ema)) is not None:
            cfg, state = config_from_authors(theirs, ckpt.get("args")), from_authors_keys(theirs)
            G = gat.build_generator(cfg)
        else:
            raise gat.CheckpointError(f"'{path}' is neither a gat.py checkpoint (format '{gat.CKPT_FORMAT}') nor the "
                                      "authors' (a dict with 'ema'/'generator'/'model', or their bare generator state dict)")
        G.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        if isinstance(e, gat.CheckpointError):
            raise
        raise gat.CheckpointError(f"checkpoint '{path}' does not hold a usable generator: {e}") from e
    return G.to(device).eval().requires_grad_(False), cfg

# The authors' generator names (their models/generator.py) -> ours. Dropped: their patch embedder of a
# noise input (x_embedder, multiplied by 0 in their forward) and their RoPE tables (feat_rope.freqs_*,
# the same tables, recomputed here).
AUTHORS_KEYS = [("y_embedder.embedding_table.", "class_embed."), ("latent_embedder.", "mapping."),
                ("adaLN_modulation.1.", "modulation."), (".mlp.", ".ffn."), ("final_layers.", "heads.")]
AUTHORS_DROPPED = ("x_embedder.", "feat_rope.")

def authors_generator_state(ckpt, ema):
    """Their train.py's dict ("ema", "generator", ...), generate.py's "model", or a bare state dict ->
    their generator's state dict (DDP / compile prefixes removed), or None if it is none of these."""
    if not isinstance(ckpt, dict):
        return None
    state = next((ckpt[k] for k in (("ema", "generator") if ema else ("generator", "ema")) + ("model",)
                  if isinstance(ckpt.get(k), dict)), ckpt)
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    return state if "pos_embed" in state and "y_embedder.embedding_table.weight" in state else None

def from_authors_keys(state):
    out = {}
    for k, v in state.items():
        if not k.startswith(AUTHORS_DROPPED):
            for theirs, ours in AUTHORS_KEYS:
                k = k.replace(theirs, ours)
            out["tokens" if k == "pos_embed" else k] = v
    return out

def config_from_authors(state, args=None):
    """Size, patch, classes, channels and levels from the tensors' shapes (their args are not needed)."""
    _, T, C = state["pos_embed"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = C // state["blocks.0.attn.q_norm.weight"].shape[0]
    size = next((n for n, m in gat.MODEL_SIZES.items() if (m["depth"], m["width"], m["heads"]) == (depth, C, heads)), None)
    if size is None:
        raise gat.CheckpointError(f"the authors' generator has depth {depth}, width {C}, {heads} heads: not one "
                                  f"of the sizes {list(gat.MODEL_SIZES)}")
    out = state["final_layers.0.linear.weight"].shape[0]  # patch * patch * channels
    channels = state["x_embedder.proj.weight"].shape[1] if "x_embedder.proj.weight" in state else 4
    patch = math.isqrt(out // channels)
    num_classes, z_dim = state["y_embedder.embedding_table.weight"].shape
    vae = f"stabilityai/sd-vae-ft-{getattr(args, 'vae', 'ema')}"  # their --vae: ema or mse
    levels = sum(k.startswith("final_layers.") and k.endswith(".linear.weight") for k in state)
    return gat.Config(size=size, patch=patch, z_dim=z_dim, num_levels=levels, num_classes=num_classes, channels=channels,
                      input_size=math.isqrt(T) * patch, data_kind="latent", vae=vae, data="")

def load_model(args, device):
    """(G, cfg, vae or None), every failure as a clear error before any image is made."""
    G, cfg = load_generator(args.ckpt, ema=not args.raw, device=device)
    if cfg.data_kind == "pixel":
        return G, cfg, None
    name = args.vae or cfg.vae
    if not name:
        raise gat.UserError(f"checkpoint '{args.ckpt}' names no VAE: give --vae (a folder saved with "
                         "AutoencoderKL.save_pretrained, or a hub name like stabilityai/sd-vae-ft-ema)")
    return G, cfg, gat.load_vae(name, device)

def autocast(device):
    # gat.py's default precision ("auto"), which G is trained with: bf16 autocast on GPU, fp32 on CPU
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

def decode(vae, cfg, x):
    """G's output -> images in [-1, 1]: latents decoded as the run scaled them, or the pixels themselves."""
    return x if vae is None else gat.decode_latents(vae, x, cfg.latent_scale, cfg.latent_shift, batch=len(x))

def to_uint8(x):
    """[-1, 1] float [B, 1 or 3, H, W] -> uint8 [B, H, W, 3]. Quantised as ADM and the authors' sampler do
    ((x + 1) * 127.5, clamped, truncated to an integer); grayscale pixel data gets three equal channels."""
    x = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]

def write_npz(path, shards, labels):
    """ADM sample batch (arr_0 images, arr_1 labels) written shard by shard, so that 50,000 images
    (9.8 GB at 256 px) never sit in memory at once. A fixed zip timestamp: equal samples, equal file."""
    tmp = f"{path}.tmp.{os.getpid()}"  # renamed when complete: a crash never leaves a truncated .npz at `path`
    # stored, not compressed, as np.savez (ADM's writer) does: fid.py memory-maps arr_0 only when it is stored
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, parts in (("arr_0", shards), ("arr_1", labels)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            # zipfile must be told up front that a streamed member may pass 2 GiB (arr_0: 9.8 GB at 50,000)
            with zf.open(info, "w", force_zip64=True) as f:
                shape = (sum(len(a) for a in parts), *parts[0].shape[1:])
                # np.save's header, then the raw rows: np.load reads the member as if np.savez had written it
                np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(parts[0].dtype),
                                                             fortran_order=False, shape=shape))
                for a in parts:  # 1,024 rows at a time: a whole memory-mapped shard's bytes would be GBs
                    for i in range(0, len(a), 1024):
                        f.write(np.ascontiguousarray(a[i:i + 1024]).tobytes())
    os.replace(tmp, path)

def save_png(array, path):
    from PIL import Image
    Image.fromarray(array).save(path, compress_level=1)  # lossless at any level; 1 is several times faster

def sample_fid(G, cfg, vae, args, rank, world, device):
    """--num-images images: rank r takes a contiguous run of fixed batches of global indices, writes PNGs from a
    thread pool and its images into a memory-mapped shard; rank 0 then joins the shards into the .npz."""
    classes = parse_classes(args.classes, cfg.num_classes, "random")
    N, B = args.num_images, args.batch_size
    n_batches = math.ceil(N / B)
    # whole global batches per rank: batch k always holds images kB .. kB + B - 1, so each image is computed
    # in the same batch whatever the number of ranks, and 1 or 8 ranks write the same .npz
    lo, hi = (min(N, B * (n_batches * r // world)) for r in (rank, rank + 1))
    png_dir = os.path.join(args.out, "images")
    if not args.no_png and os.path.isdir(png_dir) and os.listdir(png_dir):
        raise gat.UserError(f"{png_dir} is not empty: remove it or choose another --out (old images would "
                         "mix with the new ones in an FID over the folder)")
    shard_path, label_path = (os.path.join(args.out, f".{what}_rank{rank}.npy") for what in ("shard", "labels"))
    for path in (shard_path, label_path):
        if os.path.exists(path):  # left by a crashed run; a rank with no images now would not overwrite it
            os.remove(path)
    if world > 1:
        dist.barrier()  # every rank has checked the folder before any rank writes into it
    os.makedirs(png_dir if not args.no_png else args.out, exist_ok=True)
    shard, pending = None, deque()
    width = max(6, len(str(N - 1)))  # zero-padded: name order is index order, the order fid.py reads a folder
    from tqdm import tqdm
    bar = tqdm(total=N, unit="img", disable=rank != 0, dynamic_ncols=True, desc=f"{world} process(es)")
    t0 = time.time()
    z, y = latent_codes(args.seed, range(lo, hi), cfg.z_dim, cfg.num_classes)  # all of them now: none per batch
    if classes is not None:
        y = torch.tensor([classes[i % len(classes)] for i in range(lo, hi)], dtype=torch.long)
    with ThreadPoolExecutor(max(2, (os.cpu_count() or 2) // world)) as pool:  # the ranks here share the cores
        for start in range(lo, hi, B):
            idx, rows = range(start, min(start + B, hi)), slice(start - lo, min(start + B, hi) - lo)
            with autocast(device):
                x = decode(vae, cfg, G.generate(z[rows].to(device), y[rows].to(device), args.truncation[0],
                                             args.guidance[0]))
            images = to_uint8(x).cpu().numpy()  # the one host sync per batch
            if shard is None:  # on disk, not in RAM; made at the first batch, which tells the image shape
                shard = np.lib.format.open_memmap(shard_path, "w+", np.uint8, (hi - lo, *images.shape[1:]))
            shard[rows] = images
            if not args.no_png:
                pending.append([pool.submit(save_png, im, os.path.join(png_dir, f"{i:0{width}d}.png"))
                                for i, im in zip(idx, images)])
            while len(pending) > 4:  # bound the images waiting for the PNG writers
                [f.result() for f in pending.popleft()]
            bar.update(min(len(idx) * world, N - bar.n))  # rank 0's progress, scaled to all ranks
        for futures in pending:
            [f.result() for f in futures]
    if shard is not None:
        shard.flush()
        np.save(label_path, y.numpy())
    if world > 1:
        dist.barrier()  # every shard is on disk before rank 0 reads them
    bar.close()
    seconds = time.time() - t0
    if rank == 0:
        paths = [(s, l) for s, l in ((os.path.join(args.out, f".{w}_rank{r}.npy") for w in ("shard", "labels"))
                                     for r in range(world)) if os.path.isfile(s)]  # a rank without batches wrote none
        shards = [np.load(s, mmap_mode="r") for s, _ in paths]
        assert sum(len(s) for s in shards) == N, "the ranks' shards do not add up to --num-images"
        # ADM's name for a sample batch, samples_NxHxWx3.npz
        npz = os.path.join(args.out, f"samples_{N}x{'x'.join(map(str, shards[0].shape[1:]))}.npz")
        write_npz(npz, shards, [np.load(l) for _, l in paths])
        del shards  # closes the memory maps before their files are removed
        for path in sum(paths, ()):
            os.remove(path)
        print(f"{N} images in {seconds:.1f} s: {N / seconds:.1f} images/s on {world} process(es) "
              f"({'PNGs + ' if not args.no_png else ''}shards); npz in {time.time() - t0 - seconds:.1f} s more: "
              f"{npz}" + ("" if args.no_png else f", PNGs in {png_dir}/"))
    return seconds

def sample_grid(G, cfg, vae, args, device):
    """Rows = classes; per (truncation, guidance) pair a block of --cols columns (truncations outer),
    column j using the z of image j in every row and block, so a column shows one z across classes,
    truncations and guidance scales."""
    classes = parse_classes(args.classes, cfg.num_classes, ",".join(map(str, range(min(10, cfg.num_classes)))))
    if classes is None:
        raise gat.UserError("--grid needs class rows: give --classes as a list, or 'balanced' for all classes")
    z, _ = latent_codes(args.seed, range(args.cols), cfg.z_dim, cfg.num_classes)
    pairs = [(t, s) for t in args.truncation for s in args.guidance]
    R, T, J = len(classes), len(pairs), args.cols
    z = z.repeat(R, 1).to(device)  # [R*J, z_dim]
    y = torch.tensor(classes).repeat_interleave(J).to(device)  # [R*J]: row r is class r
    blocks = []
    for t, s in pairs:
        with autocast(device):
            blocks.append(torch.cat([decode(vae, cfg, G.generate(z[i:i + args.batch_size], y[i:i + args.batch_size], t, s))
                                     for i in range(0, len(z), args.batch_size)]))
    x = torch.stack(blocks).unflatten(1, (R, J)).transpose(0, 1)  # [R, T, J, C, H, W]
    guide = "" if args.guidance == [1.0] else f"_guid{'-'.join(f'{s:g}' for s in args.guidance)}"
    path = os.path.join(args.out, f"grid_seed{args.seed}_trunc{'-'.join(f'{t:g}' for t in args.truncation)}{guide}.png")
    os.makedirs(args.out, exist_ok=True)
    gat.save_grid(x.flatten(0, 2), T * J, path)  # [R*T*J, C, H, W]
    print(f"grid: {R} classes {classes} x {len(args.truncation)} truncation(s) {args.truncation} x "
          f"{len(args.guidance)} guidance scale(s) {args.guidance} x {J} seeds -> {path}")
    return path

def sample_interpolation(G, cfg, vae, args, device):
    """--frames images on the straight line in w between (z of image I, first class) and (z of image J,
    last class): one class and two z, or one z and two classes. Saved as a strip and as single frames."""
    classes = parse_classes(args.classes, cfg.num_classes, "0")
    if classes is None or len(classes) > 2:
        raise gat.UserError("--interpolate takes one class (between two z) or two (between two classes) in --classes")
    (i, j), t, s = args.interpolate, args.truncation[0], args.guidance[0]
    z, _ = latent_codes(args.seed, [i, j], cfg.z_dim, cfg.num_classes)
    # the line runs in w, not z: the class enters through the mapping, so only in w can the two ends differ in class
    alpha = torch.linspace(0, 1, args.frames, device=device)[:, None]  # [frames, 1]
    with autocast(device):
        w = G.style(z.to(device), torch.tensor([classes[0], classes[-1]], device=device), t, s)  # [2, C]
        x = torch.cat([decode(vae, cfg, G.synthesis(a)[-1]) for a in w[0].lerp(w[1], alpha).split(args.batch_size)])
    name = f"interp_seed{args.seed}_{i}-{j}_class{'-'.join(map(str, classes))}_trunc{t:g}" + (f"_guid{s:g}" if s != 1 else "")
    frame_dir = os.path.join(args.out, name)
    os.makedirs(frame_dir, exist_ok=True)
    gat.save_grid(x, len(x), os.path.join(args.out, name + ".png"))
    for k in range(len(x)):
        gat.save_grid(x[k:k + 1], 1, os.path.join(frame_dir, f"{k:03d}.png"))
    print(f"interpolation: {len(x)} frames -> {os.path.join(args.out, name)}.png and {frame_dir}/")
    return os.path.join(args.out, name + ".png")

class SkippedBlock(torch.nn.Module):
    """Stands in for one of G's blocks: its output is its input (both residual branches removed)."""

    def forward(self, x, *args):
        return x

def block_contributions(G, cfg, vae, args, device):
    """The MNG evidence (paper, Fig. 4): per block of G, how far the image moves when that block is skipped,
    averaged over --block-contributions N fixed (z, class) pairs. Without MNG the early blocks barely matter;
    with it they shape the coarse image. Distance: LPIPS (AlexNet) on decoded images when the lpips package
    is installed and the images are at least 32 px; else the RMS difference of G's outputs (latents or pixels)."""
    n, b = args.block_contributions, args.batch_size
    z, y = latent_codes(args.seed, range(n), cfg.z_dim, cfg.num_classes)
    side = cfg.input_size * (8 if cfg.data_kind == "latent" else 1)
    use_lpips = importlib.util.find_spec("lpips") is not None and side >= 32
    if use_lpips:
        import lpips
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    metric = "lpips_alex" if use_lpips else f"rms_{cfg.data_kind}"

    @torch.no_grad()
    def outputs():
        with autocast(device):
            x = torch.cat([G.generate(z[i:i + b].to(device), y[i:i + b].to(device), args.truncation[0], args.guidance[0])
                           for i in range(0, n, b)]).float()
        return torch.cat([decode(vae, cfg, x[i:i + b]).float() for i in range(0, n, b)]) if use_lpips else x

    @torch.no_grad()
    def distance(a, ref):
        if use_lpips:
            return torch.cat([net(a[i:i + b], ref[i:i + b]).flatten() for i in range(0, n, b)]).mean().item()
        return (a - ref).square().flatten(1).mean(1).sqrt().mean().item()

    ref, rows = outputs(), []
    for k in range(len(G.blocks)):
        block, G.blocks[k] = G.blocks[k], SkippedBlock()
        try:
            rows.append(dict(block=k + 1, distance=distance(outputs(), ref),
                             level=next(i + 1 for i, after in enumerate(G.head_after) if k <= after)))
        finally:
            G.blocks[k] = block
    result = dict(ckpt=args.ckpt, metric=metric, num_levels=len(G.heads), images=n, seed=args.seed, blocks=rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "block_contributions.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    top = max(r["distance"] for r in rows) or 1.0
    print(f"the image's change ({metric}) when one block of G is skipped, over {n} (z, class) pairs; "
          f"K = {len(G.heads)} MNG level(s)\nblock  level  distance")
    for r in rows:
        print(f"{r['block']:5d}  {r['level']:5d}  {r['distance']:8.4f}  " + "#" * round(40 * r["distance"] / top))
    print(f"-> {path}")
    return result

def main(argv=None):
    args = parse_args(argv)
    try:
        validate_args(args)
        rank, world, device = gat.setup_distributed(args)
        gat.set_tf32(device.type == "cuda")  # as in training: TF32 where the sampling is bf16 anyway
        G, cfg, vae = load_model(args, device)
        if args.grid or args.interpolate or args.block_contributions:
            if rank == 0:  # small jobs: one process does them
                mode = sample_grid if args.grid else sample_interpolation if args.interpolate else block_contributions
                mode(G, cfg, vae, args, device)
        else:
            sample_fid(G, cfg, vae, args, rank, world, device)
    except gat.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
