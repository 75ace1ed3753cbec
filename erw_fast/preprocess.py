"""Encode an image folder into SD-VAE latent shards: ``python -m erw_fast.preprocess``.

    python -m erw_fast.preprocess --images /data/imagenet/train --out /data/in256 --resolution 256
    torchrun --nproc_per_node 8 -m erw_fast.preprocess --images ... --out ...      # multi-GPU

Input: one sub-folder per class (ImageNet layout; classes are the sorted sub-folder names, label =
position), or ``--from-repa DIR`` to convert REPA's preprocessed layout (``images/`` + ``vae-sd/``)
into shards without re-encoding. Each image is ADM-centre-cropped to ``--resolution`` (BOX halving
while the short side is >= 2× the target, BICUBIC resize, centre crop), encoded with diffusers'
``AutoencoderKL`` (``--vae``: a local folder or a hub id, default ``stabilityai/sd-vae-ft-mse``), and
stored as posterior mean ‖ std (fp16), label and the cropped uint8 image, in fixed-size shards (see
``erw_fast/data/latents.py`` for the format).

Resumable: a finished shard (its ``.json`` marker written last, files complete) is kept and
skipped on a rerun with the same ``--out``; a partial one is redone. With ``torchrun`` every rank
encodes shards ``k ≡ rank (mod world)`` and rank 0 writes ``index.json`` when all are done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

import numpy as np
import torch

from .data.latents import (FORMAT, IMAGE_EXTS, SD_VAE_SCALE, VERSION, CorruptShardError, LatentDataError,
                           RepaLayout, check_npy, shard_stem)

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DATA_EXTRA = "pip install 'erw_fast[data]'  (diffusers, transformers, safetensors, pillow)"


class PreprocessError(ValueError):
    pass


class ImageTooSmallError(PreprocessError):
    pass


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"preprocessing needs Pillow: {DATA_EXTRA}") from e
    return Image


def adm_center_crop(image, resolution: int, allow_upscale: bool = False, name: str = "image") -> np.ndarray:
    """ADM's centre crop of a PIL image to ``resolution``² → uint8 (H, W, 3).

    Halve with BOX filtering while the short side is at least twice the target (cheap anti-aliasing),
    then one BICUBIC resize making the short side exactly ``resolution``, then the centre square."""
    Image = _pil()
    image = image.convert("RGB")
    w, h = image.size
    if min(w, h) < resolution and not allow_upscale:
        raise ImageTooSmallError(
            f"{name} is {w}x{h}, smaller than the {resolution}-px crop; pass --small-images upscale to upscale "
            "such images (as ADM/REPA do), or remove it")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    new = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
    image = image.resize(new, resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.array(arr[top:top + resolution, left:left + resolution], dtype=np.uint8, order="C")


def list_image_folder(images: str) -> Tuple[List[str], List[int], List[str]]:
    """(relative file paths, labels, class names) of an ImageNet-layout folder, sorted."""
    if not os.path.isdir(images):
        raise PreprocessError(f"--images {images!r} is not a folder")
    classes = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    if not classes:
        raise PreprocessError(f"--images {images!r} has no class sub-folders; expected one sub-folder per class "
                              "(ImageNet layout: DIR/<class>/<image>.JPEG)")
    files, labels = [], []
    for c, name in enumerate(classes):
        base = os.path.join(images, name)
        found = []
        for dirpath, _d, fns in os.walk(base):
            for fn in fns:
                if fn.lower().endswith(IMAGE_EXTS):
                    found.append(os.path.relpath(os.path.join(dirpath, fn), images).replace(os.sep, "/"))
        found.sort()
        files += found
        labels += [c] * len(found)
    if not files:
        raise PreprocessError(f"no images ({', '.join(IMAGE_EXTS)}) under {images!r}")
    return files, labels, classes


class _CropDataset(torch.utils.data.Dataset):
    def __init__(self, root, files, resolution, allow_upscale):
        self.root, self.files, self.resolution, self.allow_upscale = root, files, resolution, allow_upscale

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        Image = _pil()
        path = os.path.join(self.root, self.files[i])
        try:
            with Image.open(path) as im:
                arr = adm_center_crop(im, self.resolution, self.allow_upscale, name=path)
        except ImageTooSmallError:
            raise
        except Exception as e:
            raise PreprocessError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "ERW_FAST_OFFLINE"))


def load_vae(path_or_id: str = DEFAULT_VAE, device="cpu", dtype=torch.float32):
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"preprocessing needs diffusers for the SD-VAE: {DATA_EXTRA}") from e
    local = os.path.isdir(path_or_id)
    if not local and path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--vae {path_or_id!r}: no such folder; pass a diffusers AutoencoderKL folder "
                                f"(e.g. from `huggingface-cli download {DEFAULT_VAE} --local-dir DIR`) or a hub id")
    if local and not os.path.isfile(os.path.join(path_or_id, "config.json")):
        raise FileNotFoundError(f"--vae {path_or_id!r} has no config.json; pass a folder written by "
                                "AutoencoderKL.save_pretrained (or downloaded with huggingface-cli)")
    errors = []
    tries = (True,) if (local or _offline()) else (True, False)
    for local_only in tries:
        try:
            vae = AutoencoderKL.from_pretrained(path_or_id, local_files_only=local_only, torch_dtype=dtype)
            break
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        raise FileNotFoundError(
            f"could not load the VAE {path_or_id!r} ({'offline: ' if _offline() else ''}{'; '.join(errors)}). "
            f"Provide it with --vae DIR (a diffusers folder, e.g. `huggingface-cli download {DEFAULT_VAE} "
            "--local-dir DIR` on a machine with internet) or put it in the Hugging Face cache (HF_HOME)")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → posterior mean ‖ std (B, 2C, H/f, W/f) float32."""
    p = next(vae.parameters())
    x = images_uint8.to(p.device, p.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def shard_done(out: str, k: int, n: int, settings: dict) -> bool:
    """Whether shard ``k`` is finished (marker present and matching, files complete)."""
    stem = shard_stem(out, k)
    try:
        with open(stem + ".json") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    for key, v in settings.items():
        if marker.get(key) != v:
            raise PreprocessError(
                f"{stem}.json was written with {key}={marker.get(key)!r}, this run has {key}={v!r}: {out} holds "
                "shards made with other settings; use another --out (or delete that folder)")
    if int(marker.get("count", -1)) != n:
        return False
    try:
        for field in ("moments", "labels", "images"):
            shape, _ = check_npy(f"{stem}.{field}.npy")
            if shape[0] != n:
                return False
    except CorruptShardError:
        return False
    return True


def _remove_shard(out: str, k: int):
    stem = shard_stem(out, k)
    for suffix in (".json", ".moments.npy", ".labels.npy", ".images.npy", ".moments.npy.tmp",
                   ".labels.npy.tmp", ".images.npy.tmp", ".json.tmp"):
        if os.path.exists(stem + suffix):
            os.remove(stem + suffix)


class ShardWriter:
    """Write one shard: memory-mapped ``.tmp`` files filled in place, renamed when complete, and the
    ``.json`` marker written last (so an interrupted shard has no marker and is redone)."""

    def __init__(self, out: str, k: int, n: int, moments_shape, image_shape):
        self.out, self.k, self.n = out, k, n
        self.stem = shard_stem(out, k)
        _remove_shard(out, k)
        fmt = np.lib.format
        self.arrays = {
            "moments": fmt.open_memmap(self.stem + ".moments.npy.tmp", "w+", np.float16, (n,) + tuple(moments_shape)),
            "labels": fmt.open_memmap(self.stem + ".labels.npy.tmp", "w+", np.int64, (n,)),
            "images": fmt.open_memmap(self.stem + ".images.npy.tmp", "w+", np.uint8, (n,) + tuple(image_shape)),
        }

    def write(self, start: int, moments: np.ndarray, labels: np.ndarray, images: np.ndarray):
        b = len(labels)
        self.arrays["moments"][start:start + b] = moments.astype(np.float16)
        self.arrays["labels"][start:start + b] = labels
        self.arrays["images"][start:start + b] = images

    def finish(self, marker: dict):
        for field, arr in self.arrays.items():
            arr.flush()
            del arr
        self.arrays = {}
        for field in ("moments", "labels", "images"):
            os.replace(f"{self.stem}.{field}.npy.tmp", f"{self.stem}.{field}.npy")
        tmp = self.stem + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(marker, f)
        os.replace(tmp, self.stem + ".json")


def _dist_setup():
    """(rank, world, device) from torchrun's environment. No process group is needed: ranks share
    nothing but the output folder (each writes its own shards; rank 0 waits for the others' markers)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return rank, world, dev


def wait_for(done, what: str, timeout_s: float = 7 * 24 * 3600.0, poll_s: float = 5.0):
    """Poll ``done()`` until it is true (rank 0 waiting for the other ranks' shards)."""
    import time

    t0 = time.time()
    while not done():
        if time.time() - t0 > timeout_s:
            raise PreprocessError(f"timed out waiting for {what}; rerun the same command to finish")
        time.sleep(poll_s)


def write_index(out: str, total: int, shard_size: int, settings: dict, extra: dict):
    shards = []
    for k in range((total + shard_size - 1) // shard_size):
        n = min(shard_size, total - k * shard_size)
        if not shard_done(out, k, n, settings):
            raise PreprocessError(f"shard {shard_stem(out, k)} is missing or incomplete; rerun the same command "
                                  "to finish it")
        shards.append({"name": os.path.basename(shard_stem(out, k)), "count": n})
    index = {"format": FORMAT, "version": VERSION, "count": total, "shard_size": shard_size, "shards": shards,
             **settings, **extra}
    tmp = os.path.join(out, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out, "index.json"))
    return index


def preprocess(images: Optional[str] = None, out: str = "", resolution: int = 256, vae: str = DEFAULT_VAE,
               batch_size: int = 64, shard_size: int = 10_000, workers: int = 4, small_images: str = "error",
               vae_dtype: str = "fp32", from_repa: Optional[str] = None, progress: bool = True,
               device=None, _stop_after_shards: Optional[int] = None) -> Optional[dict]:
    """Run preprocessing (see the module doc); returns the index (rank 0) or None."""
    from .utils.progress import progress as progress_bar

    if not out:
        raise PreprocessError("--out is required")
    if (images is None) == (from_repa is None):
        raise PreprocessError("give exactly one of --images DIR (class sub-folders) or --from-repa DIR")
    if small_images not in ("error", "upscale"):
        raise PreprocessError(f"--small-images {small_images!r}: use 'error' or 'upscale'")
    rank, world, dev = _dist_setup()
    if device is not None:
        dev = torch.device(device)
    os.makedirs(out, exist_ok=True)

    if from_repa is not None:
        src = RepaLayout(from_repa)
        total = len(src)
        labels_all = src.labels
        classes = [str(c) for c in range(src.num_classes)]
        files = src.feature_files
        moments_shape, image_shape = tuple(src.moments_shape), tuple(src.image_shape)
        resolution = int(image_shape[-1])
        settings = dict(resolution=resolution, vae="repa:" + os.path.abspath(from_repa), shard_size=shard_size,
                        num_classes=int(src.num_classes), moments_shape=list(moments_shape),
                        image_shape=list(image_shape), scale=SD_VAE_SCALE)
        model = None
    else:
        files, labels_all, classes = list_image_folder(images)
        total = len(files)
        labels_all = np.asarray(labels_all, np.int64)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[vae_dtype]
        model = load_vae(vae, dev, dtype)
        with torch.no_grad():
            probe = encode_moments(model, torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8))
        moments_shape, image_shape = tuple(probe.shape[1:]), (3, resolution, resolution)
        settings = dict(resolution=resolution, vae=vae, shard_size=shard_size, num_classes=len(classes),
                        moments_shape=list(moments_shape), image_shape=list(image_shape), scale=SD_VAE_SCALE)
    settings["total"] = total
    num_shards = (total + shard_size - 1) // shard_size
    mine = [k for k in range(num_shards) if k % world == rank]
    sizes = {k: min(shard_size, total - k * shard_size) for k in mine}
    todo = [k for k in mine if not shard_done(out, k, sizes[k], settings)]
    skipped = len(mine) - len(todo)
    if rank == 0 and progress:
        print(f"preprocess: {total} images, {len(classes)} classes, {num_shards} shards of {shard_size}; "
              f"{skipped} already finished on this rank, {len(todo)} to do", file=sys.stderr)
    bar = progress_bar(total=sum(sizes[k] for k in todo), desc=f"encode[{rank}]", unit="img",
                       disable=not progress or rank != 0)
    done_now = 0
    for k in todo:
        n = sizes[k]
        lo = k * shard_size
        writer = ShardWriter(out, k, n, moments_shape, image_shape)
        pos = 0
        if from_repa is not None:
            for s in range(0, n, batch_size):
                ids = np.arange(lo + s, lo + min(s + batch_size, n))
                writer.write(s, src.moments(ids), labels_all[ids], src.images(ids))
                bar.update(len(ids))
        else:
            ds = _CropDataset(images, files[lo:lo + n], resolution, small_images == "upscale")
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                                 pin_memory=dev.type == "cuda")
            for imgs in loader:
                mom = encode_moments(model, imgs).cpu().numpy()
                if not np.isfinite(mom).all():
                    raise PreprocessError(f"the VAE produced non-finite moments in shard {k} (images "
                                          f"{files[lo + pos]} ...); try --vae-dtype fp32")
                b = len(imgs)
                writer.write(pos, mom, labels_all[lo + pos:lo + pos + b], imgs.numpy())
                pos += b
                bar.update(b)
        writer.finish({**settings, "shard": k, "count": n, "first": lo})
        done_now += 1
        if _stop_after_shards is not None and done_now >= _stop_after_shards:
            bar.close()
            return None
    bar.close()
    if rank != 0:
        return None
    if world > 1:
        wait_for(lambda: all(shard_done(out, k, min(shard_size, total - k * shard_size), settings)
                             for k in range(num_shards)), f"the other ranks' shards in {out}")
    with open(os.path.join(out, "files.txt.tmp"), "w") as f:
        f.write("\n".join(files) + "\n")
    os.replace(os.path.join(out, "files.txt.tmp"), os.path.join(out, "files.txt"))
    index = write_index(out, total, shard_size, settings,
                        dict(classes=classes, source=os.path.abspath(images or from_repa)))
    if progress:
        print(f"preprocess: wrote {out}/index.json ({total} samples, latents {moments_shape[0] // 2}x"
              f"{moments_shape[1]}x{moments_shape[2]}, images {image_shape[1]}px)", file=sys.stderr)
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="image folder with one sub-folder per class (ImageNet train layout)")
    p.add_argument("--from-repa", metavar="DIR", help="instead of --images: convert REPA's preprocessed layout "
                   "(DIR/images + DIR/vae-sd + dataset.json) to shards, no VAE needed")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--resolution", type=int, default=256, help="crop size: 256 or 512 (default 256)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"diffusers AutoencoderKL: a local folder or a hub id "
                   f"(default {DEFAULT_VAE}; hub ids need the HF cache or internet)")
    p.add_argument("--vae-dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="VAE compute dtype")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward, per process (default 64)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    p.add_argument("--workers", type=int, default=4, help="image-decoding workers per process (default 4)")
    p.add_argument("--small-images", default="error", choices=("error", "upscale"),
                   help="images smaller than the crop: stop with an error naming the file (default), or upscale "
                   "them (ADM/REPA behaviour)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present; the local "
                   "rank's GPU under torchrun)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preprocess(images=args.images, out=args.out, resolution=args.resolution, vae=args.vae,
                   batch_size=args.batch_size, shard_size=args.shard_size, workers=args.workers,
                   small_images=args.small_images, vae_dtype=args.vae_dtype, from_repa=args.from_repa,
                   progress=args.progress, device=args.device)
    except (ImportError, FileNotFoundError, LatentDataError, PreprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
