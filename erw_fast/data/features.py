"""Pre-extracted target-encoder features next to the latents: writing, reading, and the encoder stand-in.

``extract_features(data, encoder, ...)`` writes ``<data>/features/<encoder>/shard-*.npy`` ((n, T, C)
float16, one shard per latent shard) and an ``index.json`` (encoder, token grid, width, count).
Resumable like preprocessing (finished shards are kept; a partial one is redone; see ``shards.py``).
Training with ``--features precomputed`` then reads these (``precomputed_encoders``) instead of
running the encoder (and does not read the images). fp16 storage: DINOv2-B at 256 px is
256 × 768 × 2 B = 384 KB per image (~490 GB for ImageNet-1k, half of an fp32 store).
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from ..encoders.base import TargetEncoder
from ..utils.distributed import setup_distributed
from .shards import (LatentDataError, ShardWriter, check_npy, gather, open_latents, shard_done, shard_offsets,
                     shard_stem, wait_for, write_json)

FEATURES_FORMAT = "erw_fast.features"
FEATURES_VERSION = 1
FEATURE_FIELDS = ("",)          # one file per shard: shard-XXXXX.npy


class FeatureStoreError(LatentDataError):
    pass


def features_dir(data_root: str, encoder: str) -> str:
    return os.path.join(data_root, "features", encoder)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class FeatureStore:
    """Reader of pre-extracted features: ``get(idx) -> (n, T, C) float16`` tensor."""

    def __init__(self, data_root: str, encoder: str, expected_count: Optional[int] = None,
                 folder: Optional[str] = None):
        self.folder = folder or features_dir(data_root, encoder)
        path = os.path.join(self.folder, "index.json")
        fix = (f"; run `python -m erw_fast.extract_features --data {data_root} --encoder {encoder}` "
               "(it redoes missing or broken shards)")
        if not os.path.isfile(path):
            raise FeatureStoreError(f"--features precomputed: {path} not found{fix}")
        with open(path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FEATURES_FORMAT:
            raise FeatureStoreError(f"{path} is not an erw_fast feature index")
        if self.index.get("encoder") != encoder:
            raise FeatureStoreError(f"{path} holds features of {self.index.get('encoder')!r}, not {encoder!r}")
        self.name = encoder
        self.dim = int(self.index["dim"])
        self.token_grid = int(self.index["token_grid"])
        self.count = int(self.index["count"])
        if expected_count is not None and self.count != expected_count:
            raise FeatureStoreError(f"{path} has features for {self.count} images but the dataset has "
                                    f"{expected_count}{fix}")
        self.arrays = []
        counts = []
        for s in self.index["shards"]:
            p = os.path.join(self.folder, s["name"] + ".npy")
            check_npy(p, "feature shard", fix)
            a = np.load(p, mmap_mode="r")
            if a.shape[0] != int(s["count"]) or tuple(a.shape[1:]) != (self.token_grid ** 2, self.dim):
                raise FeatureStoreError(f"{p} has shape {tuple(a.shape)}, expected ({s['count']}, "
                                        f"{self.token_grid ** 2}, {self.dim}){fix}")
            self.arrays.append(a)
            counts.append(a.shape[0])
        if sum(counts) != self.count:
            raise FeatureStoreError(f"{path}: count {self.count} but the shards hold {sum(counts)}{fix}")
        self.offsets = shard_offsets(counts)

    def __len__(self):
        return self.count

    def get(self, idx) -> torch.Tensor:
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64).reshape(-1)
        return torch.from_numpy(gather(self.arrays, self.offsets, idx, (self.token_grid ** 2, self.dim),
                                       np.float16))


class PrecomputedEncoder(TargetEncoder):
    """Stands in for a target encoder under ``--features precomputed``: same ``name``/``dim``/
    ``token_grid`` (so projectors and grid checks are unchanged); ``features(idx)`` reads the store."""

    precomputed = True

    def __init__(self, store: FeatureStore):
        super().__init__()
        self.store = store
        self.name, self.dim, self.token_grid = store.name, store.dim, store.token_grid

    def features(self, idx, device=None) -> torch.Tensor:
        f = self.store.get(idx).float()
        return f.to(device, non_blocking=True) if device is not None else f

    def encode(self, images):
        raise RuntimeError(f"{self.name}: features are precomputed; call .features(dataset indices)")


class FeatureTable:
    """Target features of every sample, extracted once at the start of a run and held in memory (for
    data whose encoder input never changes: the digits have no augmentation). Reads like a
    ``FeatureStore``; ``extraction`` records the one-off cost (FLOPs as the trainer counts them, seconds)."""

    def __init__(self, name: str, table: torch.Tensor, token_grid: int, flops: float, seconds: float):
        self.name, self.table, self.token_grid = name, table, int(token_grid)
        self.dim, self.count = int(table.shape[-1]), int(table.shape[0])
        self.extraction = dict(encoder=name, images=self.count, flops=float(flops), seconds=float(seconds))

    def __len__(self):
        return self.count

    def get(self, idx) -> torch.Tensor:
        return self.table[torch.as_tensor(idx, dtype=torch.long).cpu().reshape(-1)]


def extract_in_memory(encoder: TargetEncoder, data, batch_size: int = 256) -> PrecomputedEncoder:
    """Run ``encoder`` once over every sample of ``data`` and stand in for it with the features held in
    memory. Only for data whose encoder input is fixed (``data.fixed_inputs``: no augmentation, the
    ``batch`` pixels depend on neither seed nor step). The FLOPs are one image's, counted, times the
    number of images; the seconds are those of the pass itself."""
    import time

    from ..utils.flops import count_flops

    if not getattr(data, "fixed_inputs", False):
        raise ValueError(f"--features precomputed: {type(data).__name__} draws its encoder inputs per step "
                         "(augmentation), so they cannot be extracted once")
    n, dev = data.num_samples, next(iter(encoder.parameters()), torch.empty(0)).device

    def pixels(lo: int, hi: int) -> torch.Tensor:
        idx = torch.arange(lo, hi)
        return data.batch(idx, 0, 0, idx.tolist())[2].to(dev)

    t0 = time.perf_counter()
    table = torch.cat([encoder(pixels(s, min(s + batch_size, n))).float().cpu() for s in range(0, n, batch_size)])
    seconds = time.perf_counter() - t0
    if not torch.isfinite(table).all():
        raise ValueError(f"target encoder {encoder.name!r} produced non-finite features")
    one = pixels(0, 1)
    flops = count_flops(lambda: encoder(one)) * n
    return PrecomputedEncoder(FeatureTable(encoder.name, table, encoder.token_grid, flops, seconds))


def precomputed_encoders(data_root: str, spec: str, expected_count: Optional[int] = None) -> List[PrecomputedEncoder]:
    """One ``PrecomputedEncoder`` per comma-separated encoder name of ``spec``."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    return [PrecomputedEncoder(FeatureStore(data_root, n, expected_count)) for n in names]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def feature_shard_counts(store) -> List[int]:
    """Per-shard sample counts of a latent dataset's features: its own shards (REPA's layout: chunks
    of 10,000)."""
    if getattr(store, "layout", "") == "shards":
        return [int(s["count"]) for s in store.index["shards"]]
    n, s = len(store), 10_000
    return [min(s, n - k) for k in range(0, n, s)]


def _feature_mismatch(stem: str):
    def error(key, have, want):
        return FeatureStoreError(f"{stem}.json holds {key}={have!r} but this run has {key}={want!r}; use another "
                                 "--out or delete that folder")
    return error


def feature_shard_done(out: str, k: int, n: int, meta: dict) -> bool:
    stem = shard_stem(out, k)
    return shard_done(stem, n, {key: meta[key] for key in ("encoder", "token_grid", "dim")}, FEATURE_FIELDS,
                      _feature_mismatch(stem))


def _build_target_encoder(encoder, encoder_path, encoder_source, token_grid, precision, dev, enc):
    """The encoder to run (built from its name unless given), on ``dev``, checked against the grid."""
    if enc is None:
        from ..encoders import build_encoder

        kw = dict(token_grid=token_grid, source=encoder_source)
        if encoder_path is not None:
            kw["path"] = encoder_path
        enc = build_encoder(encoder, device=dev, **kw)
    enc = enc.to(dev)
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision {precision!r}: use auto, fp32 or bf16")
    if precision != "auto":  # auto = as in training (bf16 autocast on CUDA)
        enc.reduced_precision = precision == "bf16"
    if enc.token_grid != token_grid:
        raise ValueError(f"encoder {encoder!r} gives a {enc.token_grid}x{enc.token_grid} grid, expected {token_grid}")
    return enc


def _extract_shard(store, enc, out: str, k: int, start: int, n: int, batch_size: int, meta: dict, dev, bar):
    """Encode the images of samples ``[start, start + n)`` into feature shard ``k``."""
    T = meta["token_grid"] ** 2
    writer = ShardWriter(shard_stem(out, k), {"": (np.float16, (n, T, enc.dim))})
    for s in range(0, n, batch_size):
        ids = np.arange(start + s, start + min(s + batch_size, n))
        imgs = torch.from_numpy(store.images(ids)).to(dev)
        feats = enc(imgs)
        if not torch.isfinite(feats).all():
            raise ValueError(f"encoder {meta['encoder']} produced non-finite features in shard {k}")
        writer.write(s, {"": feats.half().cpu().numpy()})
        bar.update(len(ids))
    writer.finish({**meta, "count": n, "shard": k, "first": start})


def _write_feature_index(out: str, data: str, counts: List[int], meta: dict, total: int) -> dict:
    shards = []
    for k, n in enumerate(counts):
        if not feature_shard_done(out, k, n, meta):
            raise FeatureStoreError(f"feature shard {shard_stem(out, k)}.npy is missing or incomplete; rerun the "
                                    "same command")
        shards.append({"name": os.path.basename(shard_stem(out, k)), "count": n})
    index = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, **meta, "count": int(total),
             "dtype": "float16", "shards": shards, "data": os.path.abspath(data)}
    write_json(os.path.join(out, "index.json"), index, indent=1)
    return index


def extract_features(data: str, encoder: str = "dinov2-vit-b", encoder_path: Optional[str] = None,
                     encoder_source: str = "auto", token_grid: Optional[int] = None, model_patch: int = 2,
                     batch_size: int = 64, out: Optional[str] = None, device=None, progress: bool = True,
                     enc: Optional[TargetEncoder] = None, precision: str = "auto",
                     _stop_after_shards: Optional[int] = None) -> Optional[dict]:
    """Extract features of every image of ``data``; returns the feature index (rank 0) or None.

    With ``torchrun`` every rank extracts shards ``k ≡ rank (mod world)`` and rank 0 writes
    ``index.json`` when all are done."""
    from ..utils.cli import check_positive, check_writable
    from ..utils.progress import progress as progress_bar

    check_positive(batch_size=batch_size, model_patch=model_patch, token_grid=token_grid)
    store = open_latents(data)
    out = out or features_dir(data, encoder)
    check_writable(out, "--out", folder=True)  # before the encoder is built and any image is read
    d = setup_distributed("auto", process_group=False)
    rank, world, dev = d.rank, d.world, (torch.device(device) if device is not None else d.device)
    latent_side = int(store.moments_shape[-1])
    if token_grid is None:
        if latent_side % model_patch:
            raise ValueError(f"latent side {latent_side} is not divisible by --model-patch {model_patch}")
        token_grid = latent_side // model_patch
    enc = _build_target_encoder(encoder, encoder_path, encoder_source, token_grid, precision, dev, enc)
    os.makedirs(out, exist_ok=True)
    meta = dict(encoder=encoder, token_grid=int(token_grid), dim=int(enc.dim))
    counts = feature_shard_counts(store)
    starts = shard_offsets(counts)
    mine = [k for k in range(len(counts)) if k % world == rank]
    todo = [k for k in mine if not feature_shard_done(out, k, counts[k], meta)]
    if rank == 0 and progress:
        print(f"extract_features: {encoder} on {len(store)} images ({token_grid}x{token_grid} tokens x {enc.dim}); "
              f"{len(mine) - len(todo)} shards already done, {len(todo)} to do → {out}", file=sys.stderr)
    bar = progress_bar(total=sum(counts[k] for k in todo), desc=f"features[{rank}]", unit="img",
                       disable=not progress or rank != 0)
    for i, k in enumerate(todo):
        _extract_shard(store, enc, out, k, int(starts[k]), counts[k], batch_size, meta, dev, bar)
        if _stop_after_shards is not None and i + 1 >= _stop_after_shards:
            bar.close()
            return None
    bar.close()
    if rank != 0:
        return None
    if world > 1:
        wait_for(lambda: all(feature_shard_done(out, k, n, meta) for k, n in enumerate(counts)),
                 f"the other ranks' feature shards in {out}")
    return _write_feature_index(out, data, counts, meta, len(store))
