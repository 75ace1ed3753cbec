"""``--align-probe-every N``: the CKNNA (``erw_fast.evaluation.cknna``) between the alignment block's
mean-pooled tokens (the output of block L − 1 in the warmup, of block ``--encoder-depth`` − 1 in full
training) and the target encoder's mean-pooled features, on a fixed set of held-out images at t = 0,
logged as an ``align_probe`` event (and to TensorBoard) while the model trains. Rank 0 computes it.
Its ``block`` is 0-based, as REPA's state-dict keys ``blocks.N``, the banner and ``python -m
erw_fast.probe``'s table."""
from __future__ import annotations

import time

import torch

PROBE_IMAGES = 128


class AlignProbe:
    def __init__(self, run, warm: bool):
        from ..evaluation.probe import held_out_indices

        cfg, data = run.cfg, run.data
        # 0-based, as REPA's state-dict keys blocks.N and the probe's table: the output of block depth - 1
        self.block = (cfg.l2r_depth if warm else cfg.encoder_depth) - 1
        idx, self.held_out, _ = held_out_indices(cfg.data, data, PROBE_IMAGES)
        x, y, pixels = data.batch(idx, cfg.seed, 0, list(range(len(idx))), with_pixels=True)
        self.x, self.y = x.to(run.dist.device), y.to(run.dist.device)
        with torch.no_grad():
            enc = run.encoders[0]
            feats = enc.features(idx) if getattr(enc, "precomputed", False) else enc(pixels.to(run.dist.device))
        self.target = feats.float().mean(dim=1).cpu()

    @torch.no_grad()
    def __call__(self, run, model, step: int, phase: str):
        from ..evaluation.cknna import cknna
        from ..evaluation.probe import block_features

        t0 = time.time()
        was_training = model.training
        model.eval()
        feats = block_features(model, self.x, 0.0, self.y)[self.block]
        model.train(was_training)
        value = cknna(feats, self.target, topk=10)
        run.log.write({"event": "align_probe", "phase": phase, "step": step, "block": self.block, "cknna": value,
                       "num_images": len(self.target), "seconds": time.time() - t0})
        return value
