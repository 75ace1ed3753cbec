"""Small dependency-free utilities (PNG writing, progress bars)."""
