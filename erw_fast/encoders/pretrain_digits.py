"""Pre-train the embedded ``digits-cnn`` target encoder (reproduces erw_fast/assets/digits_encoder.pt).

    python -m erw_fast.encoders.pretrain_digits --out erw_fast/assets/digits_encoder.pt

Recipe (seeded, about a minute on 2 CPU cores): supervised cross-entropy on the training split
(80%, the fixed ``split_indices`` split) of the embedded 16x16 digits, random ±1-pixel shifts,
AdamW (lr 3e-3, weight decay 0.05, cosine decay), batch 128, 30 epochs; the validation accuracy
is printed and stored with the weights. Bit-identical weights need the same CPU and thread count;
elsewhere they agree up to float rounding.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from ..data.digits import load_digits, split_indices
from .digits import ASSET, DigitsCNN


def _shift(x, g):
    """Random translation by -1..1 pixel per image (zero-padded in [-1, 1] space: pad with -1)."""
    B = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (B,), generator=g)
    dy = torch.randint(0, 3, (B,), generator=g)
    S = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(B):
        out[i] = pad[i, :, dy[i]:dy[i] + S, dx[i]:dx[i] + S]
    return out


def pretrain(epochs: int = 30, batch_size: int = 128, lr: float = 3e-3, seed: int = 0, width: int = 64,
             verbose: bool = True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits(16)
    tr, va = split_indices(len(y))
    net = DigitsCNN(width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if verbose and (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  {time.time() - t0:.1f}s", flush=True)
    net.eval()
    with torch.no_grad():
        acc = (net(x[va]).argmax(1) == y[va]).float().mean().item()
    return net, acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=ASSET, help="where to write the weights (default: the packaged asset)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--width", type=int, default=64, help="feature width = token dim (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    net, acc = pretrain(a.epochs, a.batch_size, a.lr, a.seed, a.width)
    print(f"validation accuracy {acc:.4f}")
    blob = {
        "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "config": dict(net.config),
        "recipe": dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, width=a.width),
        "val_acc": float(acc),
    }
    save_weights(blob, a.out)


def save_weights(blob: dict, out: str):
    """Write an encoder's weights file atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
