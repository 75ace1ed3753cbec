"""Encode an image folder (or convert REPA's layout) into SD-VAE latent shards: ``preprocess(...)``.

Input: one sub-folder per class (ImageNet layout; classes are the sorted sub-folder names, label =
position), or ``from_repa`` to convert REPA's preprocessed layout (``images/`` + ``vae-sd/``) into
shards without re-encoding. Each image is ADM-centre-cropped to ``resolution`` (BOX halving while
the short side is >= 2× the target, BICUBIC resize, centre crop), encoded with the SD-VAE
(``vae.py``), and stored as posterior mean ‖ std (fp16), label and the cropped uint8 image, in
fixed-size shards (the format: ``shards.py``).

Resumable: a finished shard is kept and skipped on a rerun with the same ``out``; a partial one is
redone. With ``torchrun`` every rank encodes shards ``k ≡ rank (mod world)`` and rank 0 writes
``index.json`` when all are done.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..utils.cli import check_positive, check_writable
from ..utils.distributed import setup_distributed
from .shards import (IMAGE_EXTS, PreprocessError, RepaLayout, latent_shard_done, latent_shard_writer,
                     shard_sizes, source_identity, wait_for, write_index)
from .vae import DATA_EXTRA, DEFAULT_VAE, SD_VAE_SCALE, encode_moments, load_vae

VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def list_image_folder(images: str, verbose: bool = True) -> Tuple[List[str], List[int], List[str]]:
    """(relative file paths, labels, class names) of an ImageNet-layout folder, sorted (the listing of
    ``imagefolder.scan_class_folders``: every entry not used is named in a note on stderr)."""
    from .imagefolder import scan_class_folders

    if not os.path.isdir(images):
        raise PreprocessError(f"--images {images!r} is not a folder")
    files, labels, classes, notes, _ = scan_class_folders(images, f"--images {images}")
    if not classes:
        raise PreprocessError(f"--images {images!r} has no class sub-folders; expected one sub-folder per class "
                              "(ImageNet layout: DIR/<class>/<image>.JPEG)")
    if not files:
        raise PreprocessError(f"no images ({', '.join(IMAGE_EXTS)}) under {images!r}")
    empty = [c for i, c in enumerate(classes) if i not in set(labels)]
    if empty:
        notes.append(f"{len(empty)} class folder(s) hold no images (their labels get no samples): "
                     f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: --images {images}: {note}", file=sys.stderr)
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
# Sources: what goes into the shards
# --------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """The samples to store: file names, labels, class names, per-sample shapes, the settings every
    shard marker records, and ``fill(writer, k, lo, n, bar)`` writing samples ``[lo, lo + n)``."""
    files: List[str]
    labels: np.ndarray
    classes: List[str]
    moments_shape: tuple
    image_shape: tuple
    settings: dict
    fill: Callable
    origin: str


def _repa_source(from_repa: str, shard_size: int, batch_size: int) -> _Source:
    src = RepaLayout(from_repa)
    moments_shape, image_shape = tuple(src.moments_shape), tuple(src.image_shape)
    settings = dict(resolution=int(image_shape[-1]), vae="repa:" + os.path.abspath(from_repa), shard_size=shard_size,
                    num_classes=int(src.num_classes), moments_shape=list(moments_shape),
                    image_shape=list(image_shape), scale=SD_VAE_SCALE,
                    source_id=source_identity(src.features_dir, src.feature_files))
    labels = src.labels

    def fill(writer, k, lo, n, bar):
        for s in range(0, n, batch_size):
            ids = np.arange(lo + s, lo + min(s + batch_size, n))
            writer.write(s, {"moments": src.moments(ids), "labels": labels[ids], "images": src.images(ids)})
            bar.update(len(ids))

    return _Source(src.feature_files, labels, [str(c) for c in range(src.num_classes)], moments_shape, image_shape,
                   settings, fill, from_repa)


def _image_source(images: str, resolution: int, vae: str, vae_dtype: str, batch_size: int, shard_size: int,
                  workers: int, allow_upscale: bool, dev) -> _Source:
    files, labels, classes = list_image_folder(images)
    labels = np.asarray(labels, np.int64)
    model = load_vae(vae, dev, VAE_DTYPES[vae_dtype])
    with torch.no_grad():
        probe = encode_moments(model, torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8))
    moments_shape, image_shape = tuple(probe.shape[1:]), (3, resolution, resolution)
    settings = dict(resolution=resolution, vae=vae, shard_size=shard_size, num_classes=len(classes),
                    moments_shape=list(moments_shape), image_shape=list(image_shape), scale=SD_VAE_SCALE,
                    source_id=source_identity(images, files))

    def fill(writer, k, lo, n, bar):
        ds = _CropDataset(images, files[lo:lo + n], resolution, allow_upscale)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             pin_memory=dev.type == "cuda")
        pos = 0
        for imgs in loader:
            mom = encode_moments(model, imgs).cpu().numpy()
            if not np.isfinite(mom).all():
                raise PreprocessError(f"the VAE produced non-finite moments in shard {k} (images "
                                      f"{files[lo + pos]} ...); try --vae-dtype fp32")
            b = len(imgs)
            writer.write(pos, {"moments": mom, "labels": labels[lo + pos:lo + pos + b], "images": imgs.numpy()})
            pos += b
            bar.update(b)

    return _Source(files, labels, classes, moments_shape, image_shape, settings, fill, images)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _finish(out: str, source: _Source, total: int, shard_size: int, world: int, progress: bool) -> dict:
    """Rank 0: wait for every shard, write ``files.txt`` and ``index.json``."""
    settings = source.settings
    if world > 1:
        wait_for(lambda: all(latent_shard_done(out, k, n, settings)
                             for k, n in enumerate(shard_sizes(total, shard_size))),
                 f"the other ranks' shards in {out}")
    with open(os.path.join(out, "files.txt.tmp"), "w") as f:
        f.write("\n".join(source.files) + "\n")
    os.replace(os.path.join(out, "files.txt.tmp"), os.path.join(out, "files.txt"))
    index = write_index(out, total, shard_size, settings,
                        dict(classes=source.classes, source=os.path.abspath(source.origin)))
    if progress:
        m, i = source.moments_shape, source.image_shape
        print(f"preprocess: wrote {out}/index.json ({total} samples, latents {m[0] // 2}x{m[1]}x{m[2]}, "
              f"images {i[1]}px)", file=sys.stderr)
    return index


def preprocess(images: Optional[str] = None, out: str = "", resolution: int = 256, vae: str = DEFAULT_VAE,
               batch_size: int = 64, shard_size: int = 10_000, workers: int = 4, small_images: str = "error",
               vae_dtype: str = "fp32", from_repa: Optional[str] = None, progress: bool = True,
               device=None, _stop_after_shards: Optional[int] = None) -> Optional[dict]:
    """Run preprocessing (see the module doc); returns the index (rank 0) or None."""
    from ..utils.progress import progress as progress_bar

    if not out:
        raise PreprocessError("--out is required")
    if (images is None) == (from_repa is None):
        raise PreprocessError("give exactly one of --images DIR (class sub-folders) or --from-repa DIR")
    if small_images not in ("error", "upscale"):
        raise PreprocessError(f"--small-images {small_images!r}: use 'error' or 'upscale'")
    check_positive(batch_size=batch_size, shard_size=shard_size, resolution=resolution)
    if workers < 0:
        raise PreprocessError(f"--workers must be >= 0 (0: decode in the main process), got {workers}")
    if images is not None and resolution % 8:
        raise PreprocessError(f"--resolution {resolution}: the SD-VAE downsamples by 8; use a multiple of 8 (256, 512)")
    check_writable(out, "--out", folder=True)  # before the VAE is loaded and any image is read
    d = setup_distributed("auto", process_group=False)
    rank, world, dev = d.rank, d.world, (torch.device(device) if device is not None else d.device)
    if from_repa is not None:  # the sources check their inputs: nothing is written before that
        source = _repa_source(from_repa, shard_size, batch_size)
    else:
        source = _image_source(images, resolution, vae, vae_dtype, batch_size, shard_size, workers,
                               small_images == "upscale", dev)
    os.makedirs(out, exist_ok=True)
    total = len(source.files)
    source.settings["total"] = total
    sizes = shard_sizes(total, shard_size)
    mine = [k for k in range(len(sizes)) if k % world == rank]
    todo = [k for k in mine if not latent_shard_done(out, k, sizes[k], source.settings)]
    if rank == 0 and progress:
        print(f"preprocess: {total} images, {len(source.classes)} classes, {len(sizes)} shards of {shard_size}; "
              f"{len(mine) - len(todo)} already finished on this rank, {len(todo)} to do", file=sys.stderr)
    bar = progress_bar(total=sum(sizes[k] for k in todo), desc=f"encode[{rank}]", unit="img",
                       disable=not progress or rank != 0)
    for done_now, k in enumerate(todo, 1):
        writer = latent_shard_writer(out, k, sizes[k], source.moments_shape, source.image_shape)
        source.fill(writer, k, k * shard_size, sizes[k], bar)
        writer.finish({**source.settings, "shard": k, "count": sizes[k], "first": k * shard_size})
        if _stop_after_shards is not None and done_now >= _stop_after_shards:
            bar.close()
            return None
    bar.close()
    if rank != 0:
        return None
    return _finish(out, source, total, shard_size, world, progress)
