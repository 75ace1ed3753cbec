"""``--fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) for the training engine.

Parameters, gradients and optimizer state are sharded over the processes: each SiT block is its own
unit, then the phase's objective is the root (so the embedders, the final layer and the projectors,
which the objective uses around the model's forward, are gathered for the whole step). The EMA copy
is sharded the same way and follows the sharded parameters shard by shard.

Checkpoints stay in the REPA layout: the full state dicts are gathered (a collective: every rank
calls ``full_state``), rank 0 writes them, and the optimizer state is stored keyed by parameter
index exactly as an unsharded AdamW stores it — so a run trained with FSDP resumes with or without
it and its files load everywhere else.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn


def _mesh(device, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (world,))


def shard(model: nn.Module, root: nn.Module, mesh):
    """fully_shard each block of ``model``, then ``root`` (the objective, or the model itself)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


def trainable_names(model: nn.Module) -> List[str]:
    """The optimizer's parameter order (what an unsharded AdamW's state indices refer to)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def opt_state_by_name(opt_state: dict, names: List[str]) -> dict:
    """An index-keyed optimizer state dict (``opt.state_dict()``) keyed by parameter name instead."""
    if not opt_state.get("state") and not opt_state.get("param_groups"):
        return opt_state
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]
    return {"state": {names[i]: v for i, v in opt_state["state"].items()}, "param_groups": groups}


def opt_state_by_index(opt_state: dict, names: List[str]) -> dict:
    """The inverse of ``opt_state_by_name`` (an empty dict, as non-zero ranks get it, stays empty)."""
    if "param_groups" not in opt_state:
        return opt_state
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in opt_state["param_groups"]]
    return {"state": {index[n]: v for n, v in opt_state["state"].items()}, "param_groups": groups}


def full_state(model: nn.Module, ema_model: nn.Module, opt, names: List[str]) -> Dict[str, dict]:
    """model, ema (full, on CPU) and the optimizer state (index-keyed): collective over the ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=opts), "ema": get_model_state_dict(ema_model, options=opts),
            "opt": opt_state_by_index(get_optimizer_state_dict(model, opt, options=opts), names)}


def load_opt_state(model: nn.Module, opt, opt_state: dict, names: List[str]):
    """Load an index-keyed full optimizer state into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not opt_state.get("state"):
        return
    set_optimizer_state_dict(model, opt, opt_state_by_name(opt_state, names),
                             options=StateDictOptions(full_state_dict=True))


def full_copy(sharded: nn.Module, factory, device):
    """An unsharded copy of ``sharded`` (collective) on rank 0, built by ``factory()``, e.g. the EMA
    model for sampling; None on the other ranks (they do not sample)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:
        return None
    model = factory()
    model.load_state_dict(sd)
    return model.to(device).eval()


def plain_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with full tensors on every rank, also when it is sharded (collective then)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
