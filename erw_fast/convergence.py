"""The convergence study: vanilla SiT vs REPA vs ERW at equal training compute, on the embedded default.

    python -m erw_fast.convergence                   # about 25 min on 2 CPU cores; report in runs/convergence/
    python -m erw_fast.convergence --methods erw-nowarmup    # add the control (about 8 min)
    python -m erw_fast.convergence --update-docs     # write the repository's docs/convergence.md and plot
    python -m erw_fast.convergence --out runs/quick --seeds 0 --points 3 --budget-steps 300   # a quicker look

Every method trains the same model (the digits default, ``SiT-D/2``) on the same data with the same
optimiser settings and the same **training compute**, counted in FLOPs with
``torch.utils.flop_counter`` exactly as the trainer counts them (forward + backward + the frozen
target encoder, per step). The budget is ``--budget-steps`` REPA steps. Vanilla steps are cheaper
(no encoder, no projector), so vanilla gets more of them; ERW spends part of the budget on its
warmup (blocks 0..L-1 only) and the rest on full steps. Wall-clock seconds are measured and
reported beside the FLOPs. The control ``erw-nowarmup`` (ERW's decaying λ, no warmup) separates the
warmup from the λ schedule.

Each run is checkpointed at ``--points`` equal fractions of the budget (ERW only at the fractions
that fall after its warmup). Each checkpoint's EMA model draws the same ``--num-samples`` samples
(per-index seeds, classes balanced, no guidance by default), and the study reports FID against all
1,797 embedded digits in the feature space of the project's independent digits classifier (not
the target encoder, though both learned from the same labels) and the fraction of samples that classifier reads
as the requested digit.

Outputs: ``--out`` holds the runs, ``results.jsonl`` (one line per evaluated checkpoint; a rerun
skips what is there and resumes unfinished runs) and ``study.json``; ``--doc`` (default
``<out>/convergence.md``; ``docs/convergence.md`` with ``--update-docs``) gets the markdown report
(tables, the compute ratios with their seed spread, the command) and ``--plot`` (default
``<out>/convergence.png``) the PNG of FID and accuracy against training compute. Text between
``<!-- notes:start -->`` and ``<!-- notes:end -->`` in an existing doc is kept when the doc is rewritten.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from .evaluation.convergence import ALL_METHODS, StudyConfig, run_study
from .utils.cli import add_debug_flag, run_cli

__all__ = ["build_parser", "main"]


# --------------------------------------------------------------------------------------------
def _ints(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _methods(text: str) -> Tuple[str, ...]:
    ms = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in ms if v not in ALL_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {','.join(ALL_METHODS)}")
    return tuple(m for m in ALL_METHODS if m in ms)


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(prog="python -m erw_fast.convergence", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out, help=f"folder for the runs and results.jsonl (default {d.out}); "
                   "rerunning resumes")
    p.add_argument("--doc", default=None, help="markdown report to write (default <out>/convergence.md; '' = none)")
    p.add_argument("--plot", default=None, help="PNG plot to write (default <out>/convergence.png; '' = none)")
    p.add_argument("--update-docs", action="store_true", help="write the report to the repository's "
                   "docs/convergence.md and docs/images/convergence.png (unless --doc/--plot are given)")
    p.add_argument("--methods", type=_methods, default=d.methods, help="comma-separated subset of vanilla,repa,erw,erw-nowarmup "
                   "(default vanilla,repa,erw; erw-nowarmup is the control: ERW's decaying λ without the warmup). "
                   "The report covers every method evaluated in --out, so a control can be added by a later call")
    p.add_argument("--seeds", type=_ints, default=d.seeds, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--budget-steps", type=int, default=d.budget_steps, help="compute budget per run, in REPA steps "
                   f"(default {d.budget_steps})")
    p.add_argument("--points", type=int, default=d.points, help=f"evaluations per run (default {d.points})")
    p.add_argument("--warmup-steps", type=int, default=None, help="ERW warmup steps (default: the trainer's)")
    p.add_argument("--model", default=None, help="SiT size (default: the digits default, SiT-D/2)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help=f"samples per evaluation (default {d.num_samples})")
    p.add_argument("--sampler", default=d.sampler, choices=("sde", "ode-euler", "ode-heun"))
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help=f"sampler steps (default {d.sample_steps})")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="guidance scale for evaluation (default 1: none)")
    p.add_argument("--eval-seed", type=int, default=d.eval_seed, help="seed of the evaluation noise (shared by all runs)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bars")
    add_debug_flag(p)
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the study; errors are raised (``python -m`` turns them into one ``error:`` line, see
    :func:`erw_fast.utils.cli.run_cli`). The report lists ``argv`` (without ``--debug``) as the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    cfg = StudyConfig(**{k: v for k, v in vars(a).items() if k in StudyConfig.__dataclass_fields__})
    return run_study(cfg, [v for v in argv if v != "--debug"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
