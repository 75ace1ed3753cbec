"""Dependency-free PNG writing (zlib + struct) for sample grids.

``save_png_grid(images, path, nrow, padding=1, upscale=1)`` is the stable entry point: images in
[-1, 1], shape (N, C, H, W) with C = 1 (grayscale) or 3 (RGB), as a torch tensor or NumPy array.
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

__all__ = ["to_uint8", "make_grid", "write_png", "read_png", "save_png_grid"]


def _as_numpy(images) -> np.ndarray:
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
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


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png(image, path: str) -> None:
    """Write a uint8 image (H, W), (H, W, 1) or (H, W, 3) as an 8-bit grayscale or RGB PNG."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8 pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        color_type, channels = 0, 1
    elif a.ndim == 3 and a.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"image must be (H, W) or (H, W, 1|3), got shape {a.shape}")
    height, width = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_png(path: str) -> np.ndarray:
    """Read back an 8-bit grayscale/RGB, non-interlaced PNG (as written by :func:`write_png`)."""
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
        cur = np.zeros_like(line)
        for i in range(len(line)):
            a = cur[i - ch] if i >= ch else 0
            b = prev[i]
            c = prev[i - ch] if i >= ch else 0
            if ftype == 0:
                pred = 0
            elif ftype == 1:
                pred = a
            elif ftype == 2:
                pred = b
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


def save_png_grid(images, path: str, nrow: int, padding: int = 1, upscale: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid with ``nrow`` images per row.

    Grayscale for C = 1, RGB for C = 3. Returns the uint8 grid that was written (H', W', C).
    """
    grid = make_grid(images, nrow, padding=padding, upscale=upscale, pad_value=pad_value)
    write_png(grid, path)
    return grid
