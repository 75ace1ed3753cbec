"""The training configuration (one dataclass) and the per-model / per-dataset defaults.

Fields left at ``None`` are filled by ``resolve_config`` from the method's per-size defaults
(``erw_fast.method.recipes.RECIPES``: ERW's, REPA's or SiT's warmup region, alignment block, λ0, RoPE) and ``DATA_DEFAULTS`` (run length, batch, lr, EMA, half-life,
sampling, per dataset). The digits defaults are chosen for a run of a few minutes on 2 CPU cores,
not copied from the 400K-step ImageNet recipe.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from ..data.digits import is_digits
from ..data.imagefolder import image_folder_path
from ..encoders.digits import DEFAULT_DIGITS_ENCODER
from ..method.alignment import ALIGNMENT_LOSSES
from ..method.recipes import MODEL_DEFAULTS, get_method, model_defaults  # noqa: F401  (re-exported)
from ..method.schedules import SCHEDULES
from .fp8 import RECIPES as FP8_RECIPES

# Per dataset: run length and optimisation (the digits values are chosen for a few CPU minutes).
DATA_DEFAULTS = {
    "digits": dict(
        model="SiT-D/2", warmup_steps=200, steps=700, batch_size=64, lr=1e-3, ema_decay=0.99,
        half_life=400, projector_dim=256, sample_every=0, ckpt_every=0, sample_steps=30,
        sampler="sde", cfg_scale=2.0, guidance_high=1.0, samples_per_class=10, log_every=10,
        encoder=DEFAULT_DIGITS_ENCODER,
    ),
    # a folder of class-labelled images in pixel space (a few thousand images at 32 px, one GPU)
    "imagefolder": dict(
        model="SiT-S/2", warmup_steps=5_000, steps=20_000, batch_size=64, lr=1e-4, ema_decay=0.9995,
        half_life=4_000, projector_dim=2048, sample_every=2_000, ckpt_every=5_000, sample_steps=50,
        sampler="sde", cfg_scale=2.0, guidance_high=1.0, samples_per_class=8, log_every=50, resolution=32,
        encoder="dinov2-vit-b",
    ),
    # the REPA/ERW ImageNet recipe (256-px SD-VAE latents)
    "latents": dict(
        model="SiT-XL/2", warmup_steps=100_000, steps=400_000, batch_size=256, lr=1e-4, ema_decay=0.9999,
        half_life=50_000, projector_dim=2048, sample_every=10_000, ckpt_every=50_000, sample_steps=250,
        sampler="sde", cfg_scale=1.0, guidance_high=1.0, samples_per_class=1, log_every=100, encoder="dinov2-vit-b",
    ),
}

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` = the per-model/per-dataset default (see module doc)."""

    method: str = "erw"
    model: Optional[str] = None
    data: str = "digits"                    # digits, digits:<classes> (e.g. digits:0-4), imagefolder:DIR or a latent DIR
    encoder: Optional[str] = None           # default per dataset: digits-ssl (digits), dinov2-vit-b (others); an
                                            # explicit value is never replaced
    encoder_path: Optional[str] = None      # local weights for the target encoder (DINOv2: HF folder or hub repo)
    encoder_source: str = "auto"            # DINOv2 loading route: auto | transformers | hub
    features: str = "online"                # online (run the encoder) | precomputed (extract_features shards;
                                            # the digits: extracted once in memory at the start)
    resolution: Optional[int] = None        # image folders: side the images are centre-cropped to (a multiple of
                                            # the patch size; default 32)
    hflip: bool = False                     # image folders: mirror each sample with p = 1/2, seeded per (seed, step, sample)
    class_names: Optional[Tuple[str, ...]] = None  # set from the data (image folders' sorted sub-folders), not a flag
    out: str = "runs/erw-digits"
    resume: Optional[str] = None           # None, "auto" (latest in out/checkpoints) or a path
    warmup_from: Optional[str] = None      # ERW: skip phase 1, transfer from this warmup checkpoint
    reuse_labels: Optional[str] = None     # --warmup-from without class names on both sides: positional | fresh
    # method
    l2r_depth: Optional[int] = None
    encoder_depth: Optional[int] = None
    warmup_steps: Optional[int] = None
    steps: Optional[int] = None             # phase-2 steps
    lambda_schedule: Optional[str] = None   # halflife | exp | constant (default: the method's)
    lambda0: Optional[float] = None
    half_life: Optional[float] = None
    tau: Optional[float] = None
    align_until: Optional[int] = None       # phase-2 step from which the alignment stops (HASTE)
    lambda_min: float = 0.0                  # a decayed λ below this counts as 0 (the alignment stops)
    align_loss: str = "cosine"
    temperature: float = 0.1
    # model
    rope: Optional[bool] = None             # None: the method's recipe (ERW: on; REPA, vanilla SiT: off)
    qk_norm: bool = False
    attn_backend: str = "auto"
    fused: Optional[Union[bool, str]] = None
    projector_dim: Optional[int] = None
    class_dropout: float = 0.1
    compile: bool = False
    # optimisation
    batch_size: Optional[int] = None        # global batch (all ranks together)
    lr: Optional[float] = None
    grad_clip: float = 1.0
    grad_accum: int = 1                      # micro-batches per step and process (same draws, same maths)
    grad_checkpoint: bool = False            # recompute each block's activations in the backward
    fsdp: bool = False                       # shard parameters, gradients, optimizer state (FSDP2) under torchrun
    ema_decay: Optional[float] = None
    precision: Optional[str] = None         # auto (None) | fp32 | bf16 | fp8 (torchao float8 linears + bf16 autocast)
    fp8_recipe: Optional[str] = None        # --precision fp8: tensorwise (default) | rowwise scaling
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None           # CPU threads for torch (None = torch's default)
    prefetch: int = 2                       # latent data: batches prepared ahead in a background thread
    # output
    sample_every: Optional[int] = None      # 0 = only the final grid
    ckpt_every: Optional[int] = None        # 0 = only the final checkpoint (and the transfer one)
    ckpt_at: Optional[Tuple[int, ...]] = None  # extra checkpoints at these total steps (warmup included)
    ckpt_every_minutes: Optional[float] = None  # also checkpoint when this many minutes passed since the last
    keep_last: Optional[int] = None         # keep only the N newest periodic checkpoints (None/0 = all)
    log_every: Optional[int] = None
    sample_steps: Optional[int] = None
    sampler: Optional[str] = None
    cfg_scale: Optional[float] = None
    guidance_high: Optional[float] = None
    samples_per_class: Optional[int] = None
    eval_every: int = 0                      # online FID every N steps (0 = off)
    align_probe_every: int = 0               # CKNNA of the alignment block every N steps (0 = off)
    eval_samples: int = 400                  # samples per online evaluation
    eval_batch: int = 100                    # sampling batch of the online evaluation
    inception: Optional[str] = None          # latent data: TorchScript Inception file for online FID
    eval_ref: Optional[str] = None           # latent data: reference statistics npz (ADM layout)
    progress: bool = True
    # testing hooks (not CLI flags)
    stop_after: Optional[int] = None        # stop (with a checkpoint) after this many total steps
    debug_nan_at_step: Optional[int] = None  # inject a NaN loss at this total step
    # the fields set on the command line (the CLI fills it; None: those that differ from these defaults).
    # Not a setting: not in to_dict(), config.json or checkpoints.
    given: Optional[Tuple[str, ...]] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("given")
        return d

    def given_fields(self) -> Tuple[str, ...]:
        """The fields this call sets on purpose: ``given`` from the command line, or (from Python)
        those that differ from the dataclass defaults."""
        if self.given is not None:
            return tuple(self.given)
        default = TrainConfig()
        return tuple(f.name for f in dataclasses.fields(self)
                     if f.name != "given" and getattr(self, f.name) != getattr(default, f.name))


# Fields that a resumed run takes from the new call rather than from the checkpoint (the flags that may
# change on --resume, docs/training.md; every other flag given with --resume must equal the run's value).
# ``RESUME_OVERRIDABLE`` win when set (not None); ``RESUME_FROM_CALL`` always come from the new call.
RESUME_OVERRIDABLE = ("encoder_path", "steps", "inception", "eval_ref", "sample_every", "ckpt_every", "ckpt_at",
                      "ckpt_every_minutes", "keep_last",
                      "log_every", "attn_backend", "fused",
                      "sample_steps", "sampler", "cfg_scale", "guidance_high", "samples_per_class", "precision",
                      "fp8_recipe")
RESUME_FROM_CALL = ("out", "resume", "compile", "progress", "stop_after", "debug_nan_at_step", "device",
                    "threads", "prefetch", "grad_accum", "grad_checkpoint", "fsdp", "eval_every", "eval_samples",
                    "eval_batch", "align_probe_every", "encoder_source", "given")


def _fits(v, tp) -> bool:
    """Whether the value ``v`` read from a checkpoint has the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_fits(v, a) for a in typing.get_args(tp))
    if origin is tuple:
        return isinstance(v, (tuple, list)) and all(_fits(x, typing.get_args(tp)[0]) for x in v)
    if tp is type(None):
        return v is None
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp)


def config_from_checkpoint_args(args, source: str) -> TrainConfig:
    """A checkpoint's ``args`` as a ``TrainConfig``, every setting's type checked: one error naming the
    file and the key (keys that are not settings, such as ``model_config``, are left out)."""
    if not isinstance(args, dict):
        raise ValueError(f"{source}: its 'args' is a {type(args).__name__}, not a dict of settings (not an erw_fast "
                         "training checkpoint, or a damaged one)")
    hints = typing.get_type_hints(TrainConfig)
    kw = {}
    for k, v in args.items():
        if k not in hints or k == "given":
            continue
        if not _fits(v, hints[k]):
            want = str(hints[k]).replace("typing.", "")
            raise ValueError(f"{source}: args[{k!r}] is {v!r} ({type(v).__name__}), expected {want}; the file's "
                             "settings are damaged or were not written by erw_fast.train")
        kw[k] = tuple(v) if isinstance(v, list) else v
    return TrainConfig(**kw)


def model_size(name: str) -> str:
    from ..models.sit import SiT_models

    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(SiT_models)}")
    return name.removeprefix("SiT-").split("/")[0]


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` with every ``None`` default filled in and every value checked (each error
    names its flag)."""
    c = dataclasses.replace(cfg)
    method = get_method(c.method)
    data_key = "digits" if is_digits(c.data) else ("imagefolder" if image_folder_path(c.data) else "latents")
    if data_key != "imagefolder" and (c.resolution is not None or c.hflip):
        raise ValueError(f"--resolution / --hflip apply to image folders (--data imagefolder:DIR), not --data {c.data}")
    for k, v in DATA_DEFAULTS[data_key].items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    size = model_size(c.model)
    from ..models.sit import SIZES

    depth = SIZES[size]["depth"]
    for k, v in model_defaults(size, depth, c.method).items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    _check_resolution(c)
    if c.lambda_schedule is None:
        c.lambda_schedule = method.schedule
    if c.precision is None:
        c.precision = "auto"
    if c.precision == "fp8" and c.fp8_recipe is None:
        c.fp8_recipe = "tensorwise"
    c.ckpt_at = tuple(sorted({int(v) for v in (c.ckpt_at or ())}))
    if not method.warmup:
        c.warmup_steps = 0
    _check_choices(c)
    _check_depths(c, method, depth)
    _check_numbers(c)
    _check_sampling(c)
    _check_eval(c)
    return c


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_resolution(c: TrainConfig):
    """Image folders: any side that the model's patch divides (the token grid is resolution / patch)."""
    if c.resolution is None:
        return
    patch = int(c.model.rsplit("/", 1)[1])
    if isinstance(c.resolution, bool) or not isinstance(c.resolution, int) or c.resolution < patch \
            or c.resolution % patch:
        raise ValueError(f"--resolution {c.resolution}: use a multiple of {c.model}'s patch size {patch} (e.g. "
                         f"{max(16, 2 * patch)}, 32 or 64), so that the images cut into whole patches")


def _check_choices(c: TrainConfig):
    from ..method.transfer import REUSE_LABELS

    if c.reuse_labels is not None and c.reuse_labels not in REUSE_LABELS:
        raise ValueError(f"--reuse-labels {c.reuse_labels!r}: use one of {', '.join(REUSE_LABELS)}")
    if c.reuse_labels is not None and not c.warmup_from:
        raise ValueError("--reuse-labels says how a reused warmup's label rows carry: it needs --warmup-from CKPT")
    if c.features not in ("online", "precomputed"):
        raise ValueError(f"--features {c.features!r}: use 'online' or 'precomputed'")
    if c.features == "precomputed" and image_folder_path(c.data):
        raise ValueError("--features precomputed needs a latent dataset (--data DIR with extract_features output) "
                         "or the digits (extracted once in memory); image folders run the encoder online")
    if c.encoder.strip().lower() == "none" and get_method(c.method).needs_encoder:
        raise ValueError(f"--encoder none: --method {c.method} aligns to a target encoder; use --method vanilla, or "
                         "--encoder dinov2-vit-b --encoder-path DIR (a local DINOv2 folder)")
    if c.lambda_schedule not in SCHEDULES:  # the registries, so registered additions are accepted
        raise ValueError(f"unknown lambda schedule {c.lambda_schedule!r}; choose one of {tuple(SCHEDULES)}")
    if c.align_loss not in ALIGNMENT_LOSSES:
        raise ValueError(f"unknown alignment loss {c.align_loss!r}; choose one of {tuple(ALIGNMENT_LOSSES)}")
    if c.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {c.precision!r}; choose one of {PRECISIONS}")
    if c.fp8_recipe is not None and c.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"--fp8-recipe {c.fp8_recipe!r}: choose one of {', '.join(FP8_RECIPES)}")
    if c.fp8_recipe is not None and c.precision != "fp8":
        raise ValueError(f"--fp8-recipe {c.fp8_recipe} applies to --precision fp8 (got --precision {c.precision})")


def _check_depths(c: TrainConfig, method, depth: int):
    if not 1 <= c.encoder_depth <= depth:
        raise ValueError(f"--encoder-depth {c.encoder_depth} is outside 1..{depth} (the depth of {c.model})")
    if method.warmup:
        if not 1 <= c.l2r_depth <= depth:
            raise ValueError(f"--l2r-depth {c.l2r_depth} is outside 1..{depth} (the depth of {c.model})")
        if c.encoder_depth < c.l2r_depth:
            raise ValueError(
                f"--encoder-depth {c.encoder_depth} is below --l2r-depth {c.l2r_depth}: the alignment block "
                "must lie at or after the warmed-up region"
            )


def _finite(c, name, low=None, high=None, low_open=False, high_open=False):
    v = getattr(c, name)
    ok = isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (low is None or (v > low if low_open else v >= low)) and (high is None or (v < high if high_open
                                                                                            else v <= high))
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{_flag(name)} must be a finite number {' and '.join(x for x in (lo, hi) if x)}, got {v}")


def _check_numbers(c: TrainConfig):
    for name in ("warmup_steps", "steps", "sample_every", "ckpt_every", "prefetch"):
        if getattr(c, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(c, name)}")
    if c.steps == 0 and (c.warmup_steps == 0 or c.warmup_from or not get_method(c.method).warmup):
        raise ValueError("nothing to train: --steps 0 (and no warmup steps); give --steps N, or --warmup-steps N "
                         "for a warmup-only ERW run")
    for name in ("batch_size", "log_every", "grad_accum"):
        if getattr(c, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(c, name)}")
    if c.keep_last is not None and c.keep_last < 0:
        raise ValueError(f"--keep-last must be >= 1 (or 0 = keep all), got {c.keep_last}")
    if c.ckpt_every_minutes is not None:
        _finite(c, "ckpt_every_minutes", 0, low_open=True)
    if c.threads is not None and c.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {c.threads}")
    if any(v < 1 for v in c.ckpt_at):
        raise ValueError(f"--ckpt-at steps must be >= 1, got {c.ckpt_at}")
    last = c.warmup_steps + c.steps
    beyond = [v for v in c.ckpt_at if v > last]
    if beyond:
        raise ValueError(f"--ckpt-at {','.join(map(str, beyond))}: beyond the run's last step {last} (warmup "
                         f"{c.warmup_steps} + --steps {c.steps}), so never written; the run ends with a checkpoint "
                         "anyway. Drop it or raise --steps")
    _finite(c, "lr", 0, low_open=True)
    _finite(c, "ema_decay", 0, 1, high_open=True)
    _finite(c, "grad_clip", 0)
    _finite(c, "lambda0", 0)
    _finite(c, "class_dropout", 0, 1, high_open=True)
    _finite(c, "temperature", 0, low_open=True)
    if c.lambda_schedule == "halflife" or (c.lambda_schedule == "exp" and c.tau is None):
        _finite(c, "half_life", 0, low_open=True)
    if c.tau is not None:
        _finite(c, "tau", 0, low_open=True)
    if (c.align_until is not None or c.lambda_min) and not get_method(c.method).align:
        raise ValueError(f"--align-until / --lambda-min stop the alignment term, which --method {c.method} does "
                         "not have")
    if c.align_until is not None and c.align_until < 0:
        raise ValueError(f"--align-until must be >= 0 (a phase-2 step), got {c.align_until}")
    _finite(c, "lambda_min", 0)


def _check_eval(c: TrainConfig):
    for name in ("eval_every", "align_probe_every"):
        if getattr(c, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(c, name)}")
    if c.align_probe_every and not get_method(c.method).needs_encoder:
        raise ValueError(f"--align-probe-every needs a target encoder, which --method {c.method} does not use")
    if c.align_probe_every and c.fsdp:
        raise ValueError("--align-probe-every does not run with --fsdp (it reads the blocks directly); drop one")
    if not c.eval_every:
        return
    if c.eval_samples < 2 or c.eval_batch < 1:
        raise ValueError(f"--eval-samples must be >= 2 (FID) and --eval-batch >= 1, got {c.eval_samples}, "
                         f"{c.eval_batch}")
    if not is_digits(c.data):
        import os

        if image_folder_path(c.data) is not None and not c.inception and get_method(c.method).needs_encoder:
            return  # an image folder without --inception: fd_<encoder> against the folder's images, FID null
        what = "an image folder without a target encoder" if image_folder_path(c.data) is not None else "latent data"
        for flag, path in (("--inception", c.inception), ("--eval-ref", c.eval_ref)):
            if not path or not os.path.isfile(path):
                raise ValueError(f"--eval-every on {what} needs {flag} FILE (a local file; got {path!r}): FID "
                                 "uses a TorchScript Inception and reference statistics (ADM's npz)")
        from ..evaluation.samples import load_reference

        load_reference(c.eval_ref, "--eval-ref", images=False)  # a damaged or false reference: refused now


def _check_sampling(c: TrainConfig):
    from ..sampling import SAMPLERS

    if c.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {c.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    for name in ("sample_steps", "samples_per_class"):
        if getattr(c, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(c, name)}")
    _finite(c, "cfg_scale", 0)
    _finite(c, "guidance_high", 0, 1, low_open=True)
    if c.cfg_scale != 1.0 and c.class_dropout == 0:
        raise ValueError(f"--cfg-scale {c.cfg_scale:g} needs a null class, but --class-dropout 0 trains none; "
                         "use --class-dropout > 0 or --cfg-scale 1")


def check_environment(c: TrainConfig, device=None):
    """What this machine must offer for ``c`` on ``device`` (the device is checked where it is chosen,
    in ``utils.distributed.pick_device``): Triton for ``--fused triton`` (on CUDA, or the CPU interpreter),
    the attention backend, and for ``--precision fp8`` torchao and a card that has float8. Checked before
    the run folder is created."""
    from .. import ops
    from ..ops._dispatch import triton_runs_on

    if c.precision == "fp8" and device is not None:
        from .fp8 import check_fp8

        check_fp8(c.fp8_recipe, c.compile, device)
    if c.fused == "triton" and not ops.triton_available():
        raise ValueError("--fused triton: triton is not importable; pip install triton, or use --fused auto/torch")
    if c.fused == "triton" and device is not None and not triton_runs_on(device):
        raise ValueError(f"--fused triton on {device}: the Triton kernels run on CUDA (on a CPU only under the "
                         "Triton interpreter, TRITON_INTERPRET=1 set before start, for testing); use --fused torch "
                         "(the same ops in PyTorch) or --fused auto")
    from ..models.attention import resolve_backend

    try:
        resolve_backend(c.attn_backend)
    except RuntimeError as e:
        raise ValueError(f"--attn-backend {c.attn_backend}: {e}") from None
