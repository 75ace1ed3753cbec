"""Does a reused foundation pay? Warm up on the digits 0–4 once per seed, then train on the digits 5–9
from it, against ERW with its own warmup on 5–9 and REPA on 5–9, at equal compute for the second task.

    python -m erw_fast.reuse_study                 # 3 seeds (see --plan for the steps; ~15 min on 2 cores)
    python -m erw_fast.reuse_study --seeds 3,4,5   # more seeds into the same folder (the report covers all)
    python -m erw_fast.reuse_study --plan          # FLOPs per step and every arm's steps; nothing is written
    python -m erw_fast.reuse_study --quick         # a smoke test (seconds)

The reused warmup is counted as 0 (arm ``reuse``) and, separately, in full (``reuse-charged``: its
warmup steps and its feature extraction charged to the second task). The target encoder is a setting
(--encoder; default: the trainer's digits default). Outputs in --out: one folder per run, settings.json
(written before the first run; other settings in the same folder are refused), results.jsonl and the
markdown report (--doc, default <out>/reuse.md). See erw_fast/study/reuse.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .study.reuse import QUICK, ReuseConfig, reuse_config, run_reuse_study
from .utils.cli import add_debug_flag, add_machine_flags, int_list, preset_flags, run_cli


def build_parser() -> argparse.ArgumentParser:
    d = ReuseConfig()
    p = argparse.ArgumentParser(prog="python -m erw_fast.reuse_study", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke test: seed 0, budget {QUICK['budget_steps']} steps, "
                   f"batch {QUICK['batch_size']}, {QUICK['num_samples']} samples (out {QUICK['out']})")
    p.add_argument("--out", help=f"folder for the runs (default {d.out}); rerunning continues it")
    p.add_argument("--doc", help="markdown report to write (default <out>/reuse.md; '' = none)")
    p.add_argument("--seeds", type=int_list, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--plan", dest="plan_only", action="store_true", help="print the plan and stop; nothing is written")
    g = p.add_argument_group("the runs (changing one needs another --out)")
    g.add_argument("--first", help=f"the foundation's data (default {d.first})")
    g.add_argument("--second", help=f"the data it is reused on (default {d.second})")
    g.add_argument("--model", help=f"SiT size (default {d.model})")
    g.add_argument("--encoder", help="target encoder (default: the trainer's digits default)")
    g.add_argument("--features", choices=("online", "precomputed"), help=f"default {d.features}")
    g.add_argument("--projector-dim", type=int, help="projector width (default: the trainer's)")
    g.add_argument("--batch-size", type=int, help="batch (default: the trainer's digits default)")
    g.add_argument("--budget-steps", type=int, help=f"second-task budget per arm in REPA steps (default {d.budget_steps})")
    g.add_argument("--warmup-fraction", type=float, help=f"warmup share of the budget (default {d.warmup_fraction:g})")
    g.add_argument("--num-samples", type=int, help=f"samples per evaluation (default {d.num_samples})")
    g.add_argument("--sample-steps", type=int, help=f"sampler steps (default {d.sample_steps})")
    add_machine_flags(p, d.jobs)
    add_debug_flag(p)
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the study; errors are raised (``python -m`` prints them as one ``error:`` line)."""
    quick, flags, argv = preset_flags(build_parser(), argv)
    return run_reuse_study(reuse_config(quick=quick, **flags), argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
