"""The sample grid a run writes (EMA model, one row per class) and, on the digits, how many of its
images the project's independent digits classifier reads as the requested digit."""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from ..data.digits import is_digits
from ..utils.distributed import barrier

from ..utils.seeding import GRID_SEED_OFFSET


def sample_and_save(cfg, ema_model, data, device, step: int, amp: bool, main: bool, log, result, world: int,
                    stop=lambda steps: steps):
    """EMA sample grid → samples/<step>.png, samples.png and TensorBoard image ``samples/grid`` (latent data:
    also the latents as .pt). ``stop`` wraps the sampler's step range (``StopSignals.checked``: a stop
    signal ends the grid with ``StopRequested`` before anything of it is written)."""
    if main:
        from ..sampling import sample_grid
        from ..utils.images import image_grid, write_png
        from ..utils.progress import progress

        t0 = time.time()
        ema_model.eval()
        latent = data.is_latent
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            imgs = sample_grid(ema_model, data.num_classes, cfg.samples_per_class,
                               (data.channels, data.input_size, data.input_size), sampler=cfg.sampler,
                               steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                               guidance_interval=(0.0, cfg.guidance_high), seed=cfg.seed + GRID_SEED_OFFSET,
                               device=device, classes=data.sample_classes(),
                               progress=lambda steps: progress(stop(steps), desc=f"sample grid @ {step}",
                                                               unit="step", disable=not cfg.progress))
        path = None
        if latent:  # keep the latents; decode with the dataset's VAE when it is available locally
            torch.save({"latents": imgs.float().cpu(), "classes": data.sample_classes(), "step": step},
                       os.path.join(cfg.out, "samples", f"{step:07d}.pt"))
            imgs = data.decode(imgs.float())
        if imgs is not None:
            imgs = imgs.float().clamp(-1, 1).cpu()
            grid = image_grid(imgs, nrow=cfg.samples_per_class, pad=1, scale=1 if latent else 2)
            path = write_png(os.path.join(cfg.out, "samples", f"{step:07d}.png"), grid)
            write_png(os.path.join(cfg.out, "samples.png"), grid)
            log.image("samples/grid", grid, step)
            result.samples_png = os.path.join(cfg.out, "samples.png")
        rec = {"event": "samples", "step": step, "path": path, "seconds": time.time() - t0}
        acc = digit_accuracy(imgs, data.digits, cfg.samples_per_class) if is_digits(cfg.data) else None
        if acc is not None:
            rec["sample_accuracy"] = acc
            result.summary["sample_accuracy"] = acc
        log.write(rec)
    barrier(world)


def digit_accuracy(imgs, digits, per_class) -> Optional[float]:
    """Fraction of a class-major grid (class k: the digit ``digits[k]``) that the project's independent
    digits classifier reads as the requested digit (None when the classifier is not available)."""
    try:
        from ..evaluation.digits_classifier import predict
    except Exception:
        return None
    try:
        labels = torch.as_tensor(list(digits)).repeat_interleave(per_class)
        return float((predict(imgs) == labels).float().mean())
    except Exception:
        return None
