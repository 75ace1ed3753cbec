"""Sampling: the ODE/SDE samplers (:mod:`.samplers`), classifier-free guidance with an interval
(:mod:`.guidance`), per-index seeded generation and sample files (:mod:`.generate`) and the
AOTInductor export of the guided velocity (:mod:`.export`)."""
from ..utils.seeding import index_generator
from .samplers import SAMPLERS, SDE_T_END, sample, sample_grid, sample_noise, time_grid

__all__ = ["SAMPLERS", "sample", "sample_grid", "sample_noise", "index_generator", "time_grid"]
