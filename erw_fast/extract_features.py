"""Pre-extract target-encoder features next to the latents: ``python -m erw_fast.extract_features``.

    python -m erw_fast.extract_features --data /data/in256 --encoder dinov2-vit-b [--encoder-path DIR]
    torchrun --nproc_per_node 8 -m erw_fast.extract_features --data /data/in256 --encoder dinov2-vit-b

Writes ``<data>/features/<encoder>/shard-*.npy`` ((n, T, C) float16, one shard per latent shard) and
an ``index.json`` (encoder, token grid, width, count). Resumable like preprocessing (finished shards
are kept; a partial one is redone). Training with ``--features precomputed`` then reads these
instead of running the encoder (and does not read the images). fp16 storage: DINOv2-B at 256 px is
256 × 768 × 2 B = 384 KB per image (~490 GB for ImageNet-1k, half of an fp32 store).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from .data.latents import LatentDataError, check_npy, open_latents
from .encoders.base import TargetEncoder

FEATURES_FORMAT = "erw_fast.features"
FEATURES_VERSION = 1


class FeatureStoreError(LatentDataError):
    pass


def features_dir(data_root: str, encoder: str) -> str:
    return os.path.join(data_root, "features", encoder)


def _data_shards(store) -> List[int]:
    """Per-shard sample counts of a latent dataset (REPA's layout: chunks of 10,000)."""
    if getattr(store, "layout", "") == "shards":
        return [int(s["count"]) for s in store.index["shards"]]
    n, s = len(store), 10_000
    return [min(s, n - k) for k in range(0, n, s)]


def _marker_ok(stem: str, n: int, meta: dict) -> bool:
    try:
        with open(stem + ".json") as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    for key in ("encoder", "token_grid", "dim"):
        if m.get(key) != meta[key]:
            raise FeatureStoreError(
                f"{stem}.json holds {key}={m.get(key)!r} but this run has {key}={meta[key]!r}; use another "
                "--out or delete that folder")
    try:
        shape, _ = check_npy(stem + ".npy", "feature shard")
    except LatentDataError:
        return False
    return int(m.get("count", -1)) == n and shape[0] == n


def extract_features(data: str, encoder: str = "dinov2-vit-b", encoder_path: Optional[str] = None,
                     encoder_source: str = "auto", token_grid: Optional[int] = None, model_patch: int = 2,
                     batch_size: int = 64, out: Optional[str] = None, device=None, progress: bool = True,
                     enc: Optional[TargetEncoder] = None, precision: str = "auto",
                     _stop_after_shards: Optional[int] = None) -> Optional[dict]:
    """Extract features of every image of ``data``; returns the feature index (rank 0) or None."""
    from .encoders import build_encoder
    from .preprocess import _dist_setup, wait_for
    from .utils.progress import progress as progress_bar

    store = open_latents(data)
    rank, world, dev = _dist_setup()
    if device is not None:
        dev = torch.device(device)
    latent_side = int(store.moments_shape[-1])
    if token_grid is None:
        if latent_side % model_patch:
            raise ValueError(f"latent side {latent_side} is not divisible by --model-patch {model_patch}")
        token_grid = latent_side // model_patch
    if enc is None:
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
    out = out or features_dir(data, encoder)
    os.makedirs(out, exist_ok=True)
    meta = dict(encoder=encoder, token_grid=int(token_grid), dim=int(enc.dim))
    counts = _data_shards(store)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    mine = [k for k in range(len(counts)) if k % world == rank]
    todo = [k for k in mine if not _marker_ok(os.path.join(out, f"shard-{k:05d}"), counts[k], meta)]
    if rank == 0 and progress:
        print(f"extract_features: {encoder} on {len(store)} images ({token_grid}x{token_grid} tokens x {enc.dim}); "
              f"{len(mine) - len(todo)} shards already done, {len(todo)} to do → {out}", file=sys.stderr)
    bar = progress_bar(total=sum(counts[k] for k in todo), desc=f"features[{rank}]", unit="img",
                       disable=not progress or rank != 0)
    T = token_grid * token_grid
    for i, k in enumerate(todo):
        stem = os.path.join(out, f"shard-{k:05d}")
        for suffix in (".json", ".npy", ".npy.tmp"):
            if os.path.exists(stem + suffix):
                os.remove(stem + suffix)
        n = counts[k]
        arr = np.lib.format.open_memmap(stem + ".npy.tmp", "w+", np.float16, (n, T, enc.dim))
        for s in range(0, n, batch_size):
            ids = np.arange(starts[k] + s, starts[k] + min(s + batch_size, n))
            imgs = torch.from_numpy(store.images(ids)).to(dev)
            feats = enc(imgs)
            if not torch.isfinite(feats).all():
                raise ValueError(f"encoder {encoder} produced non-finite features in shard {k}")
            arr[s:s + len(ids)] = feats.half().cpu().numpy()
            bar.update(len(ids))
        arr.flush()
        del arr
        os.replace(stem + ".npy.tmp", stem + ".npy")
        with open(stem + ".json.tmp", "w") as f:
            json.dump({**meta, "count": n, "shard": k, "first": int(starts[k])}, f)
        os.replace(stem + ".json.tmp", stem + ".json")
        if _stop_after_shards is not None and i + 1 >= _stop_after_shards:
            bar.close()
            return None
    bar.close()
    if rank != 0:
        return None
    if world > 1:
        wait_for(lambda: all(_marker_ok(os.path.join(out, f"shard-{k:05d}"), n, meta) for k, n in enumerate(counts)),
                 f"the other ranks' feature shards in {out}")
    shards = []
    for k, n in enumerate(counts):
        stem = os.path.join(out, f"shard-{k:05d}")
        if not _marker_ok(stem, n, meta):
            raise FeatureStoreError(f"feature shard {stem}.npy is missing or incomplete; rerun the same command")
        shards.append({"name": f"shard-{k:05d}", "count": n})
    index = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, **meta, "count": int(len(store)),
             "dtype": "float16", "shards": shards, "data": os.path.abspath(data)}
    with open(os.path.join(out, "index.json.tmp"), "w") as f:
        json.dump(index, f, indent=1)
    os.replace(os.path.join(out, "index.json.tmp"), os.path.join(out, "index.json"))
    return index


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
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self):
        return self.count

    def get(self, idx) -> torch.Tensor:
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.token_grid ** 2, self.dim), np.float16)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self.arrays[s][local[order]]
        return torch.from_numpy(out)


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


def precomputed_encoders(data_root: str, spec: str, expected_count: Optional[int] = None) -> List[PrecomputedEncoder]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    return [PrecomputedEncoder(FeatureStore(data_root, n, expected_count)) for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.extract_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="latent dataset folder (preprocess output, or REPA's layout)")
    p.add_argument("--encoder", default="dinov2-vit-b", help="target encoder name (default dinov2-vit-b)")
    p.add_argument("--encoder-path", help="local weights: a transformers save_pretrained folder or a torch.hub "
                   "dinov2 repository clone (default: the HF / torch hub cache, or a download when online)")
    p.add_argument("--encoder-source", default="auto", choices=("auto", "transformers", "hub"))
    p.add_argument("--model-patch", type=int, default=2, help="the SiT patch size the features are for: token grid "
                   "= latent side / patch (default 2: 16x16 tokens at 256 px)")
    p.add_argument("--token-grid", type=int, help="override the token grid directly")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward (default 64)")
    p.add_argument("--out", help="feature folder (default DATA/features/ENCODER, where training looks)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="encoder compute precision: auto = as online training does (bf16 autocast on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present; the local "
                   "rank's GPU under torchrun)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        extract_features(a.data, a.encoder, a.encoder_path, a.encoder_source, a.token_grid, a.model_patch,
                         a.batch_size, a.out, a.device, a.progress, precision=a.precision)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
