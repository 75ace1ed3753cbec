"""Small helpers: image grids and PNG files (NumPy + Pillow), progress bars (tqdm), distributed."""
from .images import image_grid, make_grid, read_png, save_png_grid, to_uint8, write_png

__all__ = ["image_grid", "make_grid", "read_png", "save_png_grid", "to_uint8", "write_png"]
