"""Sampler correctness on Gaussian data with the exact velocity field, guidance batching, errors, PNG.

Gaussian data x0 ~ N(mu_y, diag sigma_y^2) (per class, per dim). On x_t = (1 - t) x0 + t eps each
dim is jointly Gaussian with a = 1 - t, s^2 = a^2 sigma^2 + t^2:
    E[x0 | x_t] = mu + a sigma^2 / s^2 (x - a mu),  E[eps | x_t] = t / s^2 (x - a mu)
    v(x, t) = E[eps - x0 | x_t] = (t - a sigma^2) / s^2 (x - a mu) - mu.
The field is affine in x, so the ODE samplers map noise affinely: with noise standardised per dim
over the batch, the output mean and variance are exactly the sampler's, with no Monte Carlo error.

Stated tolerances (sigma in [0.4, 1.2], |mu| <~ 2):
- mean: the straight line x = (1 - t) mu solves the ODE, so Euler/Heun reproduce it to 1e-6; the
  SDE mean is within Monte Carlo error (0.02 at 100K samples per class).
- variance, ode-euler: |err| <= 5 / steps (first order); ode-heun: |err| <= 1 / steps^2.
- variance, sde: REPA's schedule stops the noise at t = 0.04 and takes one drift step to 0, which
  leaves a known bias (computed in closed form below, |bias| < 0.01 here); the distance to that
  limit shrinks like 1 / steps (<= 3 / steps + 0.01 Monte Carlo), and the distance to the data
  variance is <= |bias| + 3 / steps + 0.01.
"""
import math

import numpy as np
import pytest
import torch

from erw_fast.sampling import SDE_T_END, index_generator, sample, sample_grid, sample_noise, time_grid
from erw_fast.utils.images import make_grid, read_png, save_png_grid, to_uint8


# --------------------------------------------------------------------------------------------
# Exact Gaussian velocity model
# --------------------------------------------------------------------------------------------
class GaussianVelocity:
    """Exact velocity of the linear interpolant for per-class diagonal Gaussian data."""

    def __init__(self, mu, sigma, return_tuple=True):
        self.mu, self.sigma = mu.double(), sigma.double()
        self.num_classes = mu.shape[0]
        self.return_tuple = return_tuple
        self.calls = []

    def coeffs(self, t, y):
        t = t.double()[:, None]
        m, s = self.mu[y], self.sigma[y]
        a = 1 - t
        A = (t - a * s * s) / (a * a * s * s + t * t)
        return A, -m - A * a * m  # v = A x + c

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]), y.clone()))
        A, c = self.coeffs(t, y)
        v = (A * x.reshape(x.shape[0], -1).double() + c).to(x.dtype).reshape(x.shape)
        return (v, [torch.zeros(1)]) if self.return_tuple else v


def make_problem(num_classes=3, dims=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(num_classes, dims, generator=g)
    sigma = 0.4 + 0.8 * torch.rand(num_classes, dims, generator=g)
    return mu, sigma


def standardised_noise(num_classes, n, dims, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_classes, n, dims, generator=g, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True, unbiased=False)
    return z.reshape(num_classes * n, dims), torch.arange(num_classes).repeat_interleave(n)


def stats_errors(out, mu, sigma, n, target_var=None):
    o = out.reshape(mu.shape[0], n, -1).double()
    target_var = sigma.double() ** 2 if target_var is None else target_var
    return ((o.mean(1) - mu.double()).abs().max().item(),
            (o.var(1, unbiased=False) - target_var).abs().max().item())


def sde_limit_variance(mu, sigma):
    """Variance after exact p_{0.04} and REPA's final drift-only step to t = 0 (the SDE's limit)."""
    t = SDE_T_END
    a = 1 - t
    s2 = a * a * sigma.double() ** 2 + t * t
    A = (t - a * sigma.double() ** 2) / s2
    k = 1 - t - t * (2 - t) * A
    return k * k * s2


# --------------------------------------------------------------------------------------------
# Convergence to the data distribution
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,order,const", [("ode-euler", 1, 5.0), ("ode-heun", 2, 1.0)])
def test_ode_reproduces_gaussian_moments(sampler, order, const):
    mu, sigma = make_problem()
    n = 256
    noise, labels = standardised_noise(3, n, 4)
    errs = []
    for steps in (4, 16, 64):
        model = GaussianVelocity(mu, sigma)
        out = sample(model, noise, labels, sampler=sampler, steps=steps)
        mean_err, var_err = stats_errors(out, mu, sigma, n)
        assert mean_err < 1e-6, (sampler, steps, mean_err)
        assert var_err <= const / steps ** order, (sampler, steps, var_err)
        errs.append(var_err)
        assert len(model.calls) == steps * (2 if sampler == "ode-heun" else 1)
    assert errs[0] > errs[1] > errs[2], errs


def test_sde_reproduces_gaussian_moments():
    mu, sigma = make_problem(num_classes=2, dims=2, seed=3)
    n = 100_000
    limit = sde_limit_variance(mu, sigma)
    bias = (limit - sigma.double() ** 2).abs().max().item()
    assert bias < 0.01  # the known truncation bias of REPA's t_end = 0.04 schedule
    errs = []
    for steps in (8, 32, 128):
        noise, labels = standardised_noise(2, n, 2, seed=steps)
        g = torch.Generator().manual_seed(1000 + steps)  # independent of the initial noise
        out = sample(GaussianVelocity(mu, sigma), noise, labels, sampler="sde", steps=steps, generator=g)
        mean_err, _ = stats_errors(out, mu, sigma, n)
        _, to_limit = stats_errors(out, mu, sigma, n, target_var=limit)
        _, to_data = stats_errors(out, mu, sigma, n)
        assert mean_err < 0.02, (steps, mean_err)
        assert to_limit <= 3.0 / steps + 0.01, (steps, to_limit)
        assert to_data <= bias + 3.0 / steps + 0.01, (steps, to_data)
        errs.append(to_limit)
    assert errs[0] > errs[1] > errs[2], errs


def test_float32_and_images_shape():
    mu, sigma = make_problem(num_classes=2, dims=16)
    model = GaussianVelocity(mu, sigma, return_tuple=False)
    noise = torch.randn(8, 1, 4, 4)
    labels = torch.tensor([0, 1] * 4)
    for sampler in ("ode-euler", "ode-heun", "sde"):
        out = sample(model, noise, labels, sampler=sampler, steps=5)
        assert out.shape == noise.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_time_grids():
    ts = time_grid("sde", 250)
    assert len(ts) == 251 and ts[0] == 1.0 and abs(ts[-2] - 0.04) < 1e-12 and ts[-1] == 0.0
    assert torch.allclose(time_grid("ode-euler", 4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert len(time_grid("sde", 1)) == 2  # steps=1: one deterministic step from 1 to 0


def test_sde_final_step_is_deterministic():
    mu, sigma = make_problem(num_classes=1, dims=4)
    noise, labels = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    a = sample(GaussianVelocity(mu, sigma), noise, labels, sampler="sde", steps=1,
               generator=torch.Generator().manual_seed(0))
    b = sample(GaussianVelocity(mu, sigma), noise, labels, sampler="sde", steps=1,
               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_generator_reproducibility_and_per_sample_generators():
    mu, sigma = make_problem(num_classes=2, dims=4)
    model = GaussianVelocity(mu, sigma)
    noise, gens = sample_noise(range(6), (4,), seed=7)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    full = sample(model, noise, labels, sampler="sde", steps=10, generator=gens)
    # the same indices in a different batch give the same samples
    noise2, gens2 = sample_noise([4, 1], (4,), seed=7)
    part = sample(model, noise2, labels[[4, 1]], sampler="sde", steps=10, generator=gens2)
    assert torch.allclose(part, full[[4, 1]], atol=1e-6)
    one = sample(model, noise, labels, sampler="sde", steps=10, generator=torch.Generator().manual_seed(3))
    two = sample(model, noise, labels, sampler="sde", steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, two)
    assert index_generator(0, 1).initial_seed() != index_generator(1, 0).initial_seed()
    with pytest.raises(ValueError, match="generators"):
        sample(model, noise, labels, sampler="sde", steps=3, generator=gens[:2])


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------
class LabelConstant:
    """v = label value everywhere (null class gives `null_value`), recording every call."""

    def __init__(self, null_id=None, null_value=0.0):
        self.null_id, self.null_value = null_id, null_value
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]), y.clone()))
        v = y.to(x.dtype).clone()
        if self.null_id is not None:
            v[y == self.null_id] = self.null_value
        return v.view(-1, *([1] * (x.dim() - 1))).expand_as(x).clone()


def test_cfg_batching_and_interval():
    model = LabelConstant(null_id=10, null_value=0.5)
    b, steps, scale = 3, 10, 3.0
    noise = torch.zeros(b, 1, 2, 2)
    labels = torch.tensor([1, 2, 4])
    out = sample(model, noise, labels, sampler="ode-euler", steps=steps, cfg_scale=scale,
                 guidance_interval=(0.0, 0.5), null_class=10)
    assert len(model.calls) == steps  # one forward per step, guided or not
    expected = torch.zeros(b, dtype=torch.float64)
    for (rows, t, y), t_val in zip(model.calls, time_grid("ode-euler", steps)[:-1].tolist()):
        assert abs(t - t_val) < 1e-6
        if t <= 0.5 + 1e-9:
            assert rows == 2 * b
            assert torch.equal(y, torch.tensor([1, 2, 4, 10, 10, 10]))
            v = 0.5 + scale * (labels.double() - 0.5)
        else:
            assert rows == b and torch.equal(y, labels)
            v = labels.double()
        expected -= v / steps
    assert torch.allclose(out[:, 0, 0, 0].double(), expected, atol=1e-5)


def test_cfg_scale_one_never_guides_and_needs_no_null_class():
    model = LabelConstant()  # no num_classes attribute
    out = sample(model, torch.zeros(2, 3), torch.tensor([1, 2]), sampler="ode-heun", steps=4)
    assert all(rows == 2 for rows, _, _ in model.calls)
    assert torch.allclose(out[:, 0], -torch.tensor([1.0, 2.0]))


def test_null_class_resolution():
    noise, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="null"):
        sample(LabelConstant(), noise, labels, sampler="ode-euler", steps=2, cfg_scale=2.0)
    model = LabelConstant()
    model.num_classes = 10
    sample(model, noise, labels, sampler="ode-euler", steps=2, cfg_scale=2.0)
    assert all(rows == 4 and (y[2:] == 10).all() for rows, _, y in model.calls)
    model.calls.clear()
    sample(model, noise, labels, sampler="sde", steps=3, cfg_scale=2.0, null_class=7,
           guidance_interval=(0.0, 1.0))
    assert all(rows == 4 and (y[2:] == 7).all() for rows, _, y in model.calls)


def test_cfg_on_a_real_sit():
    from erw_fast.models.sit import SiT

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                encoder_depth=1, num_classes=4, z_dims=[8], projector_dim=16).eval()
    noise = torch.randn(3, 1, 8, 8)
    out = sample(model, noise, torch.tensor([0, 1, 3]), sampler="sde", steps=4, cfg_scale=1.5,
                 guidance_interval=(0.0, 0.7), generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_errors():
    model = LabelConstant()
    noise, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, noise, labels, sampler="dpm")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            sample(model, noise, labels, steps=bad)
    with pytest.raises(ValueError, match="labels"):
        sample(model, noise, torch.tensor([0, 1, 2]), steps=2)
    with pytest.raises(ValueError, match="labels"):
        sample(model, noise, torch.tensor([[0, 1]]), steps=2)
    with pytest.raises(ValueError, match="labels"):
        sample(model, noise, torch.tensor([0.0, 1.0]), steps=2)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(model, noise, labels, steps=2, cfg_scale=2.0, null_class=5, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="returned shape"):
        sample(lambda x, t, y: x[:1], noise, labels, steps=2)


# --------------------------------------------------------------------------------------------
# Grids and PNG
# --------------------------------------------------------------------------------------------
def test_sample_grid_is_class_major(tmp_path):
    mu = torch.tensor([[-0.8] * 4, [0.0] * 4, [0.8] * 4])
    model = GaussianVelocity(mu, torch.full((3, 4), 0.05))
    imgs = sample_grid(model, num_classes=3, per_class=5, shape=(1, 2, 2), sampler="ode-heun", steps=8, seed=1)
    assert imgs.shape == (15, 1, 2, 2)
    per_row = imgs.reshape(3, 5, -1).mean(dim=(1, 2))
    assert torch.allclose(per_row, torch.tensor([-0.8, 0.0, 0.8]), atol=0.05)
    again = sample_grid(model, 3, 5, (1, 2, 2), sampler="ode-heun", steps=8, seed=1)
    assert torch.equal(imgs, again)
    grid = save_png_grid(imgs, str(tmp_path / "g.png"), nrow=5)
    assert grid.shape == (3 * 3 + 1, 5 * 3 + 1, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_roundtrip(tmp_path, channels):
    x = torch.rand(7, channels, 5, 4) * 2 - 1
    path = str(tmp_path / "sub" / "grid.png")
    grid = save_png_grid(x, path, nrow=3, padding=2, upscale=2)
    assert grid.shape == (3 * (10 + 2) + 2, 3 * (8 + 2) + 2, channels) and grid.dtype == np.uint8
    back = read_png(path)
    assert np.array_equal(back, grid[..., 0] if channels == 1 else grid)
    # the first image sits at (padding, padding), nearest-neighbour upscaled
    first = to_uint8(x[0]).transpose(1, 2, 0).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(grid[2:12, 2:10], first)


def test_png_values_and_errors(tmp_path):
    assert to_uint8(np.array([-1.0, 0.0, 1.0, 3.0, -9.0])).tolist() == [0, 128, 255, 255, 0]
    with pytest.raises(ValueError, match="channels"):
        make_grid(np.zeros((2, 2, 4, 4)), nrow=1)
    with pytest.raises(ValueError, match="nrow"):
        make_grid(np.zeros((2, 1, 4, 4)), nrow=0)
    with pytest.raises(ValueError):
        make_grid(np.zeros((4, 4)), nrow=1)


def test_per_sample_noise_is_unchanged_and_moves_in_one_transfer():
    """Each SDE step's noise: sample i's draw is the old per-sample draw, bit for bit, and the batch
    goes to the device in one copy (the old code copied every sample separately)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from erw_fast.sampling.samplers import _randn
    from erw_fast.utils.seeding import index_generator

    shape = (5, 1, 4, 4)
    old = torch.stack([torch.randn(shape[1:], generator=index_generator(7, i)) for i in range(5)])
    new = _randn(shape, [index_generator(7, i) for i in range(5)], "cpu", torch.float32)
    assert torch.equal(new, old)

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                Copies.n += 1
            return func(*args, **(kwargs or {}))

    with Copies():
        out = _randn(shape, [index_generator(7, i) for i in range(5)], "meta", torch.float32)
    assert out.device.type == "meta" and Copies.n == 1


def test_sampling_precision_defaults():
    from erw_fast.sampling.generate import sampling_precision

    assert sampling_precision("auto", "cpu") == (torch.float32, None)
    assert sampling_precision("fp32", "cuda") == (torch.float32, None)
    assert sampling_precision("bf16-autocast", "cpu") == (torch.float32, torch.bfloat16)
    assert sampling_precision("bf16", "cpu") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="--precision"):
        sampling_precision("fp8", "cpu")
