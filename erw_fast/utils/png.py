"""Dependency-free PNG writing (zlib + struct; no PIL/matplotlib) and image-grid helpers.

Stable entry points:
- ``save_png_grid(images, path, nrow, padding=1, upscale=1)``: (N, C, H, W) images in [-1, 1],
  C = 1 (grayscale) or 3 (RGB), tensor or NumPy array, written as one PNG grid, ``nrow`` images per row.
- ``image_grid(images, nrow, pad=1, scale=1, value_range=(-1, 1))`` -> uint8 grid (the training
  loop's helper) and ``write_png(path, image)`` (uint8 (H, W) or (H, W, 3); atomic; returns the path).
- ``read_png(path)`` reads these files back (tests, tools).
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch

__all__ = ["to_uint8", "make_grid", "image_grid", "write_png", "read_png", "save_png_grid"]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png(path: str, image) -> str:
    """Write a uint8 image (H, W) grey, (H, W, 1) grey or (H, W, 3) RGB to ``path`` (atomically); returns the path."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png wants uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"write_png wants (H, W) or (H, W, 3), got {a.shape}")
    h, w = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)
    return path


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) images in ``value_range`` to a uint8 grid with ``nrow`` images per row.

    One channel gives (H', W') grey, three give (H', W', 3). ``scale`` repeats pixels (nearest).
    """
    x = images.detach().float().cpu()
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = x.shape
    ncol_rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    out = (grid * 255 + 0.5).to(torch.uint8).numpy()
    return out[0] if c == 1 else np.ascontiguousarray(out.transpose(1, 2, 0))


def _as_numpy(images) -> np.ndarray:
    if torch.is_tensor(images):
        images = images.detach().float().cpu().numpy()
    return np.asarray(images)


def to_uint8(images) -> np.ndarray:
    """Map values in [-1, 1] to uint8 0..255 (rounded, clipped); shape and layout are kept."""
    x = _as_numpy(images).astype(np.float64)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow: int, padding: int = 1, upscale: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 (H', W', C) image, ``nrow`` images per row.

    Each image is enlarged ``upscale`` times (nearest neighbour), then images are separated and
    framed by ``padding`` pixels of ``pad_value`` (in [-1, 1]; default white).
    """
    x = _as_numpy(images)
    if x.ndim == 3:  # (N, H, W): treat as grayscale
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (grayscale) or 3 (RGB) channels, got {c}")
    if n == 0:
        raise ValueError("no images to write")
    nrow, padding, upscale = int(nrow), int(padding), int(upscale)
    if nrow < 1 or padding < 0 or upscale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, upscale >= 1; got {nrow}, {padding}, {upscale}")
    img = to_uint8(x).transpose(0, 2, 3, 1)  # (N, H, W, C)
    if upscale > 1:
        img = img.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
    ncol = min(nrow, n)
    rows = (n + nrow - 1) // nrow
    fill = int(to_uint8(np.array(pad_value)))
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = img[i]
    return grid


def save_png_grid(images, path: str, nrow: int, padding: int = 1, upscale: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid with ``nrow`` images per row.

    Grayscale for C = 1, RGB for C = 3. Returns the uint8 grid that was written (H', W', C).
    """
    grid = make_grid(images, nrow, padding=padding, upscale=upscale, pad_value=pad_value)
    write_png(path, grid)
    return grid


def read_png(path: str) -> np.ndarray:
    """Read back an 8-bit grayscale/RGB, non-interlaced PNG (any filter types)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        elif tag == b"IEND":
            break
    width, height, depth, color_type, _, _, interlace = header
    if depth != 8 or color_type not in (0, 2) or interlace:
        raise ValueError("read_png supports only 8-bit grayscale/RGB non-interlaced PNGs")
    ch = 1 if color_type == 0 else 3
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * ch)
    out = np.zeros((height, width * ch), np.int32)
    prev = np.zeros(width * ch, np.int32)
    for y in range(height):  # undo the five PNG filters
        ftype, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        else:
            cur = np.zeros_like(line)
            for i in range(len(line)):
                a = cur[i - ch] if i >= ch else 0
                b = prev[i]
                c = prev[i - ch] if i >= ch else 0
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) & 0xFF
        out[y], prev = cur, cur
    out = out.astype(np.uint8).reshape(height, width, ch)
    return out[:, :, 0] if ch == 1 else out
