"""Sample a trained checkpoint: ``python -m erw_fast.sample --ckpt CKPT --num-samples N --out OUT``.

Writes ``OUT`` (if it ends in ``.npz``) or ``OUT/samples.npz``: ``arr_0`` uint8 (N, H, W, C), the
layout the ADM evaluator reads, plus ``labels`` (N,); and a PNG grid next to it (one row per class).

- EMA weights by default (``--weights model`` for the raw ones); sampler ``sde`` (REPA/ERW's
  Euler–Maruyama, 250 steps), ``ode-euler`` or ``ode-heun``; classifier-free guidance
  ``--cfg-scale`` inside ``--guidance-interval LOW,HIGH``.
- Sample i's class, initial noise and SDE noise depend only on ``(--seed, i)``: the images do not
  depend on the batch size or on the number of processes. Class of sample i:
  ``classes[i % len(classes)]`` with ``classes`` = ``--class`` (comma list) or all classes.
- Multi-GPU: ``torchrun --nproc_per_node G -m erw_fast.sample ...``; rank r takes the indices
  i ≡ r (mod G), writes a shard, and rank 0 merges the shards in index order.
- Latent models (4 input channels) are decoded with diffusers' SD-VAE (``--vae``, a local folder or
  a hub id; ``pip install diffusers``), scaled by 1/0.18215 as REPA/ERW do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from .models.checkpoint import load_checkpoint
from .sampling import SAMPLERS, sample, sample_noise
from .utils.png import save_png_grid, to_uint8
from .utils.progress import progress

VAE_SCALE = 0.18215


# --------------------------------------------------------------------------------------------
# Argument helpers
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


# --------------------------------------------------------------------------------------------
# Model and decoding
# --------------------------------------------------------------------------------------------
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(ckpt: str, which: str = "ema", device="cpu", precision: str = "fp32"):
    model = load_checkpoint(ckpt, which=which)
    return model.to(device=device, dtype=_DTYPES[precision]).eval()


class SDVAEDecoder:
    """Latents (N, 4, h, w) to images in [-1, 1] with diffusers' AutoencoderKL (optional extra).

    Loading goes through ``erw_fast.preprocess.load_vae`` (local folder, HF cache, offline rules),
    the same loader that encoded the training latents.
    """

    def __init__(self, name_or_path: str, device="cpu"):
        try:
            import diffusers  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "this checkpoint is a latent model (4 input channels): decoding needs diffusers' SD-VAE. "
                "Install it with `pip install diffusers` and pass --vae DIR (a local AutoencoderKL folder) "
                "or a hub id such as stabilityai/sd-vae-ft-ema"
            ) from e
        from .preprocess import load_vae

        self.vae = load_vae(name_or_path, device=device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z / VAE_SCALE).sample.float().clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def generate(model, indices: Sequence[int], shape, classes: Sequence[int], *, seed: int = 0,
             sampler: str = "sde", steps: int = 250, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
             batch_size: int = 64, decoder=None, show_progress: bool = False):
    """uint8 (len(indices), H, W, C) samples and their labels for the given sample indices."""
    indices = [int(i) for i in indices]
    params = next(model.parameters())
    device = params.device
    labels_all = labels_for_indices(indices, classes)
    chunks, bar = [], progress(total=len(indices), desc="sampling", unit="img", disable=not show_progress)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        noise, gens = sample_noise(idx, shape, seed, device=device, dtype=torch.float32)
        x = sample(model, noise, labels_all[start:start + len(idx)].to(device), sampler=sampler, steps=steps,
                   cfg_scale=cfg_scale, guidance_interval=guidance_interval, generator=gens)
        if decoder is not None:
            x = decoder(x)
        chunks.append(to_uint8(x.float().clamp(-1, 1).cpu()).transpose(0, 2, 3, 1))
        bar.update(len(idx))
    bar.close()
    h, w = (chunks[0].shape[1:3] if chunks else shape[-2:])
    c = chunks[0].shape[3] if chunks else (3 if decoder is not None else shape[0])
    arr = np.concatenate(chunks) if chunks else np.zeros((0, h, w, c), np.uint8)
    return arr, labels_all.numpy()


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


def _shard_dir(npz_path: str) -> str:
    return npz_path[:-4] + ".shards"


def merge_shards(npz_path: str, world_size: int, num_samples: int):
    """Rank 0: read every rank's shard and place the samples in index order."""
    d = _shard_dir(npz_path)
    files = [os.path.join(d, f"rank{r:05d}-of-{world_size:05d}.npz") for r in range(world_size)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise RuntimeError(f"cannot merge samples: missing shards {missing}")
    arr, labels = None, np.zeros(num_samples, np.int64)
    seen = np.zeros(num_samples, bool)
    for f in files:
        with np.load(f) as s:
            idx, a, lab = s["indices"], s["arr_0"], s["labels"]
        if arr is None:
            arr = np.zeros((num_samples, *a.shape[1:]), np.uint8)
        arr[idx], labels[idx], seen[idx] = a, lab, True
    if not seen.all():
        raise RuntimeError(f"shards cover {int(seen.sum())} of {num_samples} samples")
    shutil.rmtree(d, ignore_errors=True)
    return arr, labels


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="training checkpoint {model, ema, opt, args, steps} or a state dict")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output .npz path, or a folder (samples.npz + samples.png)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights (default: ema)")
    p.add_argument("--sampler", choices=SAMPLERS, default="sde")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-interval", default="0,1", help="LOW,HIGH: guide only for LOW <= t <= HIGH (t=1 noise)")
    p.add_argument("--class", dest="classes", default=None, help="class id or comma list (default: all, cycled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--precision", choices=tuple(_DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                   help="SD-VAE for latent models: folder or hub id (the one the latents were made with; "
                        "REPA's generate.py uses sd-vae-ft-ema)")
    p.add_argument("--grid-per-class", type=int, default=8, help="images per class row in the PNG grid")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _validate(a, model):
    if a.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {a.num_samples}")
    if a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.cfg_scale != 1.0:
        rows = model.y_embedder.embedding_table.num_embeddings
        if rows <= model.num_classes:
            raise ValueError(f"--cfg-scale {a.cfg_scale}: this model has no null class (trained without label "
                             "dropout), so classifier-free guidance is not available; use --cfg-scale 1")


def _init_distributed(rank, world_size):
    """(rank, world, local_rank, using_dist): explicit args simulate ranks; torchrun env starts a group."""
    if rank is not None or world_size is not None:
        return int(rank or 0), int(world_size or 1), 0, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True


def main(argv=None, rank: Optional[int] = None, world_size: Optional[int] = None) -> dict:
    """Run the CLI. ``rank``/``world_size`` simulate a multi-process run (no process group)."""
    a = build_parser().parse_args(argv)
    interval = parse_interval(a.guidance_interval)
    rank, world, local_rank, using_dist = _init_distributed(rank, world_size)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    device = a.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    model = load_model(a.ckpt, a.weights, device, a.precision)
    _validate(a, model)
    classes = parse_classes(a.classes, model.num_classes)
    decoder = SDVAEDecoder(a.vae, device) if model.in_channels == 4 else None
    shape = (model.in_channels, model.input_size, model.input_size)
    npz_path, png_path = output_paths(a.out)

    indices = list(range(rank, a.num_samples, world))
    arr, labels = generate(model, indices, shape, classes, seed=a.seed, sampler=a.sampler, steps=a.steps,
                           cfg_scale=a.cfg_scale, guidance_interval=interval, batch_size=a.batch_size,
                           decoder=decoder, show_progress=(rank == 0 and not a.no_progress))
    if world > 1:
        d = _shard_dir(npz_path)
        os.makedirs(d, exist_ok=True)
        shard = os.path.join(d, f"rank{rank:05d}-of-{world:05d}.npz")
        np.savez(shard + ".tmp.npz", indices=np.asarray(indices, np.int64), arr_0=arr, labels=labels)
        os.replace(shard + ".tmp.npz", shard)
        if using_dist:
            import torch.distributed as dist

            dist.barrier()
        if rank != 0:
            if using_dist:
                dist.destroy_process_group()
            return {"rank": rank, "shard": shard}
        arr, labels = merge_shards(npz_path, world, a.num_samples)
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    np.savez(npz_path, arr_0=arr, labels=labels)
    result = {"rank": rank, "npz": npz_path, "shape": arr.shape}
    if not a.no_png:
        result["png"] = write_grid(arr, labels, png_path, per_class=a.grid_per_class)
    print(f"wrote {npz_path} (arr_0 {arr.shape} uint8)" + (f" and {png_path}" if not a.no_png else ""),
          file=sys.stderr)
    if using_dist:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
