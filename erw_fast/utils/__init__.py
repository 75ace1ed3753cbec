"""Small dependency-free helpers (PNG writing, image grids, progress bar)."""
from .png import image_grid, read_png, save_png_grid, write_png

__all__ = ["image_grid", "read_png", "save_png_grid", "write_png"]
