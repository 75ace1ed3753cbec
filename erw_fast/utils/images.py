"""Image grids and PNG files (NumPy + Pillow).

Stable entry points:
- ``image_grid(images, nrow, pad=1, scale=1, value_range=(-1, 1))`` -> uint8 grid, (H', W') for one
  channel, (H', W', 3) for three; black padding (the training loop's sample grid).
- ``make_grid(images, nrow, padding=1, upscale=1, pad_value=1.0)`` -> uint8 (H', W', C) grid with
  ``pad_value`` padding (default white; the sampling CLI's grid).
- ``to_uint8(images)``: values in [-1, 1] to uint8 0..255 (rounded, clipped), shape kept.
- ``write_png(path, image)``: uint8 (H, W), (H, W, 1) or (H, W, 3) to a PNG (atomic; returns the path).
- ``save_png_grid(images, path, nrow, padding=1, upscale=1)``: ``make_grid`` + ``write_png``.
- ``read_png(path)``: a PNG back as uint8 (H, W) grey or (H, W, 3) RGB (tests, tools).

``images`` is (N, C, H, W), C = 1 or 3, a torch tensor or a NumPy array.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["to_uint8", "make_grid", "image_grid", "write_png", "read_png", "save_png_grid"]


def _as_numpy(images) -> np.ndarray:
    """A torch tensor (any device / dtype) as a float32 NumPy array; anything else via ``np.asarray``."""
    if hasattr(images, "detach"):
        return images.detach().float().cpu().numpy()
    return np.asarray(images)


def _check_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:  # (N, H, W): treat as grayscale
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (grayscale) or 3 (RGB) channels, got {x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("no images to write")
    return x


def _tile(img: np.ndarray, nrow: int, pad: int, fill: int, full_rows: bool) -> np.ndarray:
    """(N, H, W, C) uint8 to one (H', W', C) grid, ``nrow`` per row, ``pad`` pixels of ``fill`` around
    and between the images. ``full_rows``: the grid is always ``nrow`` images wide (else min(nrow, N))."""
    n, h, w, c = img.shape
    ncol = nrow if full_rows else min(nrow, n)
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = img[i]
    return grid


def image_grid(images, nrow: int, pad: int = 1, scale: int = 1, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) images in ``value_range`` to a uint8 grid with ``nrow`` images per row.

    One channel gives (H', W') grey, three give (H', W', 3). ``scale`` repeats pixels (nearest);
    padding is black. Values map as ``floor(clip((x - lo) / (hi - lo), 0, 1) * 255 + 0.5)`` in float32.
    """
    x = _check_nchw(_as_numpy(images).astype(np.float32, copy=False))
    lo, hi = value_range
    x = np.clip((x - np.float32(lo)) / np.float32(hi - lo), np.float32(0), np.float32(1))
    img = (x * np.float32(255) + np.float32(0.5)).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, H, W, C)
    if scale > 1:
        img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = _tile(img, int(nrow), int(pad), 0, full_rows=True)
    return grid[:, :, 0] if grid.shape[2] == 1 else grid


def to_uint8(images) -> np.ndarray:
    """Map values in [-1, 1] to uint8 0..255 (rounded, clipped); shape and layout are kept."""
    x = _as_numpy(images).astype(np.float64)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow: int, padding: int = 1, upscale: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 (H', W', C) image, ``nrow`` images per row.

    Each image is enlarged ``upscale`` times (nearest neighbour), then images are separated and
    framed by ``padding`` pixels of ``pad_value`` (in [-1, 1]; default white).
    """
    x = _check_nchw(_as_numpy(images))
    nrow, padding, upscale = int(nrow), int(padding), int(upscale)
    if nrow < 1 or padding < 0 or upscale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, upscale >= 1; got {nrow}, {padding}, {upscale}")
    img = to_uint8(x).transpose(0, 2, 3, 1)  # (N, H, W, C)
    if upscale > 1:
        img = img.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return _tile(img, nrow, padding, int(to_uint8(np.array(pad_value))), full_rows=False)


def write_png(path: str, image) -> str:
    """Write a uint8 image (H, W) grey, (H, W, 1) grey or (H, W, 3) RGB to ``path`` (atomically); returns the path."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png wants uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"write_png wants (H, W) or (H, W, 3), got {a.shape}")
    pil = Image.fromarray(np.ascontiguousarray(a))  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    pil.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_png_grid(images, path: str, nrow: int, padding: int = 1, upscale: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid with ``nrow`` images per row.

    Grayscale for C = 1, RGB for C = 3. Returns the uint8 grid that was written (H', W', C).
    """
    grid = make_grid(images, nrow, padding=padding, upscale=upscale, pad_value=pad_value)
    write_png(path, grid)
    return grid


def read_png(path: str) -> np.ndarray:
    """Read a PNG back as uint8: (H, W) for grayscale, (H, W, 3) for anything else (converted to RGB)."""
    with Image.open(path) as im:
        if im.format != "PNG":
            raise ValueError(f"{path} is not a PNG file")
        if im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
        return np.array(im, dtype=np.uint8)
