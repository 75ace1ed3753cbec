"""Shared test set-up.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET must be set before
the kernel modules are imported, so it is set here, first, when no CUDA device is present.
"""
import os

if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"


# --------------------------------------------------------------------------------------------
# shared fixtures
# --------------------------------------------------------------------------------------------
import socket  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    """A random-weight DINOv2 saved as a local transformers folder (nothing is downloaded)."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=14, image_size=28)
    d = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(cfg).eval().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A random-weight SD-VAE-shaped AutoencoderKL (8x down, 4 latent channels, 32-px samples) saved as a
    local diffusers folder (nothing is downloaded)."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    d = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(d)
    return str(d)


@pytest.fixture
def free_port():
    """A free TCP port on the loopback, for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
