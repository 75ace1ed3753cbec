"""DINOv2 target encoders: ``dinov2-vit-{s,b,l,g}`` and ``dinov2-vit-{s,b,l,g}_reg`` (with registers).

Two loading routes, chosen with ``source=``:

* ``"transformers"``: Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel``, from a local
  folder (``path=``, a ``save_pretrained`` folder) or the hub id ``facebook/dinov2-*`` (taken from the
  local Hugging Face cache first; downloaded only when the machine is online and ``HF_HUB_OFFLINE``
  is not set).
* ``"hub"``: ``torch.hub`` — a local clone of ``facebookresearch/dinov2`` (``path=``, a folder with
  ``hubconf.py``), or the torch hub cache (``torch.hub.get_dir()``), or GitHub when online.
* ``"auto"`` (default): a ``path`` with ``hubconf.py`` → hub, with ``config.json`` → transformers;
  no path → the Hugging Face cache, then the torch hub cache, then a download.

Input: **raw pixels**, ``(B, 3, H, W)`` uint8 or float in [0, 255] (for latent models the batch carries
them as ``encoder_images``). Preprocessing follows REPA: ÷255, ImageNet mean/std, bicubic resize —
to ``token_grid · patch`` pixels, so that the patch grid equals the SiT token grid (224 px = 16×16
for 256-px images and SiT-*/2; REPA's 224·res/256). The position embedding is resampled once, at
build time, to that grid (antialiased bicubic, as REPA does), so the forward pass uses it as is. Output: the final-LayerNorm patch
tokens ``(B, T, C)`` (``x_norm_patchtokens``), no CLS or register tokens.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import TargetEncoder, register_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# size letter → (HF suffix, hub arch letter, width)
_SIZES = {"s": ("small", "s", 384), "b": ("base", "b", 768), "l": ("large", "l", 1024), "g": ("giant", "g", 1536)}

DATA_EXTRA = "pip install 'erw_fast[data]'  (or: pip install transformers)"


def hf_id(size: str, registers: bool) -> str:
    return f"facebook/dinov2-{'with-registers-' if registers else ''}{_SIZES[size][0]}"


def hub_entry(size: str, registers: bool) -> str:
    return f"dinov2_vit{_SIZES[size][1]}14{'_reg' if registers else ''}"


class EncoderWeightsError(FileNotFoundError):
    """Weights of a target encoder could not be found (offline, no local copy)."""


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ERW_FAST_OFFLINE"))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _import_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the transformers route of the DINOv2 encoders needs the 'transformers' package: "
            f"{DATA_EXTRA}; or load through torch.hub with source='hub' (--encoder-source hub)"
        ) from e
    import transformers

    return transformers


def load_transformers(path: Optional[str], size: str, registers: bool):
    """(model, patch_size, dim, num_prefix_tokens) from a local folder or the HF id."""
    tf = _import_transformers()
    ident = hf_id(size, registers)
    if path is not None:
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise EncoderWeightsError(
                f"DINOv2 weights folder {path!r} not found or has no config.json; pass a folder written by "
                f"`save_pretrained` (e.g. `huggingface-cli download {ident} --local-dir DIR`) or a torch.hub "
                "clone of facebookresearch/dinov2 with --encoder-source hub")
        src, kw = path, dict(local_files_only=True)
    else:
        src, kw = ident, dict(local_files_only=True)
    cfg = None
    errors = []
    for local_only in ((True,) if (path is not None or _offline()) else (True, False)):
        kw["local_files_only"] = local_only
        try:
            cfg = tf.AutoConfig.from_pretrained(src, **kw)
            cls = tf.Dinov2WithRegistersModel if cfg.model_type == "dinov2_with_registers" else tf.Dinov2Model
            if cfg.model_type not in ("dinov2", "dinov2_with_registers"):
                raise ValueError(f"{src} holds a {cfg.model_type!r} model, not DINOv2")
            model = cls.from_pretrained(src, **kw)
            break
        except ValueError:
            raise
        except Exception as e:  # OSError / HTTP errors / missing files
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        raise EncoderWeightsError(
            f"could not load DINOv2 {ident!r} ({'from ' + repr(path) if path else 'from the local Hugging Face cache'}"
            f"{'' if path or _offline() else ' or the internet'}): {'; '.join(errors)}. Provide the weights "
            f"with --encoder-path DIR (a `save_pretrained` folder, e.g. `huggingface-cli download {ident} "
            "--local-dir DIR` on a machine with internet), or put them in the HF cache (HF_HOME), or use a local "
            "torch.hub clone with --encoder-source hub")
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    _warn_mismatch(f"{src}", size, registers, int(model.config.hidden_size), prefix > 1)
    return model, int(model.config.patch_size), int(model.config.hidden_size), prefix


def _warn_mismatch(src: str, size: str, registers: bool, width: int, has_registers: bool) -> None:
    """Weights that do not look like the named encoder (a ViT-B folder under dinov2-vit-l, ...)."""
    import warnings

    name = f"dinov2-vit-{size}{'_reg' if registers else ''}"
    if width != _SIZES[size][2]:
        warnings.warn(f"{name}: the weights in {src} have width {width}, not {_SIZES[size][2]} (ViT-{size.upper()}); "
                      "using them as they are", stacklevel=3)
    if has_registers != registers:
        warnings.warn(f"{name}: the weights in {src} are {'with' if has_registers else 'without'} register tokens",
                      stacklevel=3)


def load_hub(path: Optional[str], size: str, registers: bool, pretrained: bool = True):
    """(model, patch_size, dim) from a local dinov2 repo folder, the torch hub cache or GitHub."""
    entry = hub_entry(size, registers)
    if path is not None:
        if not os.path.isfile(os.path.join(path, "hubconf.py")):
            raise EncoderWeightsError(
                f"torch.hub route: {path!r} has no hubconf.py; pass a local clone of "
                "https://github.com/facebookresearch/dinov2 (its checkpoints go in the torch hub cache, "
                f"{torch.hub.get_dir()}/checkpoints), or a transformers folder with --encoder-source transformers")
        repo, source = path, "local"
    else:
        cached = os.path.join(torch.hub.get_dir(), "facebookresearch_dinov2_main")
        if os.path.isfile(os.path.join(cached, "hubconf.py")):
            repo, source = cached, "local"
        elif _offline():
            raise EncoderWeightsError(
                f"torch.hub route offline: no cached dinov2 repository at {cached}; pass a local clone with "
                "--encoder-path DIR (and its weights in the torch hub cache), or use --encoder-source transformers")
        else:
            repo, source = "facebookresearch/dinov2", "github"
    try:
        model = torch.hub.load(repo, entry, source=source, pretrained=pretrained, trust_repo=True) \
            if source == "github" else torch.hub.load(repo, entry, source="local", pretrained=pretrained)
    except Exception as e:
        raise EncoderWeightsError(
            f"torch.hub could not build {entry!r} from {repo!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"check the folder, or that the weights are in {torch.hub.get_dir()}/checkpoints when offline") from e
    patch = getattr(model, "patch_size", 14)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    dim = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))
    return model, patch, dim


def _hf_cached(ident: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(ident, "config.json"), str)
    except Exception:
        return False


def resample_pos_embed(pos: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """(1, P + G0², C) absolute position embedding → (1, P + grid², C): the P prefix (CLS) rows kept,
    the patch rows resampled on the 2-D grid with antialiased bicubic interpolation (as REPA does
    once at load time, so the forward pass needs no per-call interpolation)."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    g0 = int(round(patches.shape[1] ** 0.5))
    if g0 * g0 != patches.shape[1]:
        raise ValueError(f"position embedding with {patches.shape[1]} patch rows is not a square grid")
    if g0 == grid:
        return pos
    c = patches.shape[-1]
    x = patches.reshape(1, g0, g0, c).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos.dtype)
    return torch.cat([prefix, x], dim=1)


def _set_grid(model: nn.Module, kind: str, grid: int) -> None:
    """Resample the model's position embedding to ``grid``² patches (where it has one)."""
    if kind == "transformers":
        emb = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    else:
        emb = getattr(model, "pos_embed", None)
    if isinstance(emb, nn.Parameter) and emb.dim() == 3:
        with torch.no_grad():
            new = resample_pos_embed(emb.data, grid)
        if new.shape != emb.shape:
            emb.data = new
        if kind == "transformers" and hasattr(model.config, "image_size"):
            model.config.image_size = grid * int(model.config.patch_size)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------
class DINOv2Encoder(TargetEncoder):
    """TargetEncoder over a DINOv2 ViT: raw pixels (B, 3, H, W) in [0, 255] → patch tokens (B, G², C)."""

    input_range = "uint8"  # raw pixels in [0, 255], RGB (``metrics.EncoderFeatures`` converts [-1, 1] images)

    def __init__(self, model: nn.Module, kind: str, patch_size: int, dim: int, token_grid: int, name: str,
                 num_prefix_tokens: int = 1):
        super().__init__()
        if token_grid < 1:
            raise ValueError(f"encoder {name!r}: token grid must be >= 1, got {token_grid}")
        self.model = model
        self.kind = kind
        self.patch_size = patch_size
        self.dim = dim
        self.token_grid = token_grid
        self.name = name
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        """Pixels per side fed to the ViT: token_grid × patch (224 for 16 × 14)."""
        return self.token_grid * self.patch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder {self.name!r} takes raw RGB images (B, 3, H, W) in [0, 255]; got shape "
                             f"{tuple(images.shape)} (latent models must pass the batch's encoder_images)")
        x = images.float() / 255.0
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image embedding (B, C): the final-norm CLS token, what ``model(x)`` returns in DINOv2's own
        code and what Stein et al. (2023) / EDM2 take for FD_DINOv2 (``EncoderFeatures`` uses it)."""
        x = self.preprocess(images)
        if self.kind == "hub":
            return self.model.forward_features(x)["x_norm_clstoken"]
        return self.model(pixel_values=x).last_hidden_state[:, 0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.kind == "hub":
            tokens = self.model.forward_features(x)["x_norm_patchtokens"]
        else:
            out = self.model(pixel_values=x)
            tokens = out.last_hidden_state[:, self.num_prefix_tokens:]
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"encoder {self.name!r} returned {tokens.shape[1]} patch tokens for a {self.image_size}-px input, "
                f"expected {self.token_grid}x{self.token_grid} = {self.num_tokens}: the grid cannot match the "
                "model's token grid (does the model interpolate its position embeddings?)")
        return tokens


def build_dinov2(size: str, registers: bool, path: Optional[str] = None, source: str = "auto",
                 token_grid: Optional[int] = None, input_size: Optional[int] = None, patch_size: int = 2,
                 pretrained: bool = True, **_ignored) -> DINOv2Encoder:
    """Build ``dinov2-vit-<size>[_reg]``.

    ``token_grid``: patch tokens per side to produce (= the SiT token grid). When omitted it is
    ``input_size // patch_size`` (``input_size`` the model's input side, e.g. the 32-px latent; the
    model patch 2 by default), else 16 (REPA's 224-px input).
    """
    name = f"dinov2-vit-{size}{'_reg' if registers else ''}"
    if token_grid is None:
        token_grid = (input_size // patch_size) if input_size else 16
    if source == "auto":
        if path is not None:
            if os.path.isfile(os.path.join(path, "hubconf.py")):
                source = "hub"
            elif os.path.isfile(os.path.join(path, "config.json")):
                source = "transformers"
            else:
                raise EncoderWeightsError(
                    f"--encoder-path {path!r} is neither a transformers folder (config.json) nor a torch.hub "
                    f"repository (hubconf.py); provide one of them for {name}")
        else:
            try:
                _import_transformers()
                have_tf = True
            except ImportError:
                have_tf = False
            hub_cached = os.path.isfile(os.path.join(torch.hub.get_dir(), "facebookresearch_dinov2_main", "hubconf.py"))
            if have_tf and _hf_cached(hf_id(size, registers)):
                source = "transformers"
            elif hub_cached:
                source = "hub"
            elif have_tf:
                source = "transformers"  # download when online, else a clear error
            else:
                source = "hub"
    if source == "transformers":
        model, patch, dim, prefix = load_transformers(path, size, registers)
        kind = "transformers"
    elif source == "hub":
        model, patch, dim = load_hub(path, size, registers, pretrained=pretrained)
        prefix, kind = 0, "hub"
    else:
        raise ValueError(f"encoder source {source!r}: use 'auto', 'transformers' or 'hub'")
    model.eval()
    if int(token_grid) >= 1:
        _set_grid(model, kind, int(token_grid))
    return DINOv2Encoder(model, kind, patch, dim, int(token_grid), name, prefix)


def _register(size: str, registers: bool):
    name = f"dinov2-vit-{size}{'_reg' if registers else ''}"

    @register_encoder(name)
    def _build(**kwargs):
        return build_dinov2(size, registers, **kwargs)

    _build.__name__ = f"build_{name.replace('-', '_')}"
    return _build


for _s in _SIZES:
    for _r in (False, True):
        _register(_s, _r)
