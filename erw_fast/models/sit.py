"""SiT backbone with REPA's (and ERW's) parameter names, so their checkpoints load unchanged.

Layout, top to bottom: embedders (patch, timestep, label), the fixed 2-D sin-cos position
embedding, the optional 2-D rotary embedding (ERW), attention and MLP, the adaLN-Zero block, the
final layer, the projector MLPs, and `SiT` itself with its size registry `SiT_models`.

Conventions kept from REPA/ERW:
- time ``t`` in [0, 1] with t = 0 data and t = 1 noise, fed raw to the sinusoidal embedder;
- ``forward(x, t, y) -> (output, zs)``, ``zs`` one entry per target encoder: the projected tokens
  of block ``encoder_depth``;
- the label table has ``num_classes + 1`` rows when label dropout is on (last row = null class).

Beyond REPA: ``use_rope`` (2-D rotary embedding on q and k, no parameters), pluggable attention
(``attn_backend``), fused Triton ops for LayerNorm+modulate and the gated residual (``fused``),
``forward_warmup`` that runs only the first L blocks (ERW phase 1), and working S configs.
With RoPE and QK-norm off the model computes exactly what REPA's does.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.utils.checkpoint
import torch.nn as nn

from .. import ops
from .attention import attention, resolve_backend, xformers_usable


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    """adaLN modulation of tokens ``x`` (B, T, D) by per-sample ``shift``/``scale`` (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector: Linear-SiLU-Linear-SiLU-Linear (keys ``0``, ``2``, ``4``)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, embed_dim), as MAE/DiT/REPA build it."""
    if embed_dim % 4 != 0:
        raise ValueError(f"hidden_size={embed_dim} must be divisible by 4 for the 2-D sin-cos embedding")
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # w goes first, as in the reference implementations
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)

    def one_axis(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb_h = one_axis(embed_dim // 2, grid[0])
    emb_w = one_axis(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10000.0):
    """cos/sin tables (T, head_dim) of an axial 2-D rotary embedding.

    The first half of each head's channels rotates with the token's row, the second half with
    its column; channels are rotated in adjacent pairs.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"use_rope needs a head dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    pos = torch.arange(grid_size, dtype=torch.float64)
    ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (G, axis_dim)
    rows = ang[:, None, :].expand(grid_size, grid_size, axis_dim)
    cols = ang[None, :, :].expand(grid_size, grid_size, axis_dim)
    full = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return full.cos().float(), full.sin().float()


def apply_rope(x, cos, sin):
    """Rotate adjacent channel pairs of ``x`` (B, H, T, Dh) by the angles in cos/sin (T, Dh)."""
    x_pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    return (x * cos + rotated * sin).to(x.dtype)


_GELU_K2 = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_as_sigmoid(x):
    """tanh-approximated GELU written as ``x * sigmoid(2u)``, u = sqrt(2/pi) (x + 0.044715 x^3).

    Exactly ``0.5 x (1 + tanh(u))`` (0.5 (1 + tanh u) = sigmoid(2u)); only the rounding differs.
    Used inside compiled CPU graphs, where Inductor's code for it is about 2x faster than for the
    tanh form (its vectorised tanh is the expensive part, and the backward recomputes the
    activation; see docs/BENCHMARKS.md).
    """
    return x * torch.sigmoid(_GELU_K2 * (x + 0.044715 * x * x * x))


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Image (B, C, H, W) to patch tokens (B, T, D) with one strided convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # Contiguous (B, T, D) tokens: the transposed view (strides (T*D, 1, T)) would make every
        # block's first LayerNorm read across rows, and Inductor (torch 2.13, CPU) computes the
        # compiled block's backward about 3e-3 off on that layout (docs/BENCHMARKS.md).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Scalar time to a vector: sinusoidal features (256 frequencies) then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000):
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class labels to vectors; the extra last row is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, use_cfg: bool = False):
        super().__init__()
        has_null = dropout_prob > 0 or use_cfg
        self.embedding_table = nn.Embedding(num_classes + int(has_null), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids.to(torch.bool)
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Transformer parts
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``, ``q_norm``...)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.backend = resolve_backend(backend)
        # probed once here, outside any compiled region; the auto dispatch reads the stored answer
        self.xformers_ok = self.backend == "auto" and xformers_usable()

    def forward(self, x, rope=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # under CUDA autocast the LayerNorms run in fp32: bring q and k back to v's dtype so every
        # backend (flash-attn, xformers) gets one dtype (SDPA would cast implicitly)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = attention(q, k, v, self.backend, self.scale, xformers_ok=self.xformers_ok)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm ``Mlp`` names ``fc1``/``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        if h.device.type == "cpu" and torch.compiler.is_compiling():
            h = gelu_tanh_as_sigmoid(h)  # the same function; cheaper in Inductor's CPU code
        else:
            h = self.act(h)
        return self.fc2(h)


class _FusedMixin:
    """Shared dispatch between the fused ops and the plain PyTorch expressions.

    ``fused_mode`` is the model's fused setting (None, True, False, "auto", "triton", "torch"),
    turned into "plain PyTorch or which backend" by ``erw_fast.ops.resolve_fused`` for the device of
    each call's tensors (so a model built on CPU and moved to CUDA gets the fused ops with the
    default None).  The decision uses only static tensor properties, so it is safe under torch.compile.
    """

    fused_mode = None

    def _backend_for(self, x):
        return ops.resolve_fused(self.fused_mode, x.device) or None

    def _norm_modulate(self, norm, x, shift, scale):
        backend = self._backend_for(x)
        if backend is None:
            return modulate(norm(x), shift, scale)
        return ops.layernorm_modulate(x, shift, scale, eps=norm.eps, backend=backend)

    def _gated_residual(self, x, gate, y):
        backend = self._backend_for(x)
        if backend is None:
            return x + gate.unsqueeze(1) * y
        return ops.gated_residual(x, gate, y, backend=backend)


class SiTBlock(_FusedMixin, nn.Module):
    """adaLN-Zero transformer block: modulated attention and MLP with gated residuals."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = self._gated_residual(x, gate_msa, self.attn(self._norm_modulate(self.norm1, x, shift_msa, scale_msa), rope))
        x = self._gated_residual(x, gate_mlp, self.mlp(self._norm_modulate(self.norm2, x, shift_mlp, scale_mlp)))
        return x


class FinalLayer(_FusedMixin, nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self._norm_modulate(self.norm_final, x, shift, scale))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class SiT(nn.Module):
    """Scalable Interpolant Transformer with REPA's projector heads (drop-in for REPA/ERW's SiT)."""

    def __init__(
        self,
        path_type: str = "edm",
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        decoder_hidden_size: Optional[int] = None,
        encoder_depth: int = 8,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_cfg: bool = False,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        fused_attn: bool = True,
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        attn_backend: str = "auto",
        fused=None,
    ):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if input_size % patch_size != 0:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth={encoder_depth} must be between 1 and depth={depth}")
        if decoder_hidden_size is not None and decoder_hidden_size != hidden_size:
            # REPA's S configs pass 768 here with hidden 384 and cannot run; the final layer reads
            # the last block's tokens, so it must be built at hidden_size.
            warnings.warn(
                f"decoder_hidden_size={decoder_hidden_size} differs from hidden_size={hidden_size}; "
                "the final layer is built at hidden_size (REPA's S configs carry this mismatch)",
                stacklevel=2,
            )
        # path_type and fused_attn are accepted for REPA compatibility; every attention backend
        # computes the same function, and the interpolant lives in erw_fast.transport.
        self.path_type = path_type
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.depth = depth
        self.z_dims = list(z_dims)
        self.use_rope = use_rope
        self.qk_norm = qk_norm

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, use_cfg)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, attn_backend) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if use_rope:
            cos, sin = rope_2d_tables(hidden_size // num_heads, self.x_embedder.grid_size, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.set_fused(fused)
        self.initialize_weights()

    # ---- set-up ------------------------------------------------------------------------------
    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = sincos_pos_embed_2d(self.hidden_size, self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def set_fused(self, fused=None):
        """Choose the fused-op path (``erw_fast.ops.resolve_fused`` decides per call's device):
        None / "auto" = fused ops for CUDA tensors when Triton imports, plain PyTorch otherwise;
        True = the custom ops with backend "auto"; False = plain PyTorch; "triton" / "torch" = the
        custom ops with that backend."""
        ops.check_fused(fused)
        if (fused is None or fused == "auto") and torch.cuda.is_available():
            ops.triton_available()  # probe now, outside any compiled region (cached afterwards)
        self.fused = fused
        for m in self.modules():
            if isinstance(m, _FusedMixin):
                m.fused_mode = fused

    # ---- checks ------------------------------------------------------------------------------
    def check_inputs(self, x, t, y):
        """Value checks for (x, t, y); call before a compiled forward (shape checks live inside)."""
        self._check_shapes(x, t, y)
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels y must be an integer tensor, got {y.dtype}")
        n_rows = self.y_embedder.embedding_table.num_embeddings
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_rows):
            raise ValueError(
                f"label out of range: got values in [{int(y.min())}, {int(y.max())}], "
                f"valid ids are 0..{self.num_classes - 1}"
                + (f" and {self.num_classes} (null class)" if n_rows > self.num_classes else "")
            )
        if not torch.isfinite(t).all():
            raise ValueError("time t contains NaN or inf")

    def _check_shapes(self, x, t, y):
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the model expects in_channels={self.in_channels}")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by patch_size={self.patch_size}"
            )
        if x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} does not match input_size={self.input_size}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"t and y must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)} and {tuple(y.shape)}"
            )

    # ---- forward -----------------------------------------------------------------------------
    def _rope(self):
        return (self.rope_cos, self.rope_sin) if self.use_rope else None

    def embed(self, x, t, y, force_drop_ids=None):
        """Tokens (B, T, D) with position embedding, and the conditioning vector c (B, D)."""
        self._check_shapes(x, t, y)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return h, c

    def project(self, h):
        """Apply every projector to tokens (B, T, D): a list of (B, T, z_dim)."""
        return [projector(h) for projector in self.projectors]

    def unpatchify(self, x):
        """(B, T, p*p*C) tokens back to (B, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        g = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y, force_drop_ids=None, return_hidden: bool = False):
        """Velocity prediction and aligned features: ``(out, zs)``.

        ``force_drop_ids`` (bool, (B,)) replaces the random label dropout (the trainer draws it
        per sample index so runs are reproducible across GPU counts). ``return_hidden`` returns
        the tokens of block ``encoder_depth`` instead of their projections (for fused losses).
        """
        h, c = self.embed(x, t, y, force_drop_ids)
        rope = self._rope()
        feat = None
        for i, block in enumerate(self.blocks):
            h = self._block(block, h, c, rope)
            if i + 1 == self.encoder_depth:
                feat = h
        out = self.unpatchify(self.final_layer(h, c))
        return out, (feat if return_hidden else self.project(feat))

    def forward_warmup(self, x, t, y, num_blocks: int, force_drop_ids=None, return_hidden: bool = False):
        """Run only blocks ``0 .. num_blocks-1`` (ERW's warmup region); nothing after them is computed.

        Returns the projected tokens ``zs`` (or the raw tokens with ``return_hidden``).
        """
        if not 1 <= num_blocks <= len(self.blocks):
            raise ValueError(f"num_blocks={num_blocks} must be between 1 and depth={len(self.blocks)}")
        h, c = self.embed(x, t, y, force_drop_ids)
        rope = self._rope()
        for block in self.blocks[:num_blocks]:
            h = self._block(block, h, c, rope)
        return h if return_hidden else self.project(h)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> "SiT":
        """Recompute each block's activations in the backward instead of keeping them
        (``torch.utils.checkpoint``, non-reentrant): activation memory of one block instead of all."""
        self.grad_checkpointing = bool(enabled)
        return self

    def _block(self, block, h, c, rope):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, c, rope, use_reentrant=False)
        return block(h, c, rope)

    def compile_blocks(self, **compile_kwargs) -> "SiT":
        """Compile each block with ``torch.compile(fullgraph=True)`` (the blocks share one graph).

        Much cheaper to compile than the whole model, and the block is where the fusable
        elementwise work lives (LayerNorm, modulate, RoPE, GELU, residuals). The projector heads
        stay eager: compiled, their forward+backward was no faster on CPU (docs/BENCHMARKS.md).
        Returns ``self``.
        """
        compile_kwargs.setdefault("fullgraph", True)
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def config(self) -> dict:
        """Constructor keywords that rebuild this architecture (a plain dict)."""
        return dict(
            input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
            hidden_size=self.hidden_size, encoder_depth=self.encoder_depth, depth=self.depth,
            num_heads=self.num_heads, mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.hidden_size
            if len(self.blocks) else 4.0,
            class_dropout_prob=self.y_embedder.dropout_prob, num_classes=self.num_classes,
            z_dims=list(self.z_dims),
            projector_dim=self.projectors[0][0].out_features if len(self.projectors) else 2048,
            qk_norm=self.qk_norm, use_rope=self.use_rope,
        )


# --------------------------------------------------------------------------------------------
# Registry: REPA's sizes (depth / hidden / heads), plus tiny configs for CPU work.  Architecture
# only: the alignment block ``encoder_depth`` is a training choice (ERW's per-size recipe lives in
# erw_fast.method.recipes.MODEL_DEFAULTS); registry models get REPA's constructor default (8, clipped
# to the model's depth) unless ``encoder_depth=`` is passed.
# --------------------------------------------------------------------------------------------
SIZES = {
    "D": dict(depth=4, hidden_size=96, num_heads=2),   # ours: the digits default on CPU
    "T": dict(depth=6, hidden_size=192, num_heads=3),  # ours: tiny, for CPU work
    "D8": dict(depth=8, hidden_size=64, num_heads=2),  # ours: the convergence study at the paper's proportions
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DEFAULT_ENCODER_DEPTH = 8  # REPA's SiT constructor default (and its train.py --encoder-depth)


def _factory(size: str, patch: int):
    def make(**kwargs):
        arch = SIZES[size]
        cfg = dict(arch, patch_size=patch, decoder_hidden_size=arch["hidden_size"],
                   encoder_depth=min(DEFAULT_ENCODER_DEPTH, kwargs.get("depth", arch["depth"])))
        cfg.update(kwargs)
        return SiT(**cfg)

    make.__name__ = f"SiT_{size}_{patch}"
    make.__doc__ = f"SiT-{size}/{patch}: depth {SIZES[size]['depth']}, hidden {SIZES[size]['hidden_size']}, heads {SIZES[size]['num_heads']}."
    return make


SiT_models = {f"SiT-{size}/{patch}": _factory(size, patch) for size in SIZES for patch in (2, 4, 8)}


def build_model(name: str, **kwargs) -> SiT:
    """Build a registered model by name, with a clear error for unknown names."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)
