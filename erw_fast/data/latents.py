"""Latent datasets for real-scale training: SD-VAE posterior moments + labels + the raw image.

Two on-disk layouts are read, both through the same interface (``open_latents(root)``):

**erw_fast shards** (written by ``python -m erw_fast.preprocess``)::

    root/index.json                      {"format": "erw_fast.latents", "version": 1, "count", "shards", ...}
    root/shard-00000.moments.npy         (n, 2C, h, w) float16: posterior mean ‖ std (C = 4, h = w = res/8)
    root/shard-00000.labels.npy          (n,) int64
    root/shard-00000.images.npy          (n, 3, res, res) uint8: the ADM-centre-cropped image (for the encoder)
    root/shard-00000.json                the shard's "done" marker (count, shapes); written last
    root/features/<encoder>/...          optional fp16 target features (``python -m erw_fast.extract_features``)

Shards are plain ``.npy`` files opened memory-mapped once (no per-sample file opens); a batch is a
fancy-index into them. Each shard has a fixed number of samples (the last may be short), so shard
``k`` always holds global samples ``[k·S, k·S + n)``, whatever the number of GPUs that wrote it.

**REPA's layout** (``images/`` PNGs + ``vae-sd/*.npy`` per-image mean ‖ std + ``dataset.json`` labels),
read directly (one file open per sample: fine for a start, convert with ``--from-repa`` for speed).

Training samples the posterior afresh each step: ``z = (mean + std · ε) · 0.18215`` with ``ε`` given by
the caller (``sample_posterior``), so the trainer's per-sample seeding decides every draw.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

FORMAT = "erw_fast.latents"
VERSION = 1
SD_VAE_SCALE = 0.18215
POSTERIOR_STREAM = 5        # seed stream of the posterior ε (the engine uses 1..4)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class LatentDataError(ValueError):
    """A latent dataset on disk is missing, corrupt or inconsistent (the message names the file)."""


class CorruptShardError(LatentDataError):
    pass


class LabelCountError(LatentDataError):
    pass


# --------------------------------------------------------------------------------------------
# .npy helpers
# --------------------------------------------------------------------------------------------
def npy_header(path: str):
    """(shape, dtype, data offset) of a .npy file, read from its header only."""
    with open(path, "rb") as f:
        try:
            major, _minor = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as e:
            raise CorruptShardError(f"{path}: not a readable .npy file ({e}); delete it and rerun the "
                                    "command that wrote it") from e
        if fortran:
            raise CorruptShardError(f"{path}: Fortran-ordered array; expected C order")
        return tuple(shape), np.dtype(dtype), f.tell()


def npy_expected_bytes(path: str) -> int:
    shape, dtype, offset = npy_header(path)
    return offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def check_npy(path: str, what: str = "shard", fix: str = "") -> tuple:
    """Check that ``path`` exists and is not truncated; returns (shape, dtype)."""
    if not os.path.isfile(path):
        raise CorruptShardError(f"{what} file {path} is missing{fix}")
    shape, dtype, offset = npy_header(path)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        raise CorruptShardError(
            f"{what} file {path} is truncated or corrupt: its header says {shape} {dtype} = {expected} bytes, "
            f"the file has {actual} bytes{fix}")
    return shape, dtype


def open_npy(path: str, what: str = "shard", fix: str = "") -> np.ndarray:
    check_npy(path, what, fix)
    return np.load(path, mmap_mode="r")


def sample_posterior(moments: torch.Tensor, eps: torch.Tensor, scale: float = SD_VAE_SCALE) -> torch.Tensor:
    """``(mean + std · eps) · scale`` from moments ``(B, 2C, h, w)`` (mean ‖ std) and ``eps (B, C, h, w)``."""
    mean, std = moments.float().chunk(2, dim=1)
    if eps.shape != mean.shape:
        raise ValueError(f"posterior noise has shape {tuple(eps.shape)}, expected {tuple(mean.shape)}")
    return (mean + std * eps.to(mean)) * scale


# --------------------------------------------------------------------------------------------
# erw_fast shards
# --------------------------------------------------------------------------------------------
def shard_stem(root: str, k: int) -> str:
    return os.path.join(root, f"shard-{k:05d}")


SHARD_FIELDS = ("moments", "labels", "images")


class LatentShards:
    """Reader of ``python -m erw_fast.preprocess`` output. ``moments(idx)``, ``images(idx)`` and
    ``labels`` (int64 numpy, in memory)."""

    layout = "shards"

    def __init__(self, root: str):
        self.root = root
        path = os.path.join(root, "index.json")
        try:
            with open(path) as f:
                self.index = json.load(f)
        except FileNotFoundError:
            raise LatentDataError(f"{path} not found: {root} is not a finished erw_fast latent dataset; "
                                  "(re)run `python -m erw_fast.preprocess --out " + root + " ...`") from None
        except json.JSONDecodeError as e:
            raise CorruptShardError(f"{path} is not valid JSON ({e}); rerun preprocess to rewrite it") from e
        if self.index.get("format") != FORMAT or int(self.index.get("version", 0)) > VERSION:
            raise LatentDataError(f"{path}: format {self.index.get('format')!r} version {self.index.get('version')} "
                                  f"is not {FORMAT!r} version <= {VERSION}")
        fix = f"; delete that shard's files and rerun `python -m erw_fast.preprocess --out {root} ...` to redo it"
        self.moments_mm: List[np.ndarray] = []
        self.images_mm: List[Optional[np.ndarray]] = []
        labels = []
        counts = []
        for entry in self.index["shards"]:
            stem = os.path.join(root, entry["name"])
            mom = open_npy(stem + ".moments.npy", "moments shard", fix)
            lab = open_npy(stem + ".labels.npy", "labels shard", fix)
            img = open_npy(stem + ".images.npy", "images shard", fix)
            n = int(entry["count"])
            for arr, field in ((mom, "moments"), (lab, "labels"), (img, "images")):
                if arr.shape[0] != n:
                    raise LabelCountError(
                        f"{stem}.{field}.npy holds {arr.shape[0]} samples but the index says {n} "
                        f"(moments {mom.shape[0]}, labels {lab.shape[0]}, images {img.shape[0]}){fix}")
            if tuple(mom.shape[1:]) != tuple(self.index["moments_shape"]):
                raise CorruptShardError(f"{stem}.moments.npy has per-sample shape {tuple(mom.shape[1:])}, "
                                        f"the index says {tuple(self.index['moments_shape'])}{fix}")
            if tuple(img.shape[1:]) != tuple(self.index["image_shape"]):
                raise CorruptShardError(f"{stem}.images.npy has per-sample shape {tuple(img.shape[1:])}, "
                                        f"the index says {tuple(self.index['image_shape'])}{fix}")
            self.moments_mm.append(mom)
            self.images_mm.append(img)
            labels.append(np.asarray(lab, dtype=np.int64))
            counts.append(n)
        total = int(sum(counts))
        if total != int(self.index["count"]):
            raise LabelCountError(f"{path}: count {self.index['count']} but the shards hold {total} samples")
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_classes = int(self.index["num_classes"])
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise LatentDataError(f"{root}: labels outside 0..{self.num_classes - 1}")
        self.moments_shape = tuple(self.index["moments_shape"])
        self.image_shape = tuple(self.index["image_shape"])
        self.scale = float(self.index.get("scale", SD_VAE_SCALE))

    def __len__(self):
        return int(self.offsets[-1])

    def _gather(self, arrays, idx, shape, dtype):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        out = np.empty((len(idx),) + tuple(shape), dtype=dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")     # sorted reads from the memory map
            out[sel[order]] = arrays[s][local[order]]
        return out

    def moments(self, idx) -> np.ndarray:
        """(n, 2C, h, w) float16: posterior mean ‖ std."""
        return self._gather(self.moments_mm, idx, self.moments_shape, np.float16)

    def images(self, idx) -> np.ndarray:
        """(n, 3, H, W) uint8."""
        return self._gather(self.images_mm, idx, self.image_shape, np.uint8)


# --------------------------------------------------------------------------------------------
# REPA's layout
# --------------------------------------------------------------------------------------------
def _list_files(folder: str, exts) -> List[str]:
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        for fn in files:
            if fn.lower().endswith(exts):
                out.append(os.path.relpath(os.path.join(dirpath, fn), folder).replace(os.sep, "/"))
    return sorted(out)


class RepaLayout:
    """REPA's preprocessed ImageNet: ``images/**.png`` + ``vae-sd/**.npy`` (mean ‖ std per image) +
    ``vae-sd/dataset.json`` (``{"labels": [[file, label], ...]}``), paired in sorted order."""

    layout = "repa"

    def __init__(self, root: str):
        self.root = root
        self.images_dir = os.path.join(root, "images")
        self.features_dir = os.path.join(root, "vae-sd")
        for d in (self.images_dir, self.features_dir):
            if not os.path.isdir(d):
                raise LatentDataError(f"REPA layout: folder {d} is missing (expected images/ and vae-sd/ under {root})")
        self.feature_files = _list_files(self.features_dir, (".npy",))
        self.image_files = _list_files(self.images_dir, IMAGE_EXTS)
        if not self.feature_files:
            raise LatentDataError(f"REPA layout: no .npy files under {self.features_dir}")
        if len(self.image_files) != len(self.feature_files):
            raise LabelCountError(f"REPA layout: {len(self.image_files)} images under {self.images_dir} but "
                                  f"{len(self.feature_files)} latent files under {self.features_dir}")
        meta = None
        for cand in (os.path.join(self.features_dir, "dataset.json"), os.path.join(root, "dataset.json"),
                     os.path.join(self.images_dir, "dataset.json")):
            if os.path.isfile(cand):
                meta = cand
                break
        if meta is None:
            raise LatentDataError(f"REPA layout: no dataset.json (labels) in {self.features_dir} or {root}")
        with open(meta) as f:
            raw = json.load(f).get("labels")
        if raw is None:
            raise LatentDataError(f"{meta}: has no 'labels' (an unconditional dataset); class labels are required")
        if len(raw) != len(self.feature_files):
            raise LabelCountError(f"{meta} lists {len(raw)} labels but {self.features_dir} holds "
                                  f"{len(self.feature_files)} latent files")
        table = {str(k).replace("\\", "/"): int(v) for k, v in raw}
        missing = [fn for fn in self.feature_files if fn not in table]
        if missing and all(fn in table for fn in self.image_files):
            self.labels = np.array([table[fn] for fn in self.image_files], np.int64)
        elif missing:
            raise LabelCountError(f"{meta} has no label for {len(missing)} latent files, e.g. {missing[0]}")
        else:
            self.labels = np.array([table[fn] for fn in self.feature_files], np.int64)
        self.num_classes = int(self.labels.max()) + 1
        first = self._load_moments(0)
        self.moments_shape = tuple(first.shape)
        self.image_shape = tuple(self._load_image(0).shape)
        self.scale = SD_VAE_SCALE

    def __len__(self):
        return len(self.feature_files)

    def _load_moments(self, i):
        path = os.path.join(self.features_dir, self.feature_files[i])
        check_npy(path, "REPA latent file")
        a = np.load(path)
        while a.ndim > 3 and a.shape[0] == 1:
            a = a[0]
        return a

    def _load_image(self, i):
        from PIL import Image

        path = os.path.join(self.images_dir, self.image_files[i])
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        return a.transpose(2, 0, 1)

    def moments(self, idx) -> np.ndarray:
        return np.stack([self._load_moments(int(i)) for i in np.asarray(idx).reshape(-1)]).astype(np.float16)

    def images(self, idx) -> np.ndarray:
        return np.stack([self._load_image(int(i)) for i in np.asarray(idx).reshape(-1)])


def open_latents(root: str):
    """The reader for ``root``: erw_fast shards (``index.json``) or REPA's layout (``vae-sd/``)."""
    if not os.path.isdir(root):
        raise LatentDataError(f"latent dataset folder {root!r} not found; make one with "
                              "`python -m erw_fast.preprocess --images DIR --out " + str(root) + "`")
    if os.path.isfile(os.path.join(root, "index.json")):
        return LatentShards(root)
    if os.path.isdir(os.path.join(root, "vae-sd")):
        return RepaLayout(root)
    if any(n.startswith("shard-") for n in os.listdir(root)):
        raise LatentDataError(f"{root} holds shards but no index.json: preprocessing did not finish; rerun "
                              "`python -m erw_fast.preprocess` with the same --out to complete it")
    raise LatentDataError(f"{root} is neither an erw_fast latent dataset (index.json) nor REPA's layout "
                          "(images/ + vae-sd/); make one with `python -m erw_fast.preprocess`")


# --------------------------------------------------------------------------------------------
# torch-facing views
# --------------------------------------------------------------------------------------------
class LatentDataset(torch.utils.data.Dataset):
    """Map-style dataset: ``(latent (C, h, w) float32, image (3, H, W) uint8, label int64)``.

    The latent is a fresh posterior sample ``(mean + std · ε) · scale``; ``ε`` comes from
    ``eps_fn(index) -> (C, h, w)`` when given (the trainer's seeding), else from ``torch.randn``.
    ``with_images=False`` skips reading the image (precomputed features) and returns an empty tensor.
    """

    def __init__(self, root_or_store, eps_fn=None, with_images: bool = True):
        self.store = open_latents(root_or_store) if isinstance(root_or_store, (str, os.PathLike)) else root_or_store
        self.eps_fn = eps_fn
        self.with_images = with_images
        self.num_classes = self.store.num_classes

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        mom = torch.from_numpy(self.store.moments([i])[0].astype(np.float32))
        c = mom.shape[0] // 2
        eps = self.eps_fn(i) if self.eps_fn is not None else torch.randn(c, *mom.shape[1:])
        z = sample_posterior(mom[None], eps[None], self.store.scale)[0]
        img = torch.from_numpy(self.store.images([i])[0]) if self.with_images else torch.empty(0, dtype=torch.uint8)
        return z, img, torch.tensor(int(self.store.labels[i]))


class LatentData:
    """What the training engine needs from a latent dataset (the digits ``DataInfo`` fields plus the
    raw encoder images).

    Fields: ``labels`` (N,) int64, ``input_size`` (latent side), ``channels`` (latent channels),
    ``num_classes``, ``image_size`` (raw image side), ``scale``, ``is_latent = True``.
    ``batch(idx, eps, device, with_images)`` → ``(latents (B, C, h, w) float32, labels, encoder_images
    (B, 3, H, W) uint8 or None)``; ``posterior_noise(seed, step, sample_ids)`` → per-sample seeded ε;
    ``features`` (set by ``attach_features``) → ``[FeatureStore]`` for ``--features precomputed``.
    """

    is_latent = True

    def __init__(self, root: str):
        self.root = root
        self.store = open_latents(root)
        self.labels = torch.from_numpy(np.ascontiguousarray(self.store.labels))
        c2, h, w = self.store.moments_shape
        if h != w:
            raise LatentDataError(f"{root}: non-square latents {h}x{w}")
        self.channels = c2 // 2
        self.input_size = h
        self.image_size = int(self.store.image_shape[-1])
        self.num_classes = self.store.num_classes
        self.scale = self.store.scale
        self.features = None

    def __len__(self):
        return len(self.labels)

    @property
    def latent_shape(self):
        return (self.channels, self.input_size, self.input_size)

    def posterior_noise(self, seed: int, step: int, sample_ids: Sequence[int]) -> torch.Tensor:
        """ε (B, C, h, w), each sample's draw seeded by (seed, POSTERIOR_STREAM, step, sample id) — the
        engine's convention (``mix_seed``), so the draws do not depend on how the batch is split."""
        from ..engine.utils import mix_seed

        out = torch.empty((len(sample_ids),) + self.latent_shape)
        for r, i in enumerate(sample_ids):
            g = torch.Generator().manual_seed(mix_seed(seed, POSTERIOR_STREAM, step, int(i)))
            out[r] = torch.randn(self.latent_shape, generator=g)
        return out

    def encoder_images(self, idx, device=None) -> torch.Tensor:
        x = torch.from_numpy(self.store.images(np.asarray(idx)))
        return x.to(device, non_blocking=True) if device is not None else x

    def batch(self, idx, eps: torch.Tensor, device=None, with_images: bool = True):
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
        mom = torch.from_numpy(self.store.moments(idx))
        if device is not None:
            mom = mom.to(device, non_blocking=True)
        z = sample_posterior(mom, eps.to(mom.device), self.scale)
        y = self.labels[torch.from_numpy(idx)]
        imgs = self.encoder_images(idx, device) if with_images else None
        return z, (y.to(device) if device is not None else y), imgs

    def sample_classes(self, max_rows: int = 8) -> List[int]:
        """Classes for a training-time sample grid: all when few, else ``max_rows`` spread evenly."""
        k = self.num_classes
        if k <= max_rows:
            return list(range(k))
        return [int(round(i * (k - 1) / (max_rows - 1))) for i in range(max_rows)]

    def decoder(self, device=None):
        """The VAE recorded in the index (a local folder or a cached hub id), or None when it (or
        diffusers) is not available; cached after the first call."""
        if getattr(self, "_vae", False) is not False:
            return self._vae
        self._vae = None
        vae = getattr(self.store, "index", {}).get("vae") if hasattr(self.store, "index") else None
        if vae and not vae.startswith("repa:"):
            try:
                from ..preprocess import load_vae

                self._vae = load_vae(vae, device or "cpu")
            except Exception:
                self._vae = None
        return self._vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Optional[torch.Tensor]:
        """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1], or None without a decoder."""
        vae = self.decoder(latents.device)
        if vae is None:
            return None
        p = next(vae.parameters())
        return vae.decode(latents.to(p.device, p.dtype) / self.scale).sample.float().clamp(-1, 1)

    def attach_features(self, encoder_names: Sequence[str]):
        from ..extract_features import FeatureStore

        self.features = [FeatureStore(self.root, n, expected_count=len(self)) for n in encoder_names]
        return self.features


def load_latent_data(root: str) -> LatentData:
    return LatentData(root)
