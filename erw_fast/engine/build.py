"""Building a run's parts from its config: target encoders, the SiT of a phase, the phase's objective
and Trainer, precision and the fused-op setting. Used by ``run`` (training), and by
``measure_step_flops`` (the convergence study's FLOP count, without training or writing anything).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..method.objective import Objective
from ..method.recipes import PHASE_WARMUP, get_method
from ..method.schedules import AlignmentSchedule
from ..models.sit import SiT, build_model
from ..utils.distributed import pick_device
from ..utils.seeding import STREAM_INIT, BatchIndexer, mix_seed
from .batches import BatchSource
from .config import TrainConfig, resolve_config
from .trainer import Trainer


def load_encoders(cfg: TrainConfig, data, device) -> List:
    """The target encoders a method needs (none for vanilla), checked against the token grid."""
    if not get_method(cfg.method).needs_encoder:
        return []
    from ..encoders import build_encoder, check_token_grid
    from ..encoders.dinov2 import EncoderWeightsError

    patch = int(cfg.model.rsplit("/", 1)[1])
    if cfg.features == "precomputed" and data.is_latent:
        from ..data.features import precomputed_encoders

        encoders = precomputed_encoders(cfg.data, cfg.encoder, expected_count=data.num_samples)
    else:
        # DINOv2 resizes its input so that its patch grid equals the SiT token grid
        enc_kw = dict(input_size=data.input_size, token_grid=data.input_size // patch, patch_size=patch)
        if cfg.encoder_source != "auto":
            enc_kw["source"] = cfg.encoder_source
        names = [n.strip() for n in cfg.encoder.split(",") if n.strip()]
        paths = [q.strip() for q in cfg.encoder_path.split(",")] if cfg.encoder_path else []
        if paths and len(paths) != len(names):
            raise ValueError(f"--encoder-path lists {len(paths)} path(s) for {len(names)} encoder(s) "
                             f"({cfg.encoder}); give one per encoder, comma-separated")
        try:
            encoders = [build_encoder(n, device=device, **enc_kw, **({"path": paths[i]} if paths and paths[i] else {}))
                        for i, n in enumerate(names)]
        except EncoderWeightsError as e:  # offline without local weights: name the flag, in one line
            raise ValueError(f"--encoder {cfg.encoder}: {e}; or train without one: --method vanilla --encoder none") from e
    if cfg.features == "precomputed" and not data.is_latent:  # fixed pixels (the digits): extract once, in memory
        from ..data.features import extract_in_memory

        encoders = [extract_in_memory(e, data) for e in encoders]
    check_token_grid(encoders, (data.input_size // patch) ** 2, f"model {cfg.model}")
    return encoders


def feature_extraction(encoders: List) -> List[dict]:
    """The one-off cost of features extracted in memory at the start of a run (empty otherwise)."""
    return [e.store.extraction for e in encoders if getattr(getattr(e, "store", None), "extraction", None)]


def build_net(cfg: TrainConfig, data, z_dims: List[int], warm: bool) -> SiT:
    """The full SiT, or ERW's warmup model (blocks 0..L-1 only), seeded per phase."""
    kw = dict(input_size=data.input_size, in_channels=data.channels, num_classes=data.num_classes,
              class_dropout_prob=cfg.class_dropout, encoder_depth=cfg.encoder_depth, z_dims=list(z_dims),
              projector_dim=cfg.projector_dim, use_rope=cfg.rope, qk_norm=cfg.qk_norm,
              attn_backend=cfg.attn_backend, fused=cfg.fused)
    if warm:
        kw.update(depth=cfg.l2r_depth, encoder_depth=cfg.l2r_depth)
    torch.manual_seed(mix_seed(cfg.seed, STREAM_INIT, int(warm)))
    model = build_model(cfg.model, **kw)
    if warm:  # the warmup model has no use for its final layer: keep it out of the optimizer/DDP
        model.final_layer.requires_grad_(False)
    return model.set_grad_checkpointing(cfg.grad_checkpoint)


def uses_bf16(cfg: TrainConfig, device) -> bool:
    """bf16 autocast: --precision bf16 and fp8 (the linears fp8 leaves out run in bf16), auto on CUDA."""
    return cfg.precision in ("bf16", "fp8") or (cfg.precision == "auto" and torch.device(device).type == "cuda")


def fused_setting(cfg: TrainConfig, device):
    from .. import ops

    return ops.resolve_fused(cfg.fused, torch.device(device))

def schedule_of(cfg: TrainConfig) -> AlignmentSchedule:
    return AlignmentSchedule(cfg.lambda_schedule, cfg.lambda0, cfg.half_life, cfg.tau, until=cfg.align_until,
                             minimum=cfg.lambda_min)


def phase_trainer(cfg: TrainConfig, phase: str, model: SiT, encoders: List, device, fused_align, amp: bool,
                  first_step: int = 0) -> Trainer:
    """The Trainer of ``phase`` (ERW's warmup or full training) around ``model``."""
    warm = phase == PHASE_WARMUP
    objective = Objective(model, cfg.l2r_depth if warm else None, get_method(cfg.method).align, schedule_of(cfg),
                          cfg.align_loss, cfg.temperature, fused_align)
    return Trainer(model, objective, encoders, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip, amp=amp,
                   device=device, first_step=first_step, grad_accum=cfg.grad_accum,
                   fp8=cfg.fp8_recipe if cfg.precision == "fp8" else None)


def measure_step_flops(config: TrainConfig) -> Dict[str, float]:
    """FLOPs of one step of each phase of ``config``'s method (forward + backward + target encoder,
    counted as a run counts them), without training or writing anything: ``{"warmup": .., "train": ..}``,
    plus ``"features"`` (the one-off extraction) when the digits' target features are precomputed."""
    cfg = resolve_config(config)
    device = pick_device(cfg.device)
    from ..data import load_train_data

    data = load_train_data(cfg.data, device, resolution=cfg.resolution, hflip=cfg.hflip)
    encoders = load_encoders(cfg, data, device)
    phases = [p for p in get_method(cfg.method).phases if p != PHASE_WARMUP or cfg.warmup_steps > 0]
    out = {}
    for phase in phases:
        model = build_net(cfg, data, [e.dim for e in encoders], warm=phase == PHASE_WARMUP)
        trainer = phase_trainer(cfg, phase, model, encoders, device, fused_setting(cfg, device), uses_bf16(cfg, device))
        batches = BatchSource(data, encoders, trainer.objective, BatchIndexer(data.num_samples, cfg.batch_size, cfg.seed),
                              cfg.seed, cfg.class_dropout, 0, device)
        out[phase] = trainer.count_step_flops(batches.get(0), 0)
        batches.close()
    extracted = feature_extraction(encoders)
    if extracted:  # the one-off extraction of --features precomputed on the digits
        out["features"] = sum(e["flops"] for e in extracted)
    return out
