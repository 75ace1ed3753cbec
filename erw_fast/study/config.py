"""The study's settings (one dataclass), its two presets and its arms.

The ``paper`` preset keeps the proportions of ERW's SiT-XL/2 setting on the embedded digits:
``SiT-D8/2`` (8 blocks, 64 wide), warmup region L = 1 block (XL: 4 of 28), alignment at block 4 of
8 (XL: 14 of 28), a projector twice the width (XL: 2048 for 1152) and the target features extracted
once (the digits have no augmentation), so that a warmup step costs 18% of a full step as the FLOP
counter counts it (the paper: 42.2K of 224.8K GFLOPs, 19%). ``quick`` is the same study shrunk to
a smoke test (every arm trains, is evaluated and reported in about a minute).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from ..encoders.digits import DEFAULT_DIGITS_ENCODER, DIGITS_ENCODERS


@dataclass
class StudyConfig:
    out: str = "runs/convergence"
    doc: Optional[str] = None        # None: <out>/convergence.md ('' = none)
    plot: Optional[str] = None       # None: <out>/convergence.png ('' = none)
    update_docs: bool = False        # write the repository's docs/convergence.md and its plot instead
    arms: Optional[Tuple[str, ...]] = None   # None: every arm of the settings below
    seeds: Tuple[int, ...] = (0, 1, 2)
    # the runs
    data: str = "digits"             # the embedded digits, an image folder (imagefolder:DIR or a plain DIR) or latents
    model: Optional[str] = None      # None: the data's preset (digits SiT-D8/2; an image folder SiT-D8/<R/8>; latents
                                     # the patch closest to an 8x8 grid, or the stored features' grid)
    encoder: Optional[str] = None    # None: digits-ssl on the digits (label-free; digits-cnn: label-trained), else dinov2-vit-b
    encoder_path: Optional[str] = None   # local weights of the encoder (e.g. a DINOv2 transformers folder)
    inception: Optional[str] = None  # image folders, latents: a local TorchScript Inception file for FID (None: FID null)
    projector_dim: int = 128
    batch_size: Optional[int] = None  # None: the trainer's (digits 64); an image folder, latents: 64, or fewer when small
    features: Optional[str] = None   # None: digits precomputed (extracted once, counted); an image folder online;
                                     # latents precomputed when extract_features stored the encoder's, else online
    budget_steps: int = 400          # the compute budget per arm, in REPA steps (+ the feature extraction)
    points: int = 8                  # evaluations at budget * i / points, i = 1..points (>= 2)
    fid_targets: Optional[Tuple[float, ...]] = None   # FID targets τ of the speed figure (None: see plan.fid_targets)
    warmup_fractions: Tuple[float, ...] = (0.05, 0.10, 0.20, 0.40)   # ERW: share of the budget in the warmup
    stop_fraction: float = 0.5       # the -stop arms: the alignment ends once this share of the budget is spent
    stop_warmup: float = 0.10        # the warmup share of the ERW arm with the alignment stop
    # the evaluation
    num_samples: int = 400
    sampler: str = "sde"
    sample_steps: int = 25
    cfg_scale: float = 1.0
    eval_seed: int = 12345
    eval_batch: int = 100
    # the machine
    jobs: int = 2                    # runs trained at once (each with cores // jobs threads)
    threads: Optional[int] = None    # CPU threads per run (None: cores // jobs)
    quick: bool = False
    plan_only: bool = False          # print the plan (steps, evaluation points, FLOPs) and stop


# A smoke test of the whole pipeline: every arm trains, is evaluated, and the report is written.
QUICK = dict(out="runs/convergence-quick", seeds=(0,), budget_steps=8, points=2, num_samples=20, sample_steps=2,
             eval_batch=20)


# An image folder: the trainer's image-folder defaults (32 px, batch, lr, EMA) and the digits preset's
# SiT-D8 with the patch that gives its 8x8 token grid, the encoder run online (the digits extract once).
FOLDER_TOKEN_GRID = 8
DEFAULT_FOLDER_ENCODER = "dinov2-vit-b"


# Latents (``python -m erw_fast.preprocess``): the digits preset's SiT-D8 with the patch whose token grid is
# closest to its 8x8, or the grid of target features that ``python -m erw_fast.extract_features`` stored in the
# dataset (then read, not run: the trainer's --features precomputed, their extraction charged to the aligned arms);
# the batch fitted as for an image folder. The trainer's latent defaults are the 400K-step ImageNet recipe: after a
# study's few hundred steps its EMA (decay 0.9999) would still be ~96% the initial weights and its λ half-life (50K
# steps) would not decay at all, so the runs take the digits preset's optimisation, made for budgets of this length.
LATENT_RUN_KEYS = ("lr", "ema_decay", "half_life", "log_every")
LATENT_REFERENCE_CAP = 5000  # FD/FID reference: at most this many of the dataset's stored images, evenly spaced
PATCHES = (2, 4, 8)          # the registered SiT patches


def data_kind(data: str) -> str:
    """``digits``, ``imagefolder`` or ``latents`` (as the trainer reads ``--data``); ``digits-subset``
    for ``digits:<classes>`` (refused: the reuse study's data)."""
    from ..data.digits import is_digits
    from ..data.imagefolder import image_folder_path

    if is_digits(data):
        return "digits" if data == "digits" else "digits-subset"
    return "imagefolder" if image_folder_path(data) is not None else "latents"


def fitted_batch(n: int, batch: int = 64) -> int:
    """A batch for ``n`` samples: ``batch`` halved while it exceeds a quarter of them (but >= 8)."""
    while batch > 8 and batch > n // 4:
        batch //= 2
    return batch


def latent_run_settings() -> Dict:
    """The trainer settings a latent study's runs take from the digits preset (see above)."""
    from ..engine.config import DATA_DEFAULTS

    return {k: DATA_DEFAULTS["digits"][k] for k in LATENT_RUN_KEYS}


def stored_features(data: str, encoder: str):
    """The features of ``encoder`` that ``python -m erw_fast.extract_features`` stored in latent dataset
    ``data`` (a ``FeatureStore``, checked against the dataset's size), or None."""
    import os

    from ..data.features import FeatureStore, features_dir

    if not os.path.isfile(os.path.join(features_dir(data, encoder), "index.json")):
        return None
    return FeatureStore(data, encoder, folder_size(data))


def latent_preset(data: str, encoder: str) -> Dict:
    side, store = folder_data(data).input_size, stored_features(data, encoder)
    if store is not None and side % store.token_grid == 0 and side // store.token_grid in PATCHES:
        patch, features = side // store.token_grid, "precomputed"
    else:
        fits = [p for p in PATCHES if side % p == 0] or [2]  # an odd side: the model refuses it, in one line
        patch, features = min(fits, key=lambda p: (abs(side // p - FOLDER_TOKEN_GRID), p)), "online"
    return dict(model=f"SiT-D8/{patch}", encoder=encoder, features=features, batch_size=fitted_batch(folder_size(data)))


def dataset_preset(data: str, encoder: Optional[str] = None) -> Dict:
    """The settings that depend on the data (model, encoder, features, batch), for the fields left at None;
    ``encoder``: the one given (latents: its stored features decide the features and the model's patch)."""
    kind = data_kind(data)
    if kind in ("digits", "digits-subset"):
        return dict(model="SiT-D8/2", encoder=DEFAULT_DIGITS_ENCODER, features="precomputed")
    if kind == "latents":
        return latent_preset(data, encoder or DEFAULT_FOLDER_ENCODER)
    from ..engine.config import DATA_DEFAULTS

    res, batch = DATA_DEFAULTS["imagefolder"]["resolution"], DATA_DEFAULTS["imagefolder"]["batch_size"]
    return dict(model=f"SiT-D8/{max(1, res // FOLDER_TOKEN_GRID)}", encoder=DEFAULT_FOLDER_ENCODER, features="online",
                batch_size=fitted_batch(folder_size(data), batch))


@lru_cache(maxsize=2)
def folder_data(data: str):
    """The image folder or latent dataset as the trainer loads it (on the CPU), loaded once."""
    from ..data import load_train_data

    return load_train_data(data, "cpu")


def folder_size(data: str) -> int:
    return folder_data(data).num_samples


def reference_indices(data: str):
    """The samples of a latent dataset whose stored images are the study's FD/FID reference: all, or
    ``LATENT_REFERENCE_CAP`` of them evenly spaced (every class of a class-ordered dataset)."""
    import numpy as np

    n = folder_size(data)
    k = min(n, LATENT_REFERENCE_CAP)
    return np.arange(k, dtype=np.int64) * n // k


def study_config(quick: bool = False, **given) -> StudyConfig:
    """The preset (``paper``, or ``quick``) with the given fields on top (None = the preset's), and the
    data's preset (:func:`dataset_preset`) for the model, encoder and features not given."""
    base = StudyConfig(**(QUICK if quick else {}), quick=quick)
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"unknown study settings {unknown}")
    cfg = replace(base, **{k: v for k, v in given.items() if v is not None})
    return replace(cfg, **{k: v for k, v in dataset_preset(cfg.data, cfg.encoder).items() if getattr(cfg, k) is None})


# --------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One way to spend the budget: the trainer's recipe, ERW's warmup share, and where the
    alignment stops (a share of the budget; None = never)."""
    name: str
    method: str
    warmup: float = 0.0
    stop: Optional[float] = None

    @property
    def aligns(self) -> bool:
        return self.method != "vanilla"

    @property
    def label(self) -> str:
        stop = f", alignment stops at {self.stop * 100:g}%" if self.stop is not None else ""
        if self.method == "vanilla":
            return "SiT (vanilla)"
        if self.method == "repa":
            return "REPA" + stop
        if self.method == "erw-nowarmup":
            return "ERW λ, no warmup (control)" + stop
        if self.method == "erw":
            return f"ERW, warmup {self.warmup * 100:g}%" + stop
        return self.method + stop


def _pct(f: float) -> str:
    return f"{round(f * 100):02d}"


def study_arms(cfg: StudyConfig) -> List[Arm]:
    """Every arm of ``cfg``, in report order: vanilla, REPA (+ stop), the ERW warmup sweep, ERW at
    ``stop_warmup`` with the stop, and the control (ERW's λ without the warmup)."""
    s = cfg.stop_fraction
    arms = [Arm("vanilla", "vanilla"), Arm("repa", "repa"), Arm("repa-stop", "repa", stop=s)]
    arms += [Arm(f"erw-w{_pct(f)}", "erw", warmup=f) for f in cfg.warmup_fractions]
    arms += [Arm(f"erw-w{_pct(cfg.stop_warmup)}-stop", "erw", warmup=cfg.stop_warmup, stop=s),
             Arm("erw-nowarmup", "erw-nowarmup")]
    return arms


def selected_arms(cfg: StudyConfig) -> List[Arm]:
    """The arms to run now (``--arms``), checked; the report covers every arm evaluated in ``out``."""
    arms = study_arms(cfg)
    if cfg.arms is None:
        return arms
    names = [a.name for a in arms]
    bad = [a for a in cfg.arms if a not in names]
    if bad:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(bad)}; this study has {', '.join(names)}")
    return [a for a in arms if a.name in cfg.arms]


def check_config(cfg: StudyConfig):
    """Every setting checked before anything is written; each error names its flag."""
    if cfg.budget_steps < 1:
        raise ValueError(f"--budget-steps must be >= 1, got {cfg.budget_steps}")
    if cfg.points < 2:
        raise ValueError(f"--points must be >= 2 (a curve needs two evaluations), got {cfg.points}")
    _check_data(cfg)
    if cfg.fid_targets is not None and (not cfg.fid_targets or any(not t > 0 for t in cfg.fid_targets)):
        raise ValueError(f"--fid-targets must be positive FID values, got {list(cfg.fid_targets)}")
    if not cfg.seeds:
        raise ValueError("--seeds: give at least one seed")
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 for FID, got {cfg.num_samples}")
    if cfg.jobs < 1 or (cfg.threads is not None and cfg.threads < 1):
        raise ValueError(f"--jobs and --threads must be >= 1, got {cfg.jobs} and {cfg.threads}")
    fr = list(cfg.warmup_fractions) + [cfg.stop_warmup]
    if any(not 0 < f < 1 for f in fr) or len(set(cfg.warmup_fractions)) != len(cfg.warmup_fractions):
        raise ValueError(f"--warmup-fractions / --stop-warmup must be distinct shares in (0, 1), got {fr}")
    if not 0 < cfg.stop_fraction < 1:
        raise ValueError(f"--stop-fraction must lie in (0, 1), got {cfg.stop_fraction}")
    if cfg.stop_warmup >= cfg.stop_fraction:
        raise ValueError(f"--stop-warmup {cfg.stop_warmup:g} must be below --stop-fraction {cfg.stop_fraction:g}: "
                         "the alignment cannot stop inside the warmup")
    if cfg.features not in ("online", "precomputed"):
        raise ValueError(f"--features {cfg.features!r}: use 'online' or 'precomputed'")
    selected_arms(cfg)


def _check_data(cfg: StudyConfig):
    kind = data_kind(cfg.data)
    if kind == "digits-subset":
        raise ValueError(f"--data {cfg.data}: the study runs on all the digits (digits), an image folder or latents; "
                         "a subset of the digits is the reuse study's (python -m erw_fast.reuse_study)")
    if kind == "digits" and cfg.encoder not in DIGITS_ENCODERS:
        raise ValueError(f"--encoder {cfg.encoder!r}: the digits study aligns to an embedded digits encoder, "
                         f"one of {', '.join(DIGITS_ENCODERS)}")
    if kind != "digits" and cfg.encoder in DIGITS_ENCODERS:
        raise ValueError(f"--encoder {cfg.encoder}: the embedded digits encoders read 16x16 greyscale digits, not "
                         f"the images of --data {cfg.data}; use e.g. dinov2-vit-b (--encoder-path for local weights)")
    if kind != "digits":
        n, folder = folder_size(cfg.data), kind == "imagefolder"
        what, refs = ("images", n) if folder else ("latents", len(reference_indices(cfg.data)))
        if cfg.batch_size > n:
            raise ValueError(f"--data {cfg.data}: {n} {what}, fewer than the batch of {cfg.batch_size} (--batch-size); "
                             f"add {what} or lower --batch-size")
        if cfg.num_samples > refs:
            raise ValueError(f"--num-samples {cfg.num_samples}: more samples than the {'folder' if folder else 'dataset'}'s "
                             f"{refs} images that FD compares them with; lower --num-samples")
    if kind == "latents" and folder_data(cfg.data).decoder() is None:
        raise ValueError(f"--data {cfg.data}: the study decodes the generated latents with the dataset's VAE, but "
                         f"{folder_data(cfg.data).decoder_error}; write the dataset with `python -m erw_fast.preprocess "
                         "--vae DIR` (a diffusers AutoencoderKL folder) or put that VAE in the Hugging Face cache")
    if kind == "digits" and cfg.batch_size is not None:
        raise ValueError("--batch-size: the digits study keeps the trainer's batch (64) of its first runs; drop it")
    if kind == "digits" and cfg.inception:
        raise ValueError("--inception: the digits study scores FID with the digits classifier; drop --inception")
    import os

    if cfg.inception and not os.path.isfile(cfg.inception):
        raise ValueError(f"--inception {cfg.inception}: no such file")


def study_settings(cfg: StudyConfig) -> Dict:
    """What the runs and evaluations in ``cfg.out`` depend on (a rerun in the same folder must match);
    ``data`` (and, off the digits, the FID network and batch; on latents the run settings taken from the
    digits preset and the number of reference images) beside the digits study's keys."""
    keep = ("data", "model", "encoder", "projector_dim", "features", "budget_steps", "points", "warmup_fractions", "stop_fraction",
            "stop_warmup", "num_samples", "sampler", "sample_steps", "cfg_scale", "eval_seed")
    d = {k: getattr(cfg, k) for k in keep}
    d["warmup_fractions"] = list(d["warmup_fractions"])
    if data_kind(cfg.data) != "digits":
        d.update(fid_network="inception" if cfg.inception else None, batch_size=cfg.batch_size)
    if data_kind(cfg.data) == "latents":
        d.update(latent_run_settings(), reference_images=len(reference_indices(cfg.data)))
    return d


__all__ = ["Arm", "QUICK", "StudyConfig", "check_config", "data_kind", "dataset_preset", "latent_run_settings",
           "reference_indices", "selected_arms", "study_arms", "study_config", "study_settings"]
