"""Build entry for erw_fast.

The Triton kernels (one file per fused op) live in ``erw_fast/kernels/``; there is no top-level
``kernels`` folder, which would shadow the PyPI package of that name (a dependency of transformers)
whenever the repository root is on ``sys.path`` (``python -m ...`` run from it).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _readme():
    path = os.path.join(HERE, "README.md")
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


DATA_EXTRA = ["diffusers", "transformers", "safetensors"]
TB_EXTRA = ["tensorboard"]
# torchao's float8 training (--precision fp8); each torchao release follows one torch release
# (0.18 goes with torch 2.13, 0.17 with torch 2.11): install the one that matches your torch
FP8_EXTRA = ["torchao"]

packages = find_packages(include=["erw_fast", "erw_fast.*"])

setup(
    name="erw_fast",
    version="0.1.0",
    description="Fast, correct Embedded Representation Warmup (ERW) training for SiT/DiT",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_data={"erw_fast": ["assets/*"]},
    include_package_data=True,
    # torch>=2.5: torch.library.custom_op (2.4) and the public torch.distributed.tensor (2.5; ERW's
    # warmup -> full transfer reads the warmup weights through it). --fsdp (fully_shard) and the export
    # (aoti_compile_and_package) need >= 2.6; --precision fp8 needs torchao >= 0.17, i.e. torch >= 2.11.
    # Verified (tests run): torch 2.13.0 (CI, the local CPU wheel) and torch 2.11.0 + triton 3.6.0
    # (the GPU machine's stack; the CPU test files listed in docs/BENCHMARKS.md). Older versions: not run.
    # pillow: PNG files and sample grids (erw_fast.utils.images); tqdm: progress bars
    install_requires=["torch>=2.5", "numpy", "tqdm", "pillow"],
    extras_require={
        # real-scale inputs: SD-VAE latents (diffusers), DINOv2 (transformers), shards
        "data": DATA_EXTRA,
        # TensorBoard mirror of metrics.jsonl (scalars + sample grids under <out>/tb)
        "tb": TB_EXTRA,
        # torchao pinned to the release of the CI's torch (2.13.0): the fp8 tests and gpu_check's dry run
        "test": ["pytest", "pytest-benchmark", "triton", "matplotlib", "torchao==0.18.0"] + DATA_EXTRA + TB_EXTRA,
        "fp8": FP8_EXTRA,
        # the convergence study's plot (python -m erw_fast.convergence)
        "study": ["matplotlib"],
        "triton": ["triton"],
        "cuda": ["flash-attn", "xformers"],
    },
)
