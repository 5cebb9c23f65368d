"""The training step's per-sample random numbers (training/noise.py)."""

import pytest
import torch

from training import noise

SEEDS = torch.tensor([0, 1, 2**40 + 7, 2**63 - 1, 12345], dtype=torch.int64)


def test_each_sample_depends_on_its_seed_alone():
    batch = noise.randn(SEEDS, noise.NOISE, (4, 8, 8))
    assert batch.shape == (5, 4, 8, 8) and batch.dtype == torch.float32
    for i in range(len(SEEDS)):
        assert torch.equal(batch[i], noise.randn(SEEDS[i : i + 1], noise.NOISE, (4, 8, 8))[0])
    assert torch.equal(batch, noise.randn(SEEDS, noise.NOISE, (4, 8, 8)))  # deterministic
    # Other seeds and other streams give other numbers.
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(batch, noise.randn(SEEDS, noise.POSTERIOR, (4, 8, 8)))


def test_distributions():
    seeds = torch.arange(64, dtype=torch.int64) * 1_000_003
    z = noise.randn(seeds, noise.NOISE, (64, 64)).flatten().double()  # 262,144 numbers
    # Stated bounds, about 5 standard errors: mean 0 +- 0.01, variance 1 +- 0.015, kurtosis 3 +- 0.05.
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.015
    assert abs((z**4).mean() / z.var() ** 2 - 3) < 0.05
    assert z.abs().max() < 6  # Box-Muller of 24-bit uniforms is bounded by 5.77
    # Neighbouring elements, neighbouring seeds and two streams of one seed are uncorrelated.
    a = noise.randn(seeds, noise.NOISE, (4096,)).double()
    b = noise.randn(seeds, noise.OFFSET, (4096,)).double()
    for x, y in ((a[:, :-1], a[:, 1:]), (a[:-1], a[1:]), (a, b)):
        assert abs(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]) < 0.01
    u = noise.rand(seeds, noise.TIMESTEP, (4096,)).flatten()
    assert u.min() > 0 and u.max() <= 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert (counts - len(u) / 16).abs().max() < 5 * (len(u) / 16) ** 0.5


def test_timesteps_cover_the_schedule_uniformly():
    seeds = torch.arange(20_000, dtype=torch.int64)
    t = noise.timesteps(seeds, 0, 1000)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts - 2000).abs().max() < 5 * 2000**0.5
    # the whole range draws the bits it always drew, so earlier runs resume unchanged
    u = noise.rand(seeds, noise.TIMESTEP, (1,))[:, 0]
    assert torch.equal(t, ((1.0 - u) * 1000).long().clamp(max=999))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
@pytest.mark.parametrize("low, high", [(0, 1000), (200, 800), (900, 1000), (500, 501)])
def test_every_drawn_timestep_lies_in_the_range(sampling, low, high):
    t = noise.timesteps(torch.arange(20_000, dtype=torch.int64), low, high, sampling, 0.0, 2.0)
    assert t.min() >= low and t.max() <= high - 1
    # a sample's timestep is its own: the same in any batch (any batch size, any process)
    some = torch.tensor([7, 19_999, 3], dtype=torch.int64)
    assert torch.equal(noise.timesteps(some, low, high, sampling, 0.0, 2.0), t[some])
    if sampling == "uniform":  # both ends are reached
        assert t.min() == low and t.max() == high - 1


def test_logit_normal_timesteps_follow_their_distribution():
    """Kolmogorov-Smirnov at every timestep: P(t <= k) = Phi((logit(x) - mean) / std) with
    x = (k + 1 - low) / (high - low). 50,000 fixed seeds; the bound 1.95 / sqrt(n) is the 0.1%
    critical value, so a correct sampler passes it (and does, deterministically)."""
    n, low, high, mean, std = 50_000, 100, 900, 0.5, 1.5
    t = noise.timesteps(torch.arange(n, dtype=torch.int64), low, high, "logit_normal", mean, std)
    k = torch.arange(low, high - 1, dtype=torch.float64)
    x = (k + 1 - low) / (high - low)
    expected = 0.5 * (1 + torch.erf((torch.logit(x) - mean) / (std * 2**0.5)))
    empirical = (t[None, :] <= k[:, None]).double().mean(dim=1)
    assert (empirical - expected).abs().max() < 1.95 / n**0.5
    # and not merely uniform: the middle is favoured
    assert (empirical - (k + 1 - low) / (high - low)).abs().max() > 10 / n**0.5
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        noise.timesteps(t, 0, 1000, "cosmic")
