"""Evaluation internals: the embedded digits classifier/feature network, its training script, and
the Inception-v3 loader for ImageNet FID. The public entry points live in ``erw_fast.metrics``."""
