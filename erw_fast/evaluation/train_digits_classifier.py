"""Reproduce ``erw_fast/assets/digits_classifier.pt``: ``python -m erw_fast.evaluation.train_digits_classifier``.

Train split only (``erw_fast.data.digits.split_indices``, 20% val, seed 0); the val split is only
measured and reported, never used for selection (the final epoch's weights are shipped).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from ..data.digits import DigitsDataset
from .digits_classifier import WEIGHTS, DigitsClassifier


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random affine per image: rotation +-12 deg, scale 0.9..1.1, shift +-1.5 px (16-px images)."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (1.5 / 8)  # normalised coords: 8 px per unit
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with the background value -1
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def cosface_loss(cos: torch.Tensor, y: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """Large-margin cosine loss: cross-entropy on ``scale * (cos - margin * onehot(y))``."""
    return F.cross_entropy(scale * (cos - margin * F.one_hot(y, cos.shape[1]).to(cos.dtype)), y)


def train(epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, threads: int = 2,
          margin: float = 0.2, log=print) -> tuple:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    tr, va = DigitsDataset(split="train"), DigitsDataset(split="val")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=g)
        total = 0.0
        for i in range(0, len(tr), batch_size):
            idx = perm[i:i + batch_size]
            x, y = augment(tr.images[idx], g), tr.labels[idx]
            loss = cosface_loss(model.cosines(x), y, model.scale, margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == epochs - 1:
            log(f"epoch {epoch + 1:3d}  loss {total / len(tr):.4f}  train acc {accuracy(model, tr.images, tr.labels):.4f}"
                f"  val acc {accuracy(model, va.images, va.labels):.4f}  ({time.time() - t0:.0f}s)")
    model.eval()
    return model, accuracy(model, tr.images, tr.labels), accuracy(model, va.images, va.labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--out", default=WEIGHTS)
    a = p.parse_args(argv)
    model, train_acc, val_acc = train(a.epochs, a.batch_size, a.lr, a.seed, a.threads, a.margin)
    blob = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": {"num_classes": model.num_classes, "scale": model.scale},
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "recipe": f"erw_fast.evaluation.train_digits_classifier epochs={a.epochs} batch={a.batch_size} "
                  f"lr={a.lr} seed={a.seed} margin={a.margin} (CosFace, scale {model.scale})",
    }
    torch.save(blob, a.out)
    print(f"wrote {a.out}: train acc {train_acc:.4f}, val acc {val_acc:.4f}")


if __name__ == "__main__":
    main()
