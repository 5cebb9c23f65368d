"""The training step's per-sample random numbers (training/noise.py)."""

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
    t = noise.uniform_timesteps(torch.arange(20_000, dtype=torch.int64), 1000)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts - 2000).abs().max() < 5 * 2000**0.5
