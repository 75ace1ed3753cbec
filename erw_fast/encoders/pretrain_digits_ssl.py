"""Pre-train the label-free ``digits-ssl`` target encoder (reproduces erw_fast/assets/digits_ssl_encoder.pt).

    python -m erw_fast.encoders.pretrain_digits_ssl --out erw_fast/assets/digits_ssl_encoder.pt

Why this objective. ``digits-cnn`` learned from the digits' labels, so aligning a SiT to it can hand
class information to the model, and the digits classifier that scores FID learned from the same labels.
DINOv2, the encoder ERW is about, never saw a label. This recipe trains the same ``DigitsCNN``
(same token grid: 8x8 tokens of width 64, same size class) with a contrastive SimCLR objective (NT-Xent
between two augmented views of each image; Chen et al. 2020): the only signal is "these two views
come from the same image". It is chosen over a masked-patch objective because an 8x8 grid of 2x2-pixel
patches is too coarse to reconstruct anything semantic, and over BYOL/DINO because with ~1,400
images and a minute of CPU it needs no momentum teacher or centring to avoid collapse (the in-batch
negatives do that). The augmentations are the ones that keep a 16x16 digit's identity: a small random
affine map (rotation ±12°, scale 0.85-1.15, shift ±1.5 px, shear ±0.15), stroke-intensity jitter
(contrast 0.7-1.3), a random 5x5 erased square (p = 0.5) and pixel noise (σ 0.08); no flips (a
mirrored 2, 3, 5, 7 or 9 is not the same digit). The loss reads the mean-pooled feature map through a
2-layer projection head (dropped afterwards), as SimCLR does; the tokens it shapes are the ones the
alignment reads.

Recipe (seeded; 150 steps, a few minutes on 2 idle CPU cores — the shipped weights took 12 min on
this project's 2-core VM shared with other jobs, load ~13; linear probe 96.4%): the training split (80%, the fixed ``split_indices``
split; the validation 20% stays held out for the probe), batch 256 (two views each), temperature 0.2,
AdamW (lr 3e-3, weight decay 0.05, cosine decay), 30 epochs (5 steps each). No label enters the objective: ``train_ssl``
receives images only. Afterwards a linear probe (multinomial logistic regression on the standardised
mean-pooled features of the training split, full-batch L-BFGS) reports the validation accuracy — a
measure of what the features hold, not a gate; it is stored with the weights. Bit-identical weights
need the same CPU and thread count; elsewhere they agree up to float rounding.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import load_digits, split_indices
from .digits import SSL_ASSET, DigitsCNN
from .pretrain_digits import save_weights


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each image (B, 1, S, S) in [-1, 1] (see the module doc); background stays -1."""
    B, _, S, _ = x.shape
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=g)  # noqa: E731
    ang, scale, shear = u(-12, 12) * math.pi / 180, u(0.85, 1.15), u(-0.15, 0.15)
    tx, ty = u(-1.5, 1.5) * 2 / S, u(-1.5, 1.5) * 2 / S
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ink = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 0 = background
    ink = ink * u(0.7, 1.3).view(B, 1, 1, 1)
    cy, cx = torch.randint(0, S, (B,), generator=g), torch.randint(0, S, (B,), generator=g)
    rows, cols = torch.arange(S).view(1, S, 1), torch.arange(S).view(1, 1, S)
    square = ((rows - cy.view(B, 1, 1)).abs() <= 2) & ((cols - cx.view(B, 1, 1)).abs() <= 2)
    erase = square & (torch.rand(B, generator=g) < 0.5).view(B, 1, 1)
    ink = ink.masked_fill(erase.unsqueeze(1), 0.0)
    out = ink - 1 + 0.08 * torch.randn(x.shape, generator=g)
    return out.clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its image, the 2B - 2 others negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_ssl(images: torch.Tensor, epochs: int = 30, batch_size: int = 256, lr: float = 3e-3, seed: int = 0,
              width: int = 64, temperature: float = 0.2, verbose: bool = True) -> DigitsCNN:
    """SimCLR on ``images`` (N, 1, S, S) in [-1, 1]; no labels. Returns the trained net (its ``head``
    untouched: the contrastive projection head is discarded)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = DigitsCNN(width=width)
    proj = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
    params = list(net.stem.parameters()) + list(net.down.parameters()) + list(net.stage1.parameters()) + \
        list(net.stage2.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    n = images.shape[0]
    steps_per_epoch = n // batch_size if n >= batch_size else 1
    total, step, t0 = epochs * steps_per_epoch, 0, time.time()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            xb = images[perm[i * batch_size:(i + 1) * batch_size]]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            z1 = proj(net.feature_map(augment(xb, g)).mean(dim=(2, 3)))
            z2 = proj(net.feature_map(augment(xb, g)).mean(dim=(2, 3)))
            loss = nt_xent(z1, z2, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if verbose and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  NT-Xent {loss.item():.4f}  {time.time() - t0:.1f}s", flush=True)
    return net.eval()


@torch.no_grad()
def pooled_features(net: DigitsCNN, images: torch.Tensor) -> torch.Tensor:
    return net.feature_map(images).mean(dim=(2, 3))


def linear_probe(net: DigitsCNN, x_train, y_train, x_val, y_val, iters: int = 200, l2: float = 1e-3) -> float:
    """Validation accuracy of a multinomial logistic regression on the frozen, standardised mean-pooled
    features (full-batch L-BFGS, zero init: deterministic)."""
    ftr, fva = pooled_features(net, x_train), pooled_features(net, x_val)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    classes = int(max(y_train.max(), y_val.max())) + 1
    w = torch.zeros(ftr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(ftr @ w + b, y_train) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((fva @ w + b).argmax(1) == y_val).float().mean())


def pretrain(epochs: int = 30, batch_size: int = 256, lr: float = 3e-3, seed: int = 0, width: int = 64,
             temperature: float = 0.2, verbose: bool = True):
    """(net, linear-probe validation accuracy): SimCLR on the training split's images, the labels read
    only afterwards, by the probe."""
    x, y = load_digits(16)
    tr, va = split_indices(len(y))
    net = train_ssl(x[tr], epochs, batch_size, lr, seed, width, temperature, verbose)
    return net, linear_probe(net, x[tr], y[tr], x[va], y[va])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=SSL_ASSET, help="where to write the weights (default: the packaged asset)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch, two views each (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (default 0.2)")
    p.add_argument("--width", type=int, default=64, help="feature width = token dim (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    t0 = time.time()
    net, acc = pretrain(a.epochs, a.batch_size, a.lr, a.seed, a.width, a.temperature)
    print(f"linear-probe validation accuracy {acc:.4f} ({time.time() - t0:.0f} s, {torch.get_num_threads()} threads)")
    sd = {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
    blob = {"state_dict": sd, "config": dict(net.config), "objective": "simclr (no labels)",
            "recipe": dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, temperature=a.temperature,
                           seed=a.seed, width=a.width),
            "val_acc": float(acc), "val_acc_kind": "linear probe on the frozen mean-pooled features"}
    save_weights(blob, a.out)


if __name__ == "__main__":
    main()
