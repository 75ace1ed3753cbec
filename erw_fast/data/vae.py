"""The SD-VAE that maps images to latents and back (diffusers' AutoencoderKL, optional extra).

One place for the loader (a local folder, the Hugging Face cache, or a hub id when online), the
latent scale 0.18215 that REPA/ERW use, encoding to posterior moments and decoding latents.
"""
from __future__ import annotations

import os

import torch

SD_VAE_SCALE = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DATA_EXTRA = "pip install 'erw_fast[data]'  (diffusers, transformers, safetensors, pillow)"


def offline() -> bool:
    """True when HF_HUB_OFFLINE or ERW_FAST_OFFLINE asks for local files only."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "ERW_FAST_OFFLINE"))


def load_vae(path_or_id: str = DEFAULT_VAE, device="cpu", dtype=torch.float32):
    """An AutoencoderKL in eval mode without gradients, from a local folder or a hub id."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"the SD-VAE needs diffusers: {DATA_EXTRA}") from e
    local = os.path.isdir(path_or_id)
    if not local and path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--vae {path_or_id!r}: no such folder; pass a diffusers AutoencoderKL folder "
                                f"(e.g. from `huggingface-cli download {DEFAULT_VAE} --local-dir DIR`) or a hub id")
    if local and not os.path.isfile(os.path.join(path_or_id, "config.json")):
        raise FileNotFoundError(f"--vae {path_or_id!r} has no config.json; pass a folder written by "
                                "AutoencoderKL.save_pretrained (or downloaded with huggingface-cli)")
    errors = []
    tries = (True,) if (local or offline()) else (True, False)
    for local_only in tries:
        try:
            vae = AutoencoderKL.from_pretrained(path_or_id, local_files_only=local_only, torch_dtype=dtype)
            break
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        raise FileNotFoundError(
            f"could not load the VAE {path_or_id!r} ({'offline: ' if offline() else ''}{'; '.join(errors)}). "
            f"Provide it with --vae DIR (a diffusers folder, e.g. `huggingface-cli download {DEFAULT_VAE} "
            "--local-dir DIR` on a machine with internet) or put it in the Hugging Face cache (HF_HOME)")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float = SD_VAE_SCALE) -> torch.Tensor:
    """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1], float32."""
    p = next(vae.parameters())
    return vae.decode(latents.to(p.device, p.dtype) / scale).sample.float().clamp(-1, 1)


@torch.no_grad()
def encode_moments(vae, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → posterior mean ‖ std (B, 2C, H/f, W/f) float32."""
    p = next(vae.parameters())
    x = images_uint8.to(p.device, p.dtype) / 127.5 - 1.0
    posterior = vae.encode(x).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()
