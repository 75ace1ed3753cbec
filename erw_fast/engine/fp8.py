"""``--precision fp8``: torchao's float8 training of the SiT's large linears.

``torchao.float8.convert_to_float8_training`` swaps the chosen ``nn.Linear``s for ``Float8Linear``s
that cast input, weight and output gradient to float8 (tensorwise: e4m3 forward, e5m2 gradients) with dynamic
scales and run the three GEMMs of a linear in float8; everything else runs under bf16 autocast. The
swapped modules keep the same ``weight``/``bias`` parameters (fp32 master weights, the same optimizer
state, the same state-dict keys), so checkpoints stay REPA-layout plain tensors, and the EMA copy
(made before the swap) stays a plain model.

On CUDA the float8 GEMMs need compute capability >= 8.9 (Ada, Hopper) and ``--compile`` (torchao's
casts are only fast fused by the compiler); on CPU torchao emulates them (slow: for tests and for
checking numerics). Every decision of this mode lives here: which linears (``fp8_eligible``), whether
this machine can run it (``check_fp8``), the torchao config (``fp8_config``) and the swap
(``convert_to_fp8``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple

import torch
import torch.nn as nn

RECIPES = ("tensorwise", "rowwise")   # torchao's Float8LinearRecipeName values offered here
MIN_CAPABILITY = (8, 9)               # float8 tensor cores: Ada (8.9) and Hopper (9.0) and newer
ROWWISE_MIN_CAPABILITY = (9, 0)       # torch's row-wise scaled matmul needs Hopper or newer
TORCHAO_HINT = ("pip install torchao (torch 2.13: 0.18.0; torch 2.11: 0.17.0). Without network (the GPU machine): "
                "elsewhere run 'pip download --no-deps torchao==0.17.0 -d wheels', copy wheels/torchao-0.17.0-*.whl "
                "over, there run 'pip install --no-deps torchao-0.17.0-*.whl' (docs/BENCHMARKS.md)")

# The linears worth float8 (names as REPA's SiT spells them): the attention's qkv and output
# projections, the MLP's fc1/fc2 and the projector MLP's first two layers. Left out on purpose:
# - the adaLN modulation linears: their rows are the batch (B x D @ D x 6D), a GEMM too small to gain
#   and their outputs scale every block's residual stream, where float8 rounding would hurt most;
# - the embedders (patch conv, timestep MLP on B rows, label table): small or not a Linear;
# - the final layer: a narrow output (p*p*C) that directly forms the predicted velocity;
# - the projector's last layer: its output is what the cosine alignment compares (and the fused
#   alignment loss reads its weight directly, bypassing the module);
# - any linear whose in/out features are not multiples of 16 (float8 GEMMs need them).
_FP8_NAME = re.compile(r"^(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))|projectors\.\d+\.(0|2))$")


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """THE filter: True for the linears that ``--precision fp8`` runs in float8 (see above)."""
    return (type(module) is nn.Linear and bool(_FP8_NAME.match(fqn))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def torchao_float8():
    """``torchao.float8``, or a ValueError saying how to install torchao."""
    try:
        import torchao.float8 as f8
    except Exception as e:  # ImportError, or a torchao built for another torch
        raise ValueError(f"--precision fp8 needs torchao, which does not import here ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:120]}); {TORCHAO_HINT}") from None
    return f8


def check_fp8(recipe: Optional[str], compile: bool, device, capability: Optional[Tuple[int, int]] = None,
              card: Optional[str] = None):
    """Refuse (one-line ValueError naming the flag and the card) what cannot run float8 training:
    an unknown recipe, torchao missing, a CUDA card below compute capability 8.9 (rowwise: 9.0), CUDA
    without ``--compile``. ``capability``/``card`` default to the device's own (tests inject them)."""
    recipe = recipe or RECIPES[0]
    if recipe not in RECIPES:
        raise ValueError(f"--fp8-recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    device = torch.device(device)
    if device.type == "cuda":
        if capability is None:
            capability = torch.cuda.get_device_capability(device)
            card = card or torch.cuda.get_device_name(device)
        need = ROWWISE_MIN_CAPABILITY if recipe == "rowwise" else MIN_CAPABILITY
        cap = f"{card or 'this GPU'} (compute capability {capability[0]}.{capability[1]})"
        if tuple(capability) < need:
            raise ValueError(f"--precision fp8{' --fp8-recipe rowwise' if recipe == 'rowwise' else ''} needs a GPU "
                             f"of compute capability >= {need[0]}.{need[1]} (Ada/Hopper); {cap} has no float8 "
                             "tensor cores: use --precision bf16")
        if not compile:
            raise ValueError(f"--precision fp8 on {cap} needs --compile (torchao's float8 casts are fused by "
                             "the compiler; eager they cost more than they save)")
    elif device.type != "cpu":
        raise ValueError(f"--precision fp8 runs on CUDA (capability >= 8.9) or emulated on CPU, not {device.type}")
    torchao_float8()


def fp8_config(recipe: str, device, fsdp: bool = False):
    """torchao's ``Float8LinearConfig`` for ``recipe``: emulated on CPU; with FSDP2 on CUDA and the
    tensorwise recipe, the weights are all-gathered in float8 (half the traffic)."""
    f8 = torchao_float8()
    cfg = f8.Float8LinearConfig.from_recipe_name(recipe)
    cuda = torch.device(device).type == "cuda"
    return dataclasses.replace(cfg, emulate=not cuda, enable_fsdp_float8_all_gather=cuda and fsdp and
                               recipe == "tensorwise")


def convert_to_fp8(model: nn.Module, recipe: str, device, fsdp: bool = False) -> int:
    """Swap ``model``'s eligible linears for torchao's ``Float8Linear`` in place (same parameters);
    returns how many were swapped."""
    f8 = torchao_float8()
    f8.convert_to_float8_training(model, module_filter_fn=fp8_eligible, config=fp8_config(recipe, device, fsdp))
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` of ``t``'s values: torchao's float8 all-gather (FSDP on CUDA) wraps the
    weights in a tensor subclass that keeps the high-precision weight as ``_tensor``; checkpoints hold
    plain tensors."""
    inner = getattr(t, "_tensor", None)
    if type(t) is not torch.Tensor and isinstance(inner, torch.Tensor):
        t = inner
    return t.detach()
