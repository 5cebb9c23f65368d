"""Our noise schedule and samplers against diffusers' DDPM / Euler / DDIM schedulers."""

import pytest
import torch
from conftest import SDXL_CONFIGS
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from sampling.samplers import SAMPLERS
from sdxl.diffusion import NoiseSchedule
from sdxl.errors import UserError

CONFIG = SDXL_CONFIGS / "scheduler" / "scheduler_config.json"
REFERENCE = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def fake_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on both x and t."""
    return 0.3 * torch.tanh(x) + 0.01 * torch.cos(x * float(t) / 100.0)


def reference_sample(
    name: str, noise: torch.Tensor, steps: int, generator=None, **config
) -> torch.Tensor:
    """The diffusers pipeline's loop: init-noise scaling, scale_model_input, step."""
    sched = REFERENCE[name].from_pretrained(CONFIG.parent, **config)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = fake_eps(sched.scale_model_input(x, t), t)
        kwargs = {"generator": generator} if name == "ddpm" else {}
        x = sched.step(eps, t, x, **kwargs).prev_sample
    return x


def test_schedule_constants_match_ddpm():
    ours = NoiseSchedule.from_config(CONFIG)
    ref = DDPMScheduler.from_pretrained(CONFIG.parent)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.alphas_cumprod[999].item() == pytest.approx(0.0046601, rel=1e-4)
    t = torch.tensor([0, 250, 500, 999])
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    snr = ours.snr(t)
    assert snr[0].item() == pytest.approx(1175.4, rel=1e-3) and snr[3].item() == pytest.approx(
        0.00468, rel=1e-2
    )


@pytest.mark.parametrize("steps", [20, 30, 50])
@pytest.mark.parametrize("name", ["euler", "ddim", "ddpm"])
def test_timesteps_and_sigmas_match(name, steps):
    ours = NoiseSchedule.from_config(CONFIG)
    ref = REFERENCE[name].from_pretrained(CONFIG.parent)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps(steps), ref.timesteps.long())
    if name == "euler":
        assert torch.equal(ours.sigmas(steps), ref.sigmas)
    if steps == 30:
        assert ours.timesteps(30)[:3].tolist() == [958, 925, 892]
        assert ours.timesteps(30)[-2:].tolist() == [34, 1]


@pytest.mark.parametrize("name", ["euler", "ddim", "ddpm"])
def test_sampler_matches_reference_loop(name):
    schedule = NoiseSchedule.from_config(CONFIG)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = SAMPLERS[name](fake_eps, noise, schedule, 10, torch.Generator().manual_seed(1))
    ref = reference_sample(name, noise, 10, torch.Generator().manual_seed(1))
    # Issue bar: <= 1e-6 relative for identical model outputs.
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-6, err


@pytest.mark.parametrize("name", ["euler", "ddim", "ddpm"])
def test_samplers_keep_no_state(name):
    schedule = NoiseSchedule.from_config(CONFIG)
    noise = torch.randn(1, 4, 8, 8)
    runs = [
        SAMPLERS[name](fake_eps, noise, schedule, 5, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    other_steps = SAMPLERS[name](fake_eps, noise, schedule, 7, torch.Generator().manual_seed(3))
    assert not torch.equal(runs[0], other_steps)


def test_per_sample_generators_make_noise_batch_independent():
    schedule = NoiseSchedule.from_config(CONFIG)
    noise = torch.randn(3, 4, 8, 8)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = SAMPLERS["ddpm"](fake_eps, noise, schedule, 5, gens)
    alone = SAMPLERS["ddpm"](fake_eps, noise[2:], schedule, 5, [torch.Generator().manual_seed(12)])
    assert torch.equal(batch[2:], alone)


def test_unsupported_schedule_rejected():
    with pytest.raises(UserError, match="timestep_spacing"):
        NoiseSchedule.from_config({"timestep_spacing": "linspace"})
    with pytest.raises(UserError, match="steps must be"):
        NoiseSchedule.scaled_linear().timesteps(0)


# -- v-prediction, zero terminal SNR, trailing spacing ------------------------------------------

VPRED = {
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def test_zero_terminal_snr_schedule_matches_diffusers():
    ours = NoiseSchedule.from_config(CONFIG, prediction_type="v_prediction", zero_terminal_snr=True)
    ref = DDPMScheduler.from_pretrained(CONFIG.parent, **VPRED)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.alphas_cumprod[-1] == 0 and ours.snr(torch.tensor([999])).item() == 0
    assert ours.timestep_spacing == "trailing" and ours.timesteps(30)[:2].tolist() == [999, 966]
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.target(x0, noise, t), ref.get_velocity(x0, noise, t))
    # A v-prediction model config is read as such; trailing spacing comes with it.
    assert (
        NoiseSchedule.from_config({"prediction_type": "v_prediction"}).timestep_spacing
        == "trailing"
    )


@pytest.mark.parametrize("name", ["euler", "ddim", "ddpm"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_prediction_samplers_match_reference(name, zero_snr):
    config = {**VPRED, "rescale_betas_zero_snr": zero_snr}
    schedule = NoiseSchedule.from_config(CONFIG, "v_prediction", zero_snr)
    ref_sched = REFERENCE[name].from_pretrained(CONFIG.parent, **config)
    for steps in (20, 30):
        ref_sched.set_timesteps(steps)
        assert torch.equal(schedule.timesteps(steps), ref_sched.timesteps.long())
        if name == "euler":
            assert torch.equal(schedule.sigmas(steps), ref_sched.sigmas)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = SAMPLERS[name](fake_eps, noise, schedule, 10, torch.Generator().manual_seed(1))
    ref = reference_sample(name, noise, 10, torch.Generator().manual_seed(1), **config)
    assert torch.isfinite(ours).all()
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-6, err  # the same bar as the epsilon samplers
