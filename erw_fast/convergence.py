"""The convergence study: vanilla SiT, REPA and ERW at equal training compute, at the ERW paper's proportions.

    python -m erw_fast.convergence --update-docs   # the study (about 70 min on 2 CPU cores) → docs/convergence.md
    python -m erw_fast.convergence --seeds 3,4,5   # more seeds into the same folder (the report covers all)
    python -m erw_fast.convergence --plan          # the plan only: steps, evaluation points, FLOPs
    python -m erw_fast.convergence --quick         # a smoke test of the whole study (about a minute)
    python -m erw_fast.convergence --data imagefolder:DIR --encoder-path DINOV2_DIR --plan   # on your own images
    python -m erw_fast.convergence --data LATENT_DIR --encoder-path DINOV2_DIR --plan        # on preprocessed latents

The preset keeps the proportions of ERW's SiT-XL/2 setting on the embedded digits: SiT-D8/2
(8 blocks, 64 wide), ERW's warmup region 1 block (XL: 4 of 28), alignment at block 4 of 8 (XL: 14 of
28), a projector twice the width (XL: 2048 for 1152) and the target features extracted once before
training (the digits have no augmentation), so an ERW warmup step costs 18% of a full step (the
paper: 19%). The target encoder is the embedded label-free ``digits-ssl`` (--encoder digits-cnn: the
same net trained with the digits' labels, the first study's target).

On an image folder (--data imagefolder:DIR, or a DIR of class sub-folders, at the trainer's 32 px) the
preset, printed by --plan, is SiT-D8/4 (the same 8x8 token grid), the trainer's batch halved while it
exceeds a quarter of the folder (>= 8), and dinov2-vit-b run online; FD is measured against the
folder's images in the encoder's space (DINOv2: its CLS token), FID only with --inception FILE (else
null, and the speed figure uses fd_<encoder>).

On a latent dataset (--data DIR written by python -m erw_fast.preprocess) the preset is SiT-D8 with the
patch whose token grid is nearest 8x8 (or the grid of target features that python -m
erw_fast.extract_features stored in DIR: then read, not run, and their extraction charged), a batch
fitted as for a folder, and the digits preset's lr, EMA and λ half-life (the trainer's latent defaults
are the 400K-step ImageNet recipe). Samples are decoded with the dataset's VAE (the one its index.json
records) and scored against the images the dataset stores beside its latents (at most 5,000).

Every arm trains the same model on the same data with the same optimiser and the same training
compute, counted in FLOPs with ``torch.utils.flop_counter`` exactly as the trainer counts them: the
budget is --budget-steps REPA steps plus the one-off feature extraction, which every arm that aligns
pays and vanilla spends on training. The arms: vanilla; REPA; REPA with the alignment stopped at
--stop-fraction of the budget; ERW with its warmup taking each of --warmup-fractions of the budget;
ERW at --stop-warmup with the alignment stop; and the control erw-nowarmup (ERW's decaying λ without
the warmup). Wall-clock seconds are measured beside the FLOPs.

Each run is checkpointed at --points equal shares of the budget (ERW only after its warmup); each
checkpoint's EMA model draws the same --num-samples samples (per-index seeds, balanced classes), scored
by FID against all 1,797 digits in the feature space of the project's digits classifier, by the
share of samples that classifier reads as the requested digit, and by fd_<encoder>: the Fréchet
distance in the target encoder's space (which may favour the arms aligned to it). Each ERW run's
end-of-warmup checkpoint gets the probe's CKNNA at the aligned block (the encoder's fit). The report
gives the compute and seconds to reach fixed FID targets τ (--fid-targets, or three targets fixed by
a rule from the arms' final FIDs), the share of the budget to reach REPA's final FID, and ends with a
verdict, also printed as one line.

Outputs: --out holds one folder per run (<arm>-seed<seed>: checkpoints, metrics.jsonl, train.log,
evals.jsonl; fit.json for ERW: the CKNNA after its warmup), results.jsonl, study.json, settings.json (a rerun with other settings or another
plan is refused) and invocations.jsonl (every call: command, wall clock, runs trained); --doc (default <out>/convergence.md; docs/convergence.md with --update-docs) gets the
report and --plot the PNG. Text between <!-- notes:start --> and <!-- notes:end --> in an existing
doc is kept. Rerunning resumes: finished runs and evaluations are kept, an unfinished run continues
from its last checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from .study import run_study, study_config
from .study.config import QUICK, StudyConfig
from .utils.cli import add_debug_flag, add_machine_flags, int_list, preset_flags, run_cli

__all__ = ["build_parser", "main"]


def _shares(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares such as 0.05,0.1, got {text!r}") from None


def _names(text: str) -> Tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _run_group(p: argparse.ArgumentParser, d: StudyConfig):
    g = p.add_argument_group("the runs (changing one needs another --out)")
    g.add_argument("--data", help="the data: digits (default: the embedded digits), an image folder "
                   "(imagefolder:DIR, or a DIR of class sub-folders, taken at the trainer's 32 px), or a latent "
                   "dataset folder from python -m erw_fast.preprocess (decoded with its VAE for evaluation)")
    g.add_argument("--model", help="SiT size (default: digits SiT-D8/2; an image folder SiT-D8/4, the same 8x8 "
                   "token grid; latents the patch nearest an 8x8 grid, or the stored features' grid)")
    g.add_argument("--encoder", help="target encoder (default on the digits: digits-ssl, the embedded label-free "
                   "encoder; digits-cnn: the same net trained with the digits' labels, the setting of the first study. "
                   "On an image folder or latents: dinov2-vit-b)")
    g.add_argument("--encoder-path", help="local weights of --encoder (e.g. a DINOv2 transformers folder)")
    g.add_argument("--inception", help="image folders, latents: a local TorchScript Inception file for FID against "
                   "the folder's (the latent dataset's stored) images (without it FID is null and the speed figure "
                   "uses fd_<encoder>)")
    g.add_argument("--projector-dim", type=int, help=f"projector width (default {d.projector_dim})")
    g.add_argument("--batch-size", type=int, help="training batch (default: the trainer's, 64; on an image folder "
                   "or latents smaller when the data is small: at most a quarter of its images, at least 8)")
    g.add_argument("--features", choices=("online", "precomputed"),
                   help="target features: extracted once before training, counted (default on the digits; on "
                   "latents the default when extract_features stored them, their extraction counted), or the "
                   "encoder run every step (default on an image folder, and on latents without stored features)")
    g.add_argument("--budget-steps", type=int, help=f"compute budget per arm, in REPA steps (default {d.budget_steps}; "
                   f"--quick {QUICK['budget_steps']})")
    g.add_argument("--points", type=int, help=f"evaluations per run at equal shares of the budget, >= 2 (default "
                   f"{d.points}; --quick {QUICK['points']})")
    g.add_argument("--warmup-fractions", type=_shares, help="ERW arms: share of the budget spent in the warmup "
                   f"(default {','.join(f'{v:g}' for v in d.warmup_fractions)})")
    g.add_argument("--stop-fraction", type=float, help="the -stop arms: the alignment ends once this share of the "
                   f"budget is spent (default {d.stop_fraction:g})")
    g.add_argument("--stop-warmup", type=float, help=f"warmup share of the ERW arm with the stop (default {d.stop_warmup:g})")
    g.add_argument("--num-samples", type=int, help=f"samples per evaluation (default {d.num_samples}; --quick "
                   f"{QUICK['num_samples']})")
    g.add_argument("--sampler", choices=("sde", "ode-euler", "ode-heun"), help=f"default {d.sampler}")
    g.add_argument("--sample-steps", type=int, help=f"sampler steps (default {d.sample_steps}; --quick "
                   f"{QUICK['sample_steps']})")
    g.add_argument("--cfg-scale", type=float, help="guidance scale for evaluation (default 1: none)")
    g.add_argument("--fid-targets", type=_shares, help="comma-separated FID targets τ of the speed figure (compute "
                   "to reach FID <= τ; default: three targets fixed by a rule from the arms' final FIDs, see "
                   "docs/convergence.md); report only, a rerun with other targets reuses the runs")
    g.add_argument("--eval-seed", type=int, help=f"seed of the evaluation noise, shared by all runs (default {d.eval_seed})")


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(prog="python -m erw_fast.convergence", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smoke-test preset: one seed, a budget of "
                   f"{QUICK['budget_steps']} steps, {QUICK['num_samples']} samples (out {QUICK['out']})")
    p.add_argument("--out", help=f"folder for the runs (default {d.out}); rerunning resumes")
    p.add_argument("--doc", help="markdown report to write (default <out>/convergence.md; '' = none)")
    p.add_argument("--plot", help="PNG plot to write (default <out>/convergence.png; '' = none)")
    p.add_argument("--update-docs", action="store_true", help="write the report to docs/convergence.md and "
                   "docs/images/convergence.png of the checkout erw_fast is installed from (unless --doc/--plot are "
                   "given; refused with --quick)")
    p.add_argument("--arms", type=_names, help="comma-separated subset of the arms to run now (default all; with the "
                   "default shares: vanilla, repa, repa-stop, erw-w05, erw-w10, erw-w20, erw-w40, erw-w10-stop, "
                   "erw-nowarmup; erw-wNN follows --warmup-fractions); the report covers every arm evaluated in --out")
    p.add_argument("--seeds", type=int_list, help="comma-separated training seeds (default 0,1,2; --quick 0)")
    p.add_argument("--plan", dest="plan_only", action="store_true", help="print the plan (FLOPs per step, every "
                   "arm's steps and evaluation points) and stop; nothing is written")
    _run_group(p, d)
    add_machine_flags(p, d.jobs)
    add_debug_flag(p)
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the study; errors are raised (``python -m`` turns them into one ``error:`` line, see
    :func:`erw_fast.utils.cli.run_cli`). The report lists ``argv`` (without ``--debug``) as the command."""
    quick, flags, argv = preset_flags(build_parser(), argv)
    return run_study(study_config(quick=quick, **flags), argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
