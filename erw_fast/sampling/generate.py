"""Per-index seeded generation from a checkpoint, and the sample files it writes.

- :func:`generate`: uint8 samples for given sample indices; sample i's class
  (``classes[i % len(classes)]``), initial noise and SDE noise depend only on ``(seed, i)``, so the
  images do not depend on the batch size or on the number of processes.
- :func:`sample_checkpoint`: the whole ``python -m erw_fast.sample`` run: model, optional SD-VAE
  decoding of latent models (:mod:`erw_fast.data.vae`), multi-rank sharding (rank r takes the
  indices i ≡ r (mod world), writes a shard, rank 0 merges them in index order), ``.npz`` (``arr_0``
  uint8 (N, H, W, C), the layout the ADM evaluator reads, plus ``labels``) and a PNG grid.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.vae import DEFAULT_VAE, decode_latents, load_vae
from ..models.checkpoint import load_checkpoint, resolve_checkpoint
from ..utils import distributed
from ..utils.cli import check_writable
from ..utils.images import save_png_grid, to_uint8
from ..utils.progress import progress
from ..utils.runlock import output_lock
from .samplers import sample, sample_noise

__all__ = ["PRECISIONS", "parse_interval", "parse_classes", "labels_for_indices", "output_paths", "load_model",
           "LatentDecoder", "generate", "grid_order", "write_grid", "write_shard", "merge_shards", "ShardError",
           "check_request", "checkpoint_path", "sample_checkpoint"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", "fp32", "bf16-autocast") + tuple(p for p in PRECISIONS if p != "fp32")


def sampling_precision(precision: str, device) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(weight dtype, autocast dtype or None). ``auto``: bf16 autocast with fp32 weights and TF32 matmuls
    on CUDA (normalisations stay fp32), plain fp32 elsewhere; ``fp32`` opts out; ``bf16``/``fp16``
    cast the weights."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    cuda = torch.device(device).type == "cuda"
    if precision == "bf16-autocast" or (precision == "auto" and cuda):
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return torch.float32, torch.bfloat16
    return PRECISIONS.get(precision, torch.float32), None


# --------------------------------------------------------------------------------------------
# Argument helpers (shared by the sample and evaluate CLIs)
# --------------------------------------------------------------------------------------------
def parse_interval(text: str):
    """``"LOW,HIGH"`` (or ``LOW:HIGH``, or a single HIGH meaning ``0,HIGH``) -> (low, high)."""
    parts = [p for p in str(text).replace(":", ",").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--guidance-interval {text!r}: expected LOW,HIGH with numbers in [0, 1]") from None
    if len(vals) == 1:
        vals = [0.0, vals[0]]
    if len(vals) != 2 or not 0.0 <= vals[0] <= vals[1] <= 1.0:
        raise ValueError(f"--guidance-interval {text!r}: expected LOW,HIGH with 0 <= LOW <= HIGH <= 1")
    return vals[0], vals[1]


def parse_classes(text: Optional[str], num_classes: int):
    if text is None or str(text).strip() == "":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--class {text!r}: expected a class id or a comma list of ids") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--class {text!r}: class ids must be in 0..{num_classes - 1}")
    return classes


def labels_for_indices(indices: Sequence[int], classes: Sequence[int]) -> torch.Tensor:
    """Class of sample i: ``classes[i % len(classes)]`` (balanced and independent of sharding)."""
    return torch.tensor([classes[int(i) % len(classes)] for i in indices], dtype=torch.long)


def output_paths(out: str):
    """(npz path, png path) for ``--out`` (a ``.npz`` file or a folder)."""
    if out.endswith(".npz"):
        return out, out[:-4] + ".png"
    return os.path.join(out, "samples.npz"), os.path.join(out, "samples.png")


def check_request(num_samples: int, steps: int, batch_size: int, cfg_scale: float, model):
    """ValueError for a sampling request ``model`` cannot serve (guidance needs a finite scale >= 0
    and a null class)."""
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if cfg_scale != 1.0:
        rows = model.y_embedder.embedding_table.num_embeddings
        if rows <= model.num_classes:
            raise ValueError(f"--cfg-scale {cfg_scale}: this model has no null class (trained without label "
                             "dropout), so classifier-free guidance is not available; use --cfg-scale 1")


# --------------------------------------------------------------------------------------------
# Model and decoding
# --------------------------------------------------------------------------------------------
def checkpoint_path(ckpt: str, quiet: bool = False) -> str:
    """``--ckpt``: a checkpoint file, or a run folder (its latest checkpoint, named on stderr)."""
    path = resolve_checkpoint(ckpt)
    if path != ckpt and not quiet:
        print(f"using the latest checkpoint of {ckpt}: {path}", file=sys.stderr)
    return path


def load_model(ckpt: str, which: str = "ema", device="cpu", precision: str = "fp32"):
    """The SiT of ``ckpt`` (a file, or a run folder: its latest checkpoint) in eval mode on ``device``."""
    model = load_checkpoint(checkpoint_path(ckpt, quiet=True), which=which)
    return model.to(device=device, dtype=sampling_precision(precision, device)[0]).eval()


class LatentDecoder:
    """Latents (N, 4, h, w) to images in [-1, 1] with the SD-VAE of :mod:`erw_fast.data.vae`
    (local folder, HF cache, offline rules: the loader that encoded the training latents)."""

    def __init__(self, name_or_path: str = DEFAULT_VAE, device="cpu"):
        try:
            self.vae = load_vae(name_or_path, device=device)
        except ImportError as e:
            raise ImportError(
                "this checkpoint is a latent model (4 input channels): decoding needs diffusers' SD-VAE. "
                "Install it with `pip install diffusers` and pass --vae DIR (a local AutoencoderKL folder) "
                "or a hub id such as stabilityai/sd-vae-ft-ema"
            ) from e

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):  # the VAE decodes in its own dtype
            return decode_latents(self.vae, z.float())


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def generate(model, indices: Sequence[int], shape, classes: Sequence[int], *, seed: int = 0,
             sampler: str = "sde", steps: int = 250, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
             batch_size: int = 64, decoder=None, show_progress: bool = False, step_progress=None):
    """uint8 (len(indices), H, W, C) samples and their labels for the given sample indices.
    ``step_progress`` wraps each batch's sampler steps (e.g. a training run's stop-signal check)."""
    indices = [int(i) for i in indices]
    params = next(model.parameters())
    device = params.device
    labels_all = labels_for_indices(indices, classes)
    chunks = []
    with progress(total=len(indices), desc="sampling", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            noise, gens = sample_noise(idx, shape, seed, device=device, dtype=torch.float32)
            x = sample(model, noise, labels_all[start:start + len(idx)].to(device), sampler=sampler, steps=steps,
                       cfg_scale=cfg_scale, guidance_interval=guidance_interval, generator=gens,
                       progress=step_progress)
            if decoder is not None:
                x = decoder(x)
            chunks.append(to_uint8(x.float().clamp(-1, 1).cpu()).transpose(0, 2, 3, 1))
            bar.update(len(idx))  # the final state is printed once, when the bar closes
    h, w = (chunks[0].shape[1:3] if chunks else shape[-2:])
    c = chunks[0].shape[3] if chunks else (3 if decoder is not None else shape[0])
    arr = np.concatenate(chunks) if chunks else np.zeros((0, h, w, c), np.uint8)
    return arr, labels_all.numpy()


# --------------------------------------------------------------------------------------------
# PNG grid
# --------------------------------------------------------------------------------------------
def grid_order(labels: np.ndarray, per_class: int = 8, max_rows: int = 10) -> np.ndarray:
    """Indices for a PNG grid: up to ``per_class`` samples of each of the first ``max_rows`` classes."""
    rows = []
    for c in sorted(set(labels.tolist()))[:max_rows]:
        idx = np.nonzero(labels == c)[0][:per_class]
        rows.append(idx)
    k = min(len(r) for r in rows)
    return np.concatenate([r[:k] for r in rows]), k


def write_grid(arr: np.ndarray, labels: np.ndarray, path: str, per_class: int = 8, max_rows: int = 10,
               upscale: Optional[int] = None) -> str:
    order, k = grid_order(labels, per_class, max_rows)
    imgs = arr[order].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    if upscale is None:
        upscale = max(1, 64 // arr.shape[1])
    save_png_grid(imgs, path, nrow=k, padding=1, upscale=upscale)
    return path


# --------------------------------------------------------------------------------------------
# Shards of a multi-rank run
# --------------------------------------------------------------------------------------------
class ShardError(RuntimeError):
    """A multi-rank run whose shards do not add up (a rank failed or wrote elsewhere)."""


def _shard_dir(npz_path: str) -> str:
    return npz_path[:-4] + ".shards"


def _shard_path(npz_path: str, rank: int, world_size: int) -> str:
    return os.path.join(_shard_dir(npz_path), f"rank{rank:05d}-of-{world_size:05d}.npz")


def write_shard(npz_path: str, rank: int, world_size: int, indices, arr: np.ndarray, labels: np.ndarray) -> str:
    """This rank's samples (with their indices), written atomically next to ``npz_path``."""
    os.makedirs(_shard_dir(npz_path), exist_ok=True)
    shard = _shard_path(npz_path, rank, world_size)
    np.savez(shard + ".tmp.npz", indices=np.asarray(indices, np.int64), arr_0=arr, labels=labels)
    os.replace(shard + ".tmp.npz", shard)
    return shard


def merge_shards(npz_path: str, world_size: int, num_samples: int):
    """Rank 0: read every rank's shard and place the samples in index order."""
    files = [_shard_path(npz_path, r, world_size) for r in range(world_size)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ShardError(f"cannot merge samples: missing shards {missing}")
    arr, labels = None, np.zeros(num_samples, np.int64)
    seen = np.zeros(num_samples, bool)
    for f in files:
        with np.load(f) as s:
            idx, a, lab = s["indices"], s["arr_0"], s["labels"]
        if arr is None:
            arr = np.zeros((num_samples, *a.shape[1:]), np.uint8)
        arr[idx], labels[idx], seen[idx] = a, lab, True
    if not seen.all():
        raise ShardError(f"shards in {_shard_dir(npz_path)} cover {int(seen.sum())} of {num_samples} samples")
    shutil.rmtree(_shard_dir(npz_path), ignore_errors=True)
    return arr, labels


# --------------------------------------------------------------------------------------------
# A sampling run
# --------------------------------------------------------------------------------------------
def _ranks(rank: Optional[int], world_size: Optional[int], device: Optional[str]):
    """(Dist, started a process group): explicit ``rank``/``world_size`` simulate ranks without a
    process group; otherwise torchrun's environment (:func:`erw_fast.utils.distributed.setup_distributed`)."""
    if rank is not None or world_size is not None:
        return distributed.Dist(int(rank or 0), int(world_size or 1), distributed.pick_device(device or "auto")), False
    d = distributed.setup_distributed(device or "auto")
    return d, d.world > 1


def sample_checkpoint(ckpt: str, num_samples: int, out: str, **kw) -> dict:
    """Sample ``num_samples`` images from ``ckpt`` into ``out``; see :func:`_sample_checkpoint`. A training
    run's own files (``samples.png``, ...) are never replaced, and the output folder is locked
    (``erw_fast.utils.runlock``: one writer per folder; rank 0 of a multi-rank run holds it)."""
    npz_path, png_path = output_paths(out)
    example = "sampled.npz (with sampled.png beside it)"
    outputs = [(npz_path, "--out", example), (png_path if kw.get("png", True) else None, "--out", example)]
    rank0 = (kw.get("rank") or 0) == 0 and os.environ.get("RANK", "0") == "0"
    with output_lock(outputs if rank0 else [], "sample"):
        return _sample_checkpoint(ckpt, num_samples, out, **kw)


def _sample_checkpoint(ckpt: str, num_samples: int, out: str, *, weights: str = "ema", sampler: str = "sde",
                      steps: int = 250, cfg_scale: float = 1.0, guidance_interval="0,1",
                      classes: Optional[str] = None, seed: int = 0, batch_size: int = 64,
                      precision: str = "auto", device: Optional[str] = None, vae: str = DEFAULT_VAE,
                      grid_per_class: int = 8, png: bool = True, show_progress: bool = True,
                      rank: Optional[int] = None, world_size: Optional[int] = None) -> dict:
    """Sample ``num_samples`` images from ``ckpt`` into ``out`` (``.npz`` path or folder).

    ``ckpt``: a checkpoint file or a run folder (its latest checkpoint). ``guidance_interval``:
    ``"LOW,HIGH"`` text or a pair; ``classes``: a class id or comma list (default: all, cycled).
    ``rank``/``world_size`` simulate a multi-process run (no process group); without them
    torchrun's environment decides. Returns ``{rank, npz, shape[, png]}`` on rank 0 and
    ``{rank, shard}`` on the other ranks.
    """
    interval = (parse_interval(guidance_interval) if isinstance(guidance_interval, str)
                else tuple(float(v) for v in guidance_interval))
    d, using_dist = _ranks(rank, world_size, device)
    if not 0 <= d.rank < d.world:
        raise ValueError(f"rank {d.rank} out of range for world size {d.world}")
    npz_path, png_path = output_paths(out)
    if png and (isinstance(grid_per_class, bool) or not isinstance(grid_per_class, int) or grid_per_class < 1):
        raise ValueError(f"--grid-per-class must be >= 1 (images per class row of the PNG grid), got "
                         f"{grid_per_class}; --no-png writes no grid")
    check_writable(npz_path, "--out")
    model = load_model(checkpoint_path(ckpt, quiet=d.rank != 0), weights, d.device, precision)
    check_request(num_samples, steps, batch_size, cfg_scale, model)
    class_ids = parse_classes(classes, model.num_classes)
    decoder = LatentDecoder(vae, d.device) if model.in_channels == 4 else None
    shape = (model.in_channels, model.input_size, model.input_size)

    indices = list(range(d.rank, num_samples, d.world))
    autocast = sampling_precision(precision, d.device)[1]
    with torch.autocast(device_type=d.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        arr, labels = generate(model, indices, shape, class_ids, seed=seed, sampler=sampler, steps=steps,
                               cfg_scale=cfg_scale, guidance_interval=interval, batch_size=batch_size,
                               decoder=decoder, show_progress=(d.rank == 0 and show_progress))
    if d.world > 1:
        shard = write_shard(npz_path, d.rank, d.world, indices, arr, labels)
        if using_dist:
            distributed.barrier(d.world)
        if d.rank != 0:
            if using_dist:
                distributed.shutdown()
            return {"rank": d.rank, "shard": shard}
        arr, labels = merge_shards(npz_path, d.world, num_samples)
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    np.savez(npz_path, arr_0=arr, labels=labels)
    result = {"rank": d.rank, "npz": npz_path, "shape": arr.shape}
    if png:
        result["png"] = write_grid(arr, labels, png_path, per_class=grid_per_class)
    print(f"wrote {npz_path} (arr_0 {arr.shape} uint8)" + (f" and {png_path}" if png else ""), file=sys.stderr)
    if using_dist:
        distributed.shutdown()
    return result
