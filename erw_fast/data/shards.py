"""Latent datasets on disk: the two layouts that are read, and the shard files that are written.

Two on-disk layouts are read, both through the same interface (``open_latents(root)``):

**erw_fast shards** (written by ``python -m erw_fast.preprocess``)::

    root/index.json                      {"format": "erw_fast.latents", "version": 1, "count", "shards", ...}
    root/shard-00000.moments.npy         (n, 2C, h, w) float16: posterior mean ‖ std (C = 4, h = w = res/8)
    root/shard-00000.labels.npy          (n,) int64
    root/shard-00000.images.npy          (n, 3, res, res) uint8: the ADM-centre-cropped image (for the encoder)
    root/shard-00000.json                the shard's "done" marker (count, shapes); written last
    root/features/<encoder>/...          optional fp16 target features (``python -m erw_fast.extract_features``)

Shards are plain ``.npy`` files opened memory-mapped once (no per-sample file opens); a batch is a
fancy-index into them (``gather``, shared with the feature store). Each shard has a fixed number of
samples (the last may be short), so shard ``k`` always holds global samples ``[k·S, k·S + n)``,
whatever the number of GPUs that wrote it.

**REPA's layout** (``images/`` PNGs + ``vae-sd/*.npy`` per-image mean ‖ std + ``dataset.json`` labels),
read directly (one file open per sample: fine for a start, convert with ``--from-repa`` for speed).

Writing (``ShardWriter``, ``shard_done``, ``write_json``) is resumable: a shard's files are filled as
``.tmp`` memory maps, renamed when complete, and its ``.json`` marker is written last, so an
interrupted shard has no marker and is redone. The feature store writes its shards the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .vae import SD_VAE_SCALE

FORMAT = "erw_fast.latents"
VERSION = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LATENT_FIELDS = ("moments", "labels", "images")


class LatentDataError(ValueError):
    """A latent dataset on disk is missing, corrupt or inconsistent (the message names the file)."""


class CorruptShardError(LatentDataError):
    pass


class LabelCountError(LatentDataError):
    pass


class PreprocessError(ValueError):
    """Writing a dataset cannot go on (bad input, settings that differ from the shards already there)."""


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


def gather(arrays: Sequence[np.ndarray], offsets: np.ndarray, idx, shape, dtype) -> np.ndarray:
    """Rows ``idx`` (global sample indices, any order) of the concatenation of ``arrays`` (memory-mapped
    shards; shard ``s`` holds samples ``[offsets[s], offsets[s + 1])``) → a new ``(len(idx),) + shape``
    array. Each shard is read once, in sorted order."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    total = int(offsets[-1])
    if len(idx) and (idx.min() < 0 or idx.max() >= total):
        raise IndexError(f"sample index out of range 0..{total - 1}")
    out = np.empty((len(idx),) + tuple(shape), dtype=dtype)
    shard = np.searchsorted(offsets, idx, side="right") - 1
    for s in np.unique(shard):
        sel = np.nonzero(shard == s)[0]
        local = idx[sel] - offsets[s]
        order = np.argsort(local, kind="stable")     # sorted reads from the memory map
        out[sel[order]] = arrays[s][local[order]]
    return out


def shard_offsets(counts: Sequence[int]) -> np.ndarray:
    """``[0, c0, c0 + c1, ...]`` int64: where each shard starts in the global sample order."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Writing shards (latents and features)
# --------------------------------------------------------------------------------------------
def shard_stem(root: str, k: int) -> str:
    return os.path.join(root, f"shard-{k:05d}")


def field_path(stem: str, field: str) -> str:
    """``stem.<field>.npy`` (``stem.npy`` for the unnamed field ``""``)."""
    return f"{stem}.{field}.npy" if field else f"{stem}.npy"


def write_json(path: str, obj, indent: Optional[int] = None):
    """Write ``obj`` to ``path`` atomically (through ``path.tmp``)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def remove_shard(stem: str, fields: Sequence[str]):
    """Delete a shard's marker and files, finished or ``.tmp``."""
    paths = [stem + ".json", stem + ".json.tmp"]
    for field in fields:
        paths += [field_path(stem, field), field_path(stem, field) + ".tmp"]
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def shard_done(stem: str, n: int, settings: Mapping, fields: Sequence[str],
               mismatch: Callable[[str, object, object], Exception]) -> bool:
    """Whether the shard at ``stem`` is finished: its marker present with ``count == n`` and its
    fields' files complete with ``n`` rows. A marker whose ``settings`` differ raises
    ``mismatch(key, marker value, this run's value)``: the folder holds another run's shards."""
    try:
        with open(stem + ".json") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    for key, v in settings.items():
        if marker.get(key) != v:
            raise mismatch(key, marker.get(key), v)
    if int(marker.get("count", -1)) != n:
        return False
    try:
        for field in fields:
            shape, _ = check_npy(field_path(stem, field))
            if shape[0] != n:
                return False
    except CorruptShardError:
        return False
    return True


class ShardWriter:
    """Write one shard: memory-mapped ``.tmp`` files filled in place, renamed when complete, and the
    ``.json`` marker written last (so an interrupted shard has no marker and is redone).

    ``fields``: ``{field: (dtype, shape of the whole shard)}``, one ``field_path(stem, field)`` each."""

    def __init__(self, stem: str, fields: Mapping[str, Tuple[object, tuple]]):
        self.stem = stem
        remove_shard(stem, list(fields))
        fmt = np.lib.format
        self.arrays = {field: fmt.open_memmap(field_path(stem, field) + ".tmp", "w+", np.dtype(dtype), tuple(shape))
                       for field, (dtype, shape) in fields.items()}

    def write(self, start: int, values: Mapping[str, np.ndarray]):
        """Rows ``[start, start + len)`` of each field in ``values``."""
        for field, v in values.items():
            arr = self.arrays[field]
            arr[start:start + len(v)] = v.astype(arr.dtype, copy=False)

    def finish(self, marker: dict):
        fields = list(self.arrays)
        for arr in self.arrays.values():
            arr.flush()
        del arr
        self.arrays = {}                      # closes the memory maps
        for field in fields:
            os.replace(field_path(self.stem, field) + ".tmp", field_path(self.stem, field))
        write_json(self.stem + ".json", marker)


def latent_shard_writer(out: str, k: int, n: int, moments_shape, image_shape) -> ShardWriter:
    """The writer of latent shard ``k`` (moments fp16, labels int64, images uint8)."""
    return ShardWriter(shard_stem(out, k), {"moments": (np.float16, (n,) + tuple(moments_shape)),
                                            "labels": (np.int64, (n,)),
                                            "images": (np.uint8, (n,) + tuple(image_shape))})


def source_identity(root: str, files: Sequence[str]) -> str:
    """The identity of a dataset's source: SHA-256 (16 hex digits) of its files' relative paths (in
    dataset order) and byte sizes. Recorded in every shard marker and ``index.json``, so that a rerun
    into the same ``--out`` from another folder (even one with the same counts) is refused instead of
    keeping the old arrays. Cheap (one ``stat`` per file); an edit that keeps a file's name and size
    is not seen."""
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{os.path.getsize(os.path.join(root, rel))}\n".encode())
    return h.hexdigest()[:16]


def _latent_mismatch(out: str, k: int):
    def error(key, have, want):
        if key == "source_id":
            old = "" if have else "; or written before sources were recorded"
            return PreprocessError(
                f"{out} holds latents of another source ({shard_stem(out, k)}.json records source {have!r}, "
                f"these inputs are {want!r}: other files or sizes{old}); use another --out, or delete that folder "
                "to rebuild it")
        return PreprocessError(
            f"{shard_stem(out, k)}.json was written with {key}={have!r}, this run has {key}={want!r}: {out} holds "
            "shards made with other settings; use another --out (or delete that folder)")
    return error


def latent_shard_done(out: str, k: int, n: int, settings: dict) -> bool:
    """Whether latent shard ``k`` of ``out`` is finished (marker present and matching, files complete)."""
    return shard_done(shard_stem(out, k), n, settings, LATENT_FIELDS, _latent_mismatch(out, k))


def shard_sizes(total: int, shard_size: int) -> List[int]:
    """Samples per shard: ``shard_size`` each, the last one short."""
    return [min(shard_size, total - k * shard_size) for k in range((total + shard_size - 1) // shard_size)]


def wait_for(done, what: str, timeout_s: float = 7 * 24 * 3600.0, poll_s: float = 5.0):
    """Poll ``done()`` until it is true (rank 0 waiting for the other ranks' shards)."""
    t0 = time.time()
    while not done():
        if time.time() - t0 > timeout_s:
            raise PreprocessError(f"timed out waiting for {what}; rerun the same command to finish")
        time.sleep(poll_s)


def write_index(out: str, total: int, shard_size: int, settings: dict, extra: dict) -> dict:
    """``out/index.json`` of a latent dataset whose shards are all finished."""
    shards = []
    for k, n in enumerate(shard_sizes(total, shard_size)):
        if not latent_shard_done(out, k, n, settings):
            raise PreprocessError(f"shard {shard_stem(out, k)} is missing or incomplete; rerun the same command "
                                  "to finish it")
        shards.append({"name": os.path.basename(shard_stem(out, k)), "count": n})
    index = {"format": FORMAT, "version": VERSION, "count": total, "shard_size": shard_size, "shards": shards,
             **settings, **extra}
    write_json(os.path.join(out, "index.json"), index, indent=1)
    return index


# --------------------------------------------------------------------------------------------
# Reading: erw_fast shards
# --------------------------------------------------------------------------------------------
def _read_index(root: str) -> dict:
    path = os.path.join(root, "index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise LatentDataError(f"{path} not found: {root} is not a finished erw_fast latent dataset; "
                              "(re)run `python -m erw_fast.preprocess --out " + root + " ...`") from None
    except json.JSONDecodeError as e:
        raise CorruptShardError(f"{path} is not valid JSON ({e}); rerun preprocess to rewrite it") from e
    if index.get("format") != FORMAT or int(index.get("version", 0)) > VERSION:
        raise LatentDataError(f"{path}: format {index.get('format')!r} version {index.get('version')} "
                              f"is not {FORMAT!r} version <= {VERSION}")
    return index


def _open_shard(stem: str, n: int, index: dict, fix: str):
    """(moments, labels, images) memory maps of one shard, checked against the index."""
    mom = open_npy(stem + ".moments.npy", "moments shard", fix)
    lab = open_npy(stem + ".labels.npy", "labels shard", fix)
    img = open_npy(stem + ".images.npy", "images shard", fix)
    for arr, field in ((mom, "moments"), (lab, "labels"), (img, "images")):
        if arr.shape[0] != n:
            raise LabelCountError(
                f"{stem}.{field}.npy holds {arr.shape[0]} samples but the index says {n} "
                f"(moments {mom.shape[0]}, labels {lab.shape[0]}, images {img.shape[0]}){fix}")
    if tuple(mom.shape[1:]) != tuple(index["moments_shape"]):
        raise CorruptShardError(f"{stem}.moments.npy has per-sample shape {tuple(mom.shape[1:])}, "
                                f"the index says {tuple(index['moments_shape'])}{fix}")
    if tuple(img.shape[1:]) != tuple(index["image_shape"]):
        raise CorruptShardError(f"{stem}.images.npy has per-sample shape {tuple(img.shape[1:])}, "
                                f"the index says {tuple(index['image_shape'])}{fix}")
    return mom, lab, img


class LatentShards:
    """Reader of ``python -m erw_fast.preprocess`` output. ``moments(idx)``, ``images(idx)`` and
    ``labels`` (int64 numpy, in memory)."""

    layout = "shards"

    def __init__(self, root: str):
        self.root = root
        self.index = _read_index(root)
        fix = f"; delete that shard's files and rerun `python -m erw_fast.preprocess --out {root} ...` to redo it"
        self.moments_mm: List[np.ndarray] = []
        self.images_mm: List[np.ndarray] = []
        labels, counts = [], []
        for entry in self.index["shards"]:
            n = int(entry["count"])
            mom, lab, img = _open_shard(os.path.join(root, entry["name"]), n, self.index, fix)
            self.moments_mm.append(mom)
            self.images_mm.append(img)
            labels.append(np.asarray(lab, dtype=np.int64))
            counts.append(n)
        total = int(sum(counts))
        if total != int(self.index["count"]):
            raise LabelCountError(f"{os.path.join(root, 'index.json')}: count {self.index['count']} but the shards "
                                  f"hold {total} samples")
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.offsets = shard_offsets(counts)
        self.num_classes = int(self.index["num_classes"])
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise LatentDataError(f"{root}: labels outside 0..{self.num_classes - 1}")
        self.moments_shape = tuple(self.index["moments_shape"])
        self.image_shape = tuple(self.index["image_shape"])
        self.scale = float(self.index.get("scale", SD_VAE_SCALE))

    def __len__(self):
        return int(self.offsets[-1])

    def moments(self, idx) -> np.ndarray:
        """(n, 2C, h, w) float16: posterior mean ‖ std."""
        return gather(self.moments_mm, self.offsets, idx, self.moments_shape, np.float16)

    def images(self, idx) -> np.ndarray:
        """(n, 3, H, W) uint8."""
        return gather(self.images_mm, self.offsets, idx, self.image_shape, np.uint8)


# --------------------------------------------------------------------------------------------
# Reading: REPA's layout
# --------------------------------------------------------------------------------------------
def list_files(folder: str, exts) -> List[str]:
    """Files under ``folder`` ending in ``exts``: relative paths with ``/``, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        for fn in files:
            if fn.lower().endswith(exts):
                out.append(os.path.relpath(os.path.join(dirpath, fn), folder).replace(os.sep, "/"))
    return sorted(out)


def _repa_labels(root: str, features_dir: str, images_dir: str, feature_files, image_files) -> np.ndarray:
    """The labels of REPA's ``dataset.json``, in the order of the latent (or image) files."""
    meta = None
    for cand in (os.path.join(features_dir, "dataset.json"), os.path.join(root, "dataset.json"),
                 os.path.join(images_dir, "dataset.json")):
        if os.path.isfile(cand):
            meta = cand
            break
    if meta is None:
        raise LatentDataError(f"REPA layout: no dataset.json (labels) in {features_dir} or {root}")
    with open(meta) as f:
        raw = json.load(f).get("labels")
    if raw is None:
        raise LatentDataError(f"{meta}: has no 'labels' (an unconditional dataset); class labels are required")
    if len(raw) != len(feature_files):
        raise LabelCountError(f"{meta} lists {len(raw)} labels but {features_dir} holds "
                              f"{len(feature_files)} latent files")
    table = {str(k).replace("\\", "/"): int(v) for k, v in raw}
    missing = [fn for fn in feature_files if fn not in table]
    if missing and all(fn in table for fn in image_files):
        return np.array([table[fn] for fn in image_files], np.int64)
    if missing:
        raise LabelCountError(f"{meta} has no label for {len(missing)} latent files, e.g. {missing[0]}")
    return np.array([table[fn] for fn in feature_files], np.int64)


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
        self.feature_files = list_files(self.features_dir, (".npy",))
        self.image_files = list_files(self.images_dir, IMAGE_EXTS)
        if not self.feature_files:
            raise LatentDataError(f"REPA layout: no .npy files under {self.features_dir}")
        if len(self.image_files) != len(self.feature_files):
            raise LabelCountError(f"REPA layout: {len(self.image_files)} images under {self.images_dir} but "
                                  f"{len(self.feature_files)} latent files under {self.features_dir}")
        self.labels = _repa_labels(root, self.features_dir, self.images_dir, self.feature_files, self.image_files)
        self.num_classes = int(self.labels.max()) + 1
        self.moments_shape = tuple(self._load_moments(0).shape)
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
