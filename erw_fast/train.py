"""Train ERW (default), REPA or vanilla SiT: ``python -m erw_fast.train [flags]``.

With no flags: ERW on the embedded handwritten digits (16x16, 10 classes) with the embedded
label-free ``digits-ssl`` target encoder and a small SiT-D/2 (4 blocks) — warmup, transfer, full training — writing
checkpoints, metrics.jsonl and a PNG grid of EMA samples (one row per class) to runs/erw-digits.
Add ``--compile`` to compile the SiT blocks. Multi-GPU: ``torchrun --nproc_per_node N -m erw_fast.train``.

Flags left unset take per-model / per-dataset defaults (erw_fast/method/recipes.py, erw_fast/engine/config.py); the
chosen values are printed and saved in <out>/config.json and in every checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from .engine import TrainConfig, train
from .engine.config import DATA_DEFAULTS, MODEL_DEFAULTS, PRECISIONS
from .engine.fp8 import RECIPES as FP8_RECIPES
from .method.alignment import ALIGNMENT_LOSSES
from .method.schedules import SCHEDULES
from .sampling import SAMPLERS
from .utils.cli import EXIT_OK, add_debug_flag, given_dests, run_cli
from .utils.distributed import shutdown


def _fused(v: str):
    low = v.lower()
    if low in ("auto",):
        return None
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    if low in ("triton", "torch"):
        return low
    raise argparse.ArgumentTypeError(f"--fused takes auto, on, off, triton or torch; got {v!r}")


def _method_flags(g, d, t):
    """The "method" flags."""
    g.add_argument("--method", default="erw", help="erw (warmup + transfer + full training with decaying λ), "
                   "repa (REPA's recipe: constant λ 0.5 from scratch, alignment at a third of the depth — "
                   "--encoder-depth 4 on S/B, 8 on L/XL —, no RoPE), vanilla (SiT: velocity loss only, no RoPE) or "
                   "erw-nowarmup (control: ERW's decaying λ and settings without the warmup). Each method takes its "
                   "own per-size defaults (erw_fast/method/recipes.py); the flags below override them. Default: erw")
    g.add_argument("--l2r-depth", type=int, help=f"ERW warmup region: blocks 0..L-1 are warmed up and transferred "
                   f"(default per model: {t['l2r_depth']} for SiT-D/T, 4 for S/B/L/XL)")
    g.add_argument("--encoder-depth", type=int, help="alignment depth D: the output of block D-1 (blocks "
                   f"numbered from 0) is aligned in full training, >= --l2r-depth (default per model, ERW: "
                   f"{t['encoder_depth']} D, 3 T, 4 D8/S/B, 8 L, 14 XL; "
                   "REPA: 1 D, 2 T, 3 D8, 4 S/B, 8 L/XL)")
    g.add_argument("--warmup-steps", type=int, help=f"ERW phase-1 steps (default {d['warmup_steps']} on digits; "
                   "ignored for repa/vanilla)")
    g.add_argument("--warmup-from", metavar="CKPT", help="ERW: skip the warmup and start full training from this "
                   "warmup checkpoint (one of our runs' end-of-warmup checkpoints, RUN/checkpoints/<warmup steps>.pt, "
                   "or ERW's released 0100000.pt); its blocks set --l2r-depth and the step numbering; its cost is "
                   "reported as reused, not charged to this run. It may come from another task (other data, "
                   "classes, channels, patch size, resolution): what fits is carried, the rest starts fresh and is "
                   "named; see --plan-transfer")
    g.add_argument("--reuse-labels", choices=("positional", "fresh"), help="--warmup-from when the class names "
                   "are not known on both sides and the class counts are equal: positional (class i keeps the "
                   "warmup's row i) or fresh (every class row starts fresh); also overrides matching by name")
    g.add_argument("--plan-transfer", action="store_true", help="with --warmup-from: print what is carried, what "
                   "starts fresh and what is refused, per parameter group, and exit (nothing is written; status 2 "
                   "when the transfer is refused)")
    g.add_argument("--steps", type=int, help=f"full-training (phase-2) steps (default {d['steps']} on digits)")
    g.add_argument("--lambda-schedule", choices=tuple(SCHEDULES),
                   help="λ(k) over phase-2 steps k: halflife λ0·2^(-k/h) (ERW default), exp λ0·exp(-k/τ), "
                   "constant (REPA default)")
    g.add_argument("--lambda0", type=float, help=f"alignment weight λ0 at the start of full training "
                   f"(default per model, ERW: {t['lambda0']} D/T/D8/S/B, 3 L, 6 XL; REPA: 0.5)")
    g.add_argument("--half-life", type=float, help=f"λ half-life in phase-2 steps (default {d['half_life']} on "
                   "digits; 50000 in the ImageNet recipe)")
    g.add_argument("--tau", type=float, help="time constant of the exp schedule (default half-life / ln 2)")
    g.add_argument("--align-until", type=int, metavar="K", help="REPA/ERW: stop the alignment at phase-2 step K "
                   "(λ = 0 from K on, and no target-encoder forward, projector or alignment loss: the step gets "
                   "cheaper; HASTE, 2025). Default: never")
    g.add_argument("--lambda-min", type=float, default=0.0, help="a λ that the schedule has decayed below this counts "
                   "as 0 and stops the alignment as --align-until does (default 0: off)")
    g.add_argument("--align-loss", default="cosine", choices=tuple(ALIGNMENT_LOSSES),
                   help="alignment loss: negative cosine per token (default) or NT-Xent with in-batch negatives")
    g.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature (default 0.1)")

def _model_flags(g, d, t):
    """The "model" flags."""
    g.add_argument("--model", help=f"SiT size, e.g. SiT-T/2, SiT-S/2, SiT-B/2, SiT-XL/2 (default {d['model']} on digits)")
    g.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                   help="2-D rotary position embedding in attention, same in both phases (default: the method's "
                   "recipe — on for erw and erw-nowarmup, as ERW; off for repa and vanilla, as REPA and SiT)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="LayerNorm on queries and keys, same in both phases (default off)")
    g.add_argument("--attn-backend", default="auto", choices=("auto", "flash", "xformers", "sdpa", "math"),
                   help="attention implementation (default auto: flash-attn > xformers > SDPA)")
    g.add_argument("--fused", type=_fused, nargs="?", const=True, default=None, metavar="{auto,on,off,triton,torch}",
                   help="fused ops (LayerNorm+modulate, gated residual, projection+cosine loss): auto = on for "
                   "CUDA with Triton (default); --fused alone = on; off; or force a backend (triton, torch)")
    g.add_argument("--no-fused", dest="fused", action="store_const", const=False, help="same as --fused off")
    g.add_argument("--projector-dim", type=int, help=f"hidden width of the projector MLP (default {d['projector_dim']} "
                   "on digits, 2048 as REPA otherwise)")
    g.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for guidance (default 0.1)")
    g.add_argument("--compile", action="store_true", help="torch.compile each SiT block (fullgraph)")

def _optimisation_flags(g, d, t):
    """The "optimisation" flags."""
    g.add_argument("--batch-size", type=int, help=f"global batch over all processes (default {d['batch_size']} on digits)")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate, constant (default {d['lr']} on digits, 1e-4 ImageNet)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N", help="split each process's batch into N "
                   "micro-batches, gradients accumulated (the same step as without; DDP syncs once): the paper's "
                   "batch 256 on fewer or smaller GPUs (default 1)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                   "state over the processes with FSDP2 (fully_shard per SiT block; NCCL on GPU, gloo on CPU); "
                   "checkpoints stay full REPA-layout files, resumable with or without --fsdp")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute each SiT block's activations in the "
                   "backward (torch.utils.checkpoint): much less activation memory for ~1/3 more compute")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default 1.0)")
    g.add_argument("--ema-decay", type=float, help=f"EMA decay per step (default {d['ema_decay']} on digits, "
                   "0.9999 ImageNet)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default) = bf16 autocast on CUDA (normalisations in fp32), fp32 on CPU; fp8 = torchao "
                   "float8 training of the blocks' qkv/proj/fc1/fc2 and the projectors' first two layers, bf16 "
                   "autocast for the rest, fp32 master weights/optimizer/EMA (CUDA: compute capability >= 8.9 and "
                   "--compile; CPU: torchao's slow emulation, for checking numerics). Resuming keeps the "
                   "checkpoint's unless given")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, help="--precision fp8: torchao's scaling recipe, tensorwise "
                   "(default) or rowwise (one scale per row; torchao documents it as more accurate with less speed-up; CUDA "
                   "capability >= 9.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order and every per-sample draw (default 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 helps on a "
                   "machine shared with other jobs)")

def _data_and_target_encoder_flags(g, d, t):
    """The "data and target encoder" flags."""
    g.add_argument("--data", default="digits", help="dataset: digits (default, the embedded handwritten digits; "
                   "digits:0-4 or digits:5,6,7,8,9 a subset of the classes, named by their digits), "
                   "imagefolder:DIR (DIR/<class>/<image>.png, pixel space; a plain DIR of class sub-folders too) "
                   "or a latent dataset folder from `python -m erw_fast.preprocess` (or REPA's images/ + vae-sd/ "
                   "layout); latent runs default to the ImageNet recipe (SiT-XL/2, batch 256, ...)")
    g.add_argument("--resolution", type=int, help="image folders: side the images are resized and centre-cropped "
                   "to, a multiple of the model's patch size (default 32; 16 shares the digits' grid)")
    g.add_argument("--hflip", action="store_true", help="image folders: mirror each training sample left-right "
                   "with probability 1/2, drawn per (seed, step, sample)")
    g.add_argument("--encoder", help="target encoder(s), comma-separated: digits-ssl (default on digits: the "
                   "embedded label-free encoder, 8x8 tokens for 16x16 images; it also reads image folders, as grey), "
                   "digits-cnn (the same net trained with the digits' labels), dinov2-vit-{s,b,l,g} or "
                   "dinov2-vit-{s,b,l,g}_reg (default dinov2-vit-b on latent data and image folders); none with "
                   "--method vanilla. A value given is never replaced")
    g.add_argument("--encoder-path", help="local target-encoder weights: a transformers save_pretrained folder "
                   "(facebook/dinov2-*) or a torch.hub clone of facebookresearch/dinov2 (default: the Hugging Face "
                   "or torch hub cache, downloaded when online)")
    g.add_argument("--encoder-source", default="auto", choices=("auto", "transformers", "hub"),
                   help="DINOv2 loading route (default auto: from --encoder-path's contents, else the caches)")
    g.add_argument("--prefetch", type=int, default=2, metavar="N",
                   help="latent data: prepare the next N batches (shard reads, posterior sampling, encoder crops "
                   "or features) in a background thread while the current step trains (default 2; 0 = off; "
                   "the batches are identical either way)")
    g.add_argument("--features", default="online", choices=("online", "precomputed"),
                   help="target features: run the encoder each step (default), or read the fp16 shards written by "
                   "`python -m erw_fast.extract_features` (skips the encoder and the image reads); on the digits, "
                   "extracted once in memory at the start (logged as the 'features' event)")

def _output_flags(g, d, t):
    """The "output" flags."""
    g.add_argument("--out", default="runs/erw-digits", help="output folder (default runs/erw-digits); a folder "
                   "holding another run is refused unless --resume")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue the run in --out from its latest checkpoint, or from CKPT")
    g.add_argument("--sample-every", type=int, help="write an EMA sample grid every N full-training steps (0 = only "
                   "at the end; every run ends with one)")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0 = only at the transfer and the end; "
                   "every run ends with one)")
    g.add_argument("--ckpt-at", type=_step_list, default=None, metavar="N,N,...",
                   help="also checkpoint at these total steps (warmup steps included), e.g. 300,600")
    g.add_argument("--ckpt-every-minutes", type=float, metavar="M", help="also checkpoint when M minutes passed "
                   "since the last one (for preemptible machines)")
    g.add_argument("--keep-last", type=int, metavar="N", help="keep only the N newest periodic checkpoints (the "
                   "end-of-warmup one and --ckpt-at ones are always kept; default: keep all)")
    g.add_argument("--log-every", type=int, help=f"log metrics every N steps (default {d['log_every']} on digits)")
    g.add_argument("--sample-steps", type=int, help=f"sampler steps for the grid (default {d['sample_steps']} on digits)")
    g.add_argument("--sampler", choices=SAMPLERS, help="sampler for the grid (default sde)")
    g.add_argument("--cfg-scale", type=float, help=f"classifier-free guidance scale for the grid "
                   f"(default {d['cfg_scale']} on digits)")
    g.add_argument("--samples-per-class", type=int, help=f"grid columns (default {d['samples_per_class']} on digits, "
                   "1 on latent data)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N", help="FID of the EMA model every N full-training "
                   "steps (and classifier accuracy on the digits), logged as `fid` in metrics.jsonl and TensorBoard; its "
                   "time is not counted as training (default 0: off)")
    g.add_argument("--align-probe-every", type=int, default=0, metavar="N", help="CKNNA between the alignment "
                   "block's tokens and the target features on 128 held-out images (t = 0) every N steps, logged as "
                   "`align_probe` (see python -m erw_fast.probe; default 0: off)")
    g.add_argument("--eval-samples", type=int, default=400, metavar="K", help="class-balanced samples per online "
                   "evaluation, shared by all ranks (rank 0 makes them all under --fsdp; default 400)")
    g.add_argument("--eval-batch", type=int, default=100, help="sampling batch of the online evaluation (default 100)")
    g.add_argument("--inception", metavar="FILE", help="latent data: a local TorchScript Inception-v3 for the online FID")
    g.add_argument("--eval-ref", metavar="NPZ", help="latent data: reference statistics for the online FID (ADM's "
                   "VIRTUAL_imagenet256_labeled.npz layout: mu/sigma, or arr_0 images)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (messages and the final summary still print)")


def build_parser() -> argparse.ArgumentParser:
    d = DATA_DEFAULTS["digits"]
    t = MODEL_DEFAULTS["D"]
    p = argparse.ArgumentParser(
        prog="python -m erw_fast.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _method_flags(p.add_argument_group("method"), d, t)
    _model_flags(p.add_argument_group("model"), d, t)
    _optimisation_flags(p.add_argument_group("optimisation"), d, t)
    _data_and_target_encoder_flags(p.add_argument_group("data and target encoder"), d, t)
    _output_flags(p.add_argument_group("output"), d, t)
    add_debug_flag(p)
    return p


def _step_list(text: str):
    try:
        steps = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ckpt-at wants comma-separated step numbers, got {text!r}") from None
    if any(v < 1 for v in steps):
        raise argparse.ArgumentTypeError(f"--ckpt-at steps must be >= 1, got {text!r}")
    return steps


def config_from_args(args: argparse.Namespace, given=None) -> TrainConfig:
    """``given``: the destinations set on the command line (``utils.cli.given_dests``); ``--resume``
    checks them against the run's settings."""
    names = set(TrainConfig.__dataclass_fields__)
    given = None if given is None else tuple(sorted(k for k in given if k in names))
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}, given=given)


def exit_status(result) -> int:
    """0 finished; 128+N stopped by signal N (checkpoint written, resume with --resume); 3 stopped by
    --stop-after (a testing hook)."""
    if result.status == "finished":
        return EXIT_OK
    if result.status == "interrupted" and result.signal is not None:
        return 128 + int(result.signal)
    return 3


def print_transfer_plan(config: TrainConfig) -> int:
    """``--plan-transfer``: the plan on stdout; 0 when the transfer can run, 2 when it is refused."""
    from .engine.run import transfer_plan

    plan, cfg = transfer_plan(config)
    print(f"transfer plan: --warmup-from {cfg.warmup_from} (L={cfg.l2r_depth}) into {cfg.model} on {cfg.data}")
    print(plan.table())
    if plan.refusals:
        print(f"refused: {'; '.join(plan.refusals)}")
        return 2
    return EXIT_OK


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan_transfer:
        return print_transfer_plan(config_from_args(args, given_dests(parser, argv)))
    try:
        return exit_status(train(config_from_args(args, given_dests(parser, argv))))
    finally:
        shutdown()


def main(argv=None) -> int:
    """The command line: errors as one ``error: ...`` line (status 2; NaN stop 1), see ``exit_status``."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
