"""Bring your own images: a folder of class sub-folders as pixel-space training data.

``--data imagefolder:DIR`` (or ``--data DIR`` when DIR holds class sub-folders and is not a latent
dataset: no ``index.json``, ``shard-*`` files or ``vae-sd/``) reads::

    DIR/<class>/**/<image>.{png,jpg,jpeg,bmp,webp,tif,tiff}

- Labels: the sorted sub-folder names (plain string order), label = position; ``class_names``
  holds them and the engine records them in ``config.json`` and every checkpoint's ``args``.
  Files are sorted by path within a class; the dataset index is the position in that order, the
  same on every machine. Nothing is skipped silently: names starting with ``.`` (``.DS_Store``,
  macOS ``._x.jpg``), files of other types (a GIF beside PNGs, a README), entries beside the class
  folders and symlinked folders inside a class folder are not used, and a note names them; a
  symlinked class folder whose target is missing is refused (it would shift the labels); an
  animated image contributes its first frame, with a note.
- Each image: decoded with Pillow, EXIF orientation applied, 16-bit grey scaled to 8 bits, then
  ADM's centre crop to ``resolution``² (BOX halving while the short side is >= 2x the target, one
  BICUBIC resize of the short side to the target, the centre square). Images smaller than the
  resolution are upscaled by that resize (a note says how many). Alpha is dropped.
- Channels: all images of a dataset get one channel count, the majority's: grey files (modes 1, L,
  LA, I, I;16, F) vs colour (everything else); a tie goes to RGB. The minority is converted (RGB →
  L with Pillow's ITU-R 601-2 luma; grey → RGB by repetition) and a note says how many.
- All images are held in host memory as uint8 (N x C x R x R bytes: 3,000 RGB images at 64 px are
  37 MB); a batch is an index into them, returned on the host (the engine pins it and copies it to
  the device without a sync, as for the digits). Model input: pixels in [-1, 1], like the digits. The target encoder reads uint8 RGB (B, 3, R, R) (grey repeated to three channels),
  which DINOv2 resizes itself so that its patch grid equals the SiT token grid.
- ``hflip``: each training sample is mirrored left-right when bit 0 of ``mix_seed(seed,
  STREAM_HFLIP, step, sample id)`` is 1 — the same per-(seed, step, sample index) convention as
  every other draw, so it does not depend on the number of processes.

Bad input raises ``ImageFolderError`` (a ``ValueError``) naming the folder, the file or the flag,
before a run folder exists: a missing or empty folder, no class sub-folders, a class folder without
images, a class with a single image, ``--resolution`` below 8 (the training config also asks for a
multiple of the model's patch size), and unreadable or truncated
images — all of those are listed in one error rather than skipped, since skipping would silently
change the class balance and the sample order of a run.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.seeding import STREAM_HFLIP, mix_seed
from .shards import IMAGE_EXTS

PREFIX = "imagefolder:"
MIN_RESOLUTION = 8          # the training config also asks for a multiple of the model's patch size
DEFAULT_RESOLUTION = 32
MIN_IMAGES_PER_CLASS = 2
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
LATENT_MARKERS = ("index.json", "vae-sd")  # what makes a folder a latent dataset (shards.open_latents)
MAX_LISTED = 5              # bad files named in one error


class ImageFolderError(ValueError):
    """An image folder cannot be used as training data (the message names the folder, file or flag)."""


# --------------------------------------------------------------------------------------------
# Which --data values are image folders
# --------------------------------------------------------------------------------------------
def is_latent_folder(path: str) -> bool:
    """A latent dataset (``python -m erw_fast.preprocess`` shards, finished or not, or REPA's layout)."""
    if not os.path.isdir(path):
        return False
    if any(os.path.exists(os.path.join(path, m)) for m in LATENT_MARKERS):
        return True
    return any(n.startswith("shard-") for n in os.listdir(path))


def image_folder_path(spec: str) -> Optional[str]:
    """The folder of an image-folder ``--data`` value, else None: ``imagefolder:DIR`` → DIR (checked
    when loaded); a plain DIR that is not a latent dataset and holds sub-folders or image files → DIR."""
    if not isinstance(spec, str):
        return None
    if spec.startswith(PREFIX):
        return os.path.expanduser(spec[len(PREFIX):])
    if not os.path.isdir(spec) or is_latent_folder(spec):
        return None
    for name in os.listdir(spec):
        if name.startswith("."):
            continue
        if os.path.isdir(os.path.join(spec, name)) or name.lower().endswith(IMAGE_EXTS):
            return spec
    return None


def _flag(root: str) -> str:
    return f"--data imagefolder:{root}"


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------
def _listed(paths: Sequence[str]) -> str:
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return ", ".join(paths[:MAX_LISTED]) + more


def _images_under(base: str, root: str, unused: dict) -> List[str]:
    """Image files under class folder ``base`` (relative to ``root``); every other entry is recorded
    in ``unused`` by reason (hidden, other file types, symlinked folders that are not followed)."""
    found = []
    rel = lambda *p: os.path.relpath(os.path.join(*p), root).replace(os.sep, "/")  # noqa: E731
    for dirpath, dirnames, files in os.walk(base):
        for d in sorted(dirnames):
            if d.startswith("."):
                unused["hidden"].append(rel(dirpath, d) + "/")
            elif os.path.islink(os.path.join(dirpath, d)):
                unused["linked folder"].append(rel(dirpath, d) + "/")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in files:
            if fn.startswith("."):
                unused["hidden"].append(rel(dirpath, fn))
            elif fn.lower().endswith(IMAGE_EXTS):
                found.append(rel(dirpath, fn))
            elif os.path.islink(os.path.join(dirpath, fn)) and not os.path.exists(os.path.join(dirpath, fn)):
                unused["dangling"].append(rel(dirpath, fn))
            else:
                unused["type"].append(rel(dirpath, fn))
    return sorted(found)


_UNUSED_WHY = {
    "top": "beside the class folders (only sub-folders are classes)",
    "dangling": "symlinks to something that does not exist",
    "type": f"not of a type read here ({', '.join(IMAGE_EXTS)}; e.g. GIF is not)",
    "linked folder": "symlinked folders inside a class folder (not followed)",
    "hidden": "hidden (names starting with '.')",
}


def scan_class_folders(root: str, flag: str):
    """(relative image paths, labels, class names, notes) of ``root``'s class sub-folders in the
    dataset's order; every entry that is not used is named in a note (by reason). The one listing of
    an image folder: training (``--data imagefolder:DIR``) and ``preprocess --images`` both read it."""
    if not os.path.isdir(root):
        raise ImageFolderError(f"{flag}: {root!r} is not a folder")
    unused = {k: [] for k in _UNUSED_WHY}
    classes = []
    for n in sorted(os.listdir(root)):
        path = os.path.join(root, n)
        if n.startswith("."):
            unused["hidden"].append(n)
        elif os.path.isdir(path):
            classes.append(n)
        elif os.path.islink(path) and not os.path.exists(path):
            raise ImageFolderError(f"{flag}: {path} is a symlink to {os.readlink(path)}, which does not exist; a "
                                   "class folder that cannot be read would shift every label after it: fix or "
                                   "remove the link")
        else:
            unused["top"].append(n)
    files, labels = [], []
    for c, name in enumerate(classes):
        found = _images_under(os.path.join(root, name), root, unused)
        files += found
        labels += [c] * len(found)
    notes = [f"{len(v)} entr{'y' if len(v) == 1 else 'ies'} not used, {_UNUSED_WHY[k]}: {_listed(v)}"
             for k, v in unused.items() if v]
    return files, labels, classes, notes, unused


def list_classes(root: str) -> Tuple[List[str], List[int], List[str], List[str]]:
    """(relative file paths, labels, class names, notes on the entries not used) of ``root``, in the
    dataset's order; every layout problem is an ``ImageFolderError``."""
    files, labels, classes, notes, unused = scan_class_folders(root, _flag(root))
    if not classes and not unused["top"]:
        raise ImageFolderError(f"{_flag(root)}: the folder is empty; put each class's images in its own "
                               f"sub-folder, {root}/<class>/<image>.png (labels: the sorted sub-folder names)")
    if not classes:
        loose = sum(n.lower().endswith(IMAGE_EXTS) for n in unused["top"])
        what = f"it holds {loose} image(s) directly" if loose else "and no images"
        raise ImageFolderError(f"{_flag(root)}: no class sub-folders ({what}); put each class's images in its "
                               f"own sub-folder, {root}/<class>/<image>.png (one sub-folder is one class)")
    for c, name in enumerate(classes):
        found = [f for f, lab in zip(files, labels) if lab == c]
        if not found:
            raise ImageFolderError(f"{_flag(root)}: class folder {os.path.join(root, name)} holds no images "
                                   f"({', '.join(IMAGE_EXTS)}); add images or remove the folder")
        if len(found) < MIN_IMAGES_PER_CLASS:
            raise ImageFolderError(
                f"{_flag(root)}: class {name!r} has only {len(found)} image ({os.path.join(root, found[0])}); "
                f"each class needs at least {MIN_IMAGES_PER_CLASS} (a single image is memorised, not learned, "
                "and its samples cannot be judged); add images or remove the folder")
    return files, labels, classes, notes


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def _pil():
    from PIL import Image, ImageOps

    return Image, ImageOps


def _to_8bit(im):
    """A Pillow image in mode L (grey input, 16-bit and float scaled to 0..255) or RGB."""
    Image, _ = _pil()
    if im.mode in ("1", "L", "LA"):
        return im.convert("L")
    if im.mode in GREY_MODES:  # I;16*, I, F: Pillow's own convert("L") would clip at 255
        a = np.asarray(im).astype(np.float64)
        top = a.max(initial=0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and top > 255):
            peak = 65535.0
        else:
            peak = 1.0 if im.mode == "F" and top <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def center_crop(im, resolution: int):
    """ADM's centre crop of a mode-L or RGB Pillow image to ``resolution``² (upscaling small ones)."""
    Image, _ = _pil()
    while min(im.size) >= 2 * resolution:
        im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.size[0] * scale)), max(resolution, round(im.size[1] * scale))),
                   resample=Image.BICUBIC)
    left, top = (im.size[0] - resolution) // 2, (im.size[1] - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def read_image(path: str, resolution: int):
    """(uint8 (R, R) or (R, R, 3), grey file?, original (w, h), frames) of one file; raises what Pillow
    raises. A multi-frame file (animated PNG/WebP, multi-page TIFF) gives its first frame."""
    Image, ImageOps = _pil()
    with Image.open(path) as im:
        frames = int(getattr(im, "n_frames", 1) or 1)
        im.load()  # decode now: a truncated file fails here, not later
        grey = im.mode in GREY_MODES
        size = im.size
        im = ImageOps.exif_transpose(im)
        out = np.asarray(center_crop(_to_8bit(im), resolution), dtype=np.uint8)
    return out, grey, size, frames


def _read_all(root: str, files: Sequence[str], resolution: int, workers: int):
    def one(rel):
        path = os.path.join(root, rel)
        try:
            return read_image(path, resolution), None
        except Exception as e:  # noqa: BLE001 - every failure is reported with its file
            why = (str(e).strip().splitlines() or [""])[0][:120]
            return None, f"{path} ({type(e).__name__}{': ' + why if why else ''})"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, files))  # map keeps the order: the result does not depend on workers
    bad = [err for _, err in results if err is not None]
    if bad:
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ImageFolderError(
            f"{_flag(root)}: {len(bad)} image(s) cannot be read: {'; '.join(bad[:MAX_LISTED])}{more}. Fix or remove "
            "them (none is skipped: skipping would change the classes' balance and the sample order)")
    return [r for r, _ in results]


def _unify_channels(results):
    """(uint8 (N, C, R, R), C, notes): the majority's channel count for every image."""
    Image, _ = _pil()
    n_grey = sum(r[1] for r in results)
    channels = 1 if n_grey * 2 > len(results) else 3
    arrays = []
    for arr, *_ in results:
        if channels == 1 and arr.ndim == 3:
            arr = np.asarray(Image.fromarray(arr, "RGB").convert("L"))
        elif channels == 3 and arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    notes = []
    minority = len(results) - n_grey if channels == 1 else n_grey
    if minority:
        notes.append(f"{minority} of {len(results)} images are {'colour' if channels == 1 else 'grey'}; converted "
                     f"to {'grey (L)' if channels == 1 else 'RGB'}, the majority's mode (the dataset has "
                     f"{channels} channel{'s' if channels == 3 else ''})")
    return torch.from_numpy(np.stack(arrays)), channels, notes


def load_image_folder(root: str, resolution: int = DEFAULT_RESOLUTION, workers: Optional[int] = None):
    """``(images uint8 (N, C, R, R), labels int64 (N,), class names, files, notes)`` of ``root``."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise ImageFolderError(f"--resolution {resolution}: use a whole number of pixels >= {MIN_RESOLUTION} "
                               f"(image-folder data)")
    files, labels, classes, unused_notes = list_classes(root)
    results = _read_all(root, files, resolution, workers or min(8, os.cpu_count() or 1))
    images, channels, notes = _unify_channels(results)
    notes = unused_notes + notes
    animated = [f for f, (_, _, _, frames) in zip(files, results) if frames > 1]
    if animated:
        notes.append(f"{len(animated)} image(s) have several frames (animated); the first frame is used: "
                     f"{_listed(animated)}")
    small = [(f, s) for f, (_, _, s, _) in zip(files, results) if min(s) < resolution]
    if small:
        f, (w, h) = min(small, key=lambda fs: min(fs[1]))
        notes.append(f"{len(small)} image(s) smaller than --resolution {resolution} were upscaled (bicubic), the "
                     f"smallest {os.path.join(root, f)} ({w}x{h}); a lower --resolution avoids that")
    if len(classes) == 1:
        notes.append(f"one class sub-folder ({classes[0]!r}): the model learns one class (unconditional in effect)")
    return images, torch.tensor(labels, dtype=torch.long), classes, files, notes


# --------------------------------------------------------------------------------------------
# The training data
# --------------------------------------------------------------------------------------------
def flip_mask(seed: int, step: int, sample_ids: Sequence[int]) -> List[bool]:
    """Which samples of step ``step`` are mirrored: bit 0 of ``mix_seed(seed, STREAM_HFLIP, step, id)``."""
    return [bool(mix_seed(seed, STREAM_HFLIP, step, int(i)) & 1) for i in sample_ids]


class ImageFolderData:
    """An image folder as the training engine reads it (the ``erw_fast.data.TrainData`` protocol);
    see the module doc. Extra fields: ``class_names``, ``files`` (relative paths, dataset order),
    ``resolution``, ``hflip``, ``notes`` (what loading changed, printed once on rank 0)."""

    is_latent = False

    def __init__(self, root: str, device="cpu", resolution: int = DEFAULT_RESOLUTION, hflip: bool = False,
                 workers: Optional[int] = None, verbose: bool = True):
        """``device``: the training device (accepted as every dataset's is; the batches stay on the host)."""
        self.images, self.labels, self.class_names, self.files, self.notes = load_image_folder(root, resolution, workers)
        self.root, self.resolution, self.hflip = root, int(resolution), bool(hflip)
        self.device = torch.device(device)
        self.channels = int(self.images.shape[1])
        self.input_size = int(resolution)
        self.num_classes = len(self.class_names)
        if verbose and self.notes and int(os.environ.get("RANK", "0")) == 0:
            for note in self.notes:
                print(f"note: {root}: {note}", file=sys.stderr)

    def __len__(self):
        return len(self.files)

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def uint8(self, idx, seed: int = 0, step: int = 0, sample_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        """uint8 (B, C, R, R) images ``idx``, mirrored per ``flip_mask`` when ``hflip`` is on."""
        u = self.images[idx.cpu() if torch.is_tensor(idx) else idx]
        if self.hflip and sample_ids is not None and len(u):
            mask = torch.tensor(flip_mask(seed, step, sample_ids))
            u = torch.where(mask[:, None, None, None], u.flip(-1), u)
        return u

    def batch(self, idx, seed: int, step: int, sample_ids: Sequence[int], with_pixels: bool = True):
        """``(pixels in [-1, 1] (B, C, R, R) float32, labels, encoder images uint8 (B, 3, R, R) or None)``
        on the host; the flip (``hflip``) is drawn per (seed, step, sample id)."""
        u = self.uint8(idx, seed, step, sample_ids)
        x = u.float() / 127.5 - 1.0
        pixels = (u.expand(-1, 3, -1, -1) if self.channels == 1 else u).contiguous() if with_pixels else None
        return x, self.labels[idx.cpu() if torch.is_tensor(idx) else idx], pixels

    def sample_classes(self, max_rows: int = 16) -> Optional[List[int]]:
        """None (every class) when there are at most ``max_rows`` classes, else ``max_rows`` spread evenly."""
        k = self.num_classes
        if k <= max_rows:
            return None
        return [int(round(i * (k - 1) / (max_rows - 1))) for i in range(max_rows)]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: the model works in pixel space."""
        return x

    def probe_indices(self, num_images: int) -> Tuple[torch.Tensor, str, int]:
        """(indices, description, available) of the representation probe's images: evenly spaced over
        the dataset's class-sorted order, so that every class is represented (``evaluation.probe``)."""
        n = self.num_samples
        k = max(0, min(int(num_images), n))
        idx = torch.tensor([(i * (n - 1)) // max(k - 1, 1) for i in range(k)], dtype=torch.long)
        return idx, (f"{k} of the folder's {n} images, evenly spaced over its class-sorted order (every class "
                     "represented; not held out: the SiT trains on all of them)"), n

    def reference_images(self) -> np.ndarray:
        """All images as uint8 (N, R, R, C), the ``arr_0`` layout of a FID reference (no flip)."""
        return self.images.permute(0, 2, 3, 1).numpy()


def write_reference_npz(folder: str, out: str, resolution: int = DEFAULT_RESOLUTION) -> int:
    """Write the folder's images, centre-cropped to ``resolution`` exactly as training sees them, as a
    FID reference ``out`` (``arr_0`` uint8 (N, R, R, C), ``labels``, ``class_names``) for ``python -m
    erw_fast.evaluate --ref`` / ``--eval-ref``; returns N (the reference's number of images)."""
    root = image_folder_path(folder) or folder
    data = ImageFolderData(root, "cpu", resolution=resolution)
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    np.savez(out, arr_0=data.reference_images(), labels=data.labels.numpy(),
             class_names=np.array(data.class_names))
    return data.num_samples
