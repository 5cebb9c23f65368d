"""Full fine-tuning in little memory (training/fused.py): bf16 weights with stochastic rounding
(--full_bf16) and optimizer steps inside the backward pass (--fused_backward_pass): on a small
network for the exact claims, on the tiny SDXL for the training loop."""

import dataclasses

import pytest
import torch
from conftest import EXAMPLES, tiny_specs, train_argv

import train_sdxl
from sdxl.checkpoint import load_checkpoint, unet_weights
from sdxl.device import Distributed, resolve_precision
from sdxl.errors import UserError
from sdxl.pretrained import load_sdxl
from training.data_loader import SampleRules, TrainingData, collate
from training.fused import PerParameter, stochastic_round
from training.optimizers import OPTIMIZERS
from training.scan import scan
from training.specs import OptimizerSpec, StepSpec
from training.train_loop import build_trainer, train_step

CPU = Distributed(0, 1, torch.device("cpu"))


def test_stochastic_rounding_keeps_small_updates_on_average():
    """50 updates of 1e-4 to weights of 1.0 (bf16's step there is 2^-7, half of it 0.0039):
    rounded to nearest each is lost (5e-3 in all); rounded stochastically their sum is kept on
    average. Each rounding adds variance 2^-14 p (1 - p), p = 1e-4 / 2^-7: over 200,000 weights
    the mean's standard error after 50 updates is 1.4e-5; the bar 1e-4 (7 standard errors)."""
    g = torch.Generator().manual_seed(0)
    w = torch.ones(200_000, dtype=torch.bfloat16)
    nearest, stochastic = w.clone(), w.clone()
    for _ in range(50):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
        stochastic = stochastic_round(stochastic.float() + 1e-4, g)
    assert torch.equal(nearest, w)  # 50 updates, all lost
    assert abs(stochastic.float().mean().item() - (1 + 50e-4)) < 1e-4
    # values bf16 holds come through unchanged, of either sign
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e-3]).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact, g).float(), exact)
    below = stochastic_round(torch.full((100_000,), -1 - 2**-9), g).float()
    assert set(below.unique().tolist()) == {-1.0, -1.0078125}
    assert abs(below.mean().item() - (-1 - 2**-9)) < 1e-4


# -- the optimizer, on a small network ------------------------------------------------------------


def network(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).to(dtype)  # fmt: skip


def loss_of(net: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=g).to(next(net.parameters()).dtype)
    return (net(x).float() - x.float()).square().mean()


def optimizer_of(net, name, per_parameter, fused=False, seed=0):
    spec = OptimizerSpec(name=name, learning_rate=1e-2,
                         extra={"relative_step": False} if name == "adafactor" else {})  # fmt: skip
    groups = [{"params": list(net.parameters()), "lr": 1e-2}]
    if not per_parameter:
        return OPTIMIZERS[name](groups, spec, 10)[0]
    make = lambda one: OPTIMIZERS[name](one, spec, 10)[0]  # noqa: E731
    return PerParameter(groups, make, fused, torch.Generator().manual_seed(seed))


def run(net, optimizer, steps, start=0) -> None:
    for step in range(start, start + steps):
        loss_of(net, step).backward()
        optimizer.step()  # (nothing left to step after fused steps)
        optimizer.zero_grad()


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_steps_give_the_bits_of_unfused_ones(name):
    """fp32: steps inside the backward pass (one optimizer per parameter) give the same bits as
    one optimizer stepping after it, over 4 steps (AdamW, Adafactor)."""
    fused, plain = network(), network()
    run(fused, optimizer_of(fused, name, True, fused=True), 4)
    run(plain, optimizer_of(plain, name, False), 4)
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert a.grad is None and torch.equal(a, b)


def test_bf16_fused_and_unfused_agree_within_the_rounding():
    """bf16 weights, one step from the same weights (the same fp32 updates): fused and unfused
    steps draw their random rounding in another order, so a weight may land on the other of its
    two bf16 neighbours, one bf16 step apart (at most 2^-7 of it), and no further."""
    fused, plain = network(torch.bfloat16), network(torch.bfloat16)
    run(fused, optimizer_of(fused, "adamw", True, fused=True), 1)
    run(plain, optimizer_of(plain, "adamw", True, fused=False, seed=1), 1)
    differ = 0
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert a.dtype == b.dtype == torch.bfloat16
        gap = (a.float() - b.float()).abs()
        assert (gap <= 2**-7 * b.float().abs() + 1e-30).all()
        differ += int((gap > 0).sum())
    assert differ > 0  # (the rounding is random: some do land apart)


def test_a_resumed_optimizer_continues_exactly():
    """bf16, fused: 2 steps, the state saved and loaded into a new optimizer, 2 more, equal 4
    straight (the fp32 optimizer state and the rounding's random state come back)."""
    straight = network(torch.bfloat16)
    run(straight, optimizer_of(straight, "adamw", True, fused=True), 4)
    first = network(torch.bfloat16)
    opt = optimizer_of(first, "adamw", True, fused=True)
    run(first, opt, 2)
    state = opt.state_dict()
    assert all(s["state"][0]["exp_avg"].dtype == torch.float32 for s in state["per_parameter"])
    second = network(torch.bfloat16)
    second.load_state_dict(first.state_dict())
    resumed = optimizer_of(second, "adamw", True, fused=True, seed=99)
    resumed.load_state_dict(state)
    run(second, resumed, 2, start=2)
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)


# -- the training loop, on the tiny SDXL ----------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, fused, full_bf16", [("adamw", True, False), ("adafactor", True, True)]
)
def test_overfitting_one_batch_lowers_the_loss(tiny_model, optimizer, fused, full_bf16):
    """The whole tiny UNet trained on one batch (the same noise and timesteps each step)."""
    torch.manual_seed(0)
    precision = resolve_precision("bf16" if full_bf16 else "fp32", CPU.device, True, full_bf16)
    parts = load_sdxl(tiny_model, precision.unet_dtype)
    extra = {"relative_step": False} if optimizer == "adafactor" else {}
    specs = tiny_specs(
        None,
        OptimizerSpec(name=optimizer, learning_rate=1e-3, max_grad_norm=0.0, extra=extra,
                      fused_backward_pass=fused),
        StepSpec(precision=precision.name, full_bf16=full_bf16),
    )  # fmt: skip
    specs = dataclasses.replace(specs, adapter=None)
    encoders = (parts.vae.moments, parts.text_encoder.encode)
    tr = build_trainer(specs, parts, *encoders, precision, CPU, max_steps=6)
    assert isinstance(tr.optimizer, PerParameter)
    assert all(p.dtype == (torch.bfloat16 if full_bf16 else torch.float32) for p in tr.unet.parameters())  # fmt: skip
    data = TrainingData(scan(EXAMPLES)[:2], 32, rules=SampleRules(center_crop=True))
    batch = collate([data[(0, 0)], data[(1, 1)]])
    losses = [train_step(tr, [batch], [])[0].item() for _ in range(6)]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    assert all(p.grad is None for p in tr.unet.parameters())  # freed in the backward pass


def test_the_command_line_trains_bf16_weights_and_resumes(tiny_model, tmp_path):
    """train_sdxl.py --full_bf16 --fused_backward_pass: the checkpoint's UNet is bf16 (in the SGM
    file beside it), and a resumed run's next step equals the straight run's."""

    flags = ["--full_bf16", "--fused_backward_pass", "--learning_rate", "1e-3", "--seed", "3",
             "--precision", "bf16"]  # fmt: skip
    def args(out, *more):
        return train_sdxl.parse_args(train_argv(tiny_model, out, *flags, *more))

    straight = train_sdxl.main(args(tmp_path / "a", "--max_train_steps", "2"))
    first = train_sdxl.main(args(tmp_path / "b", "--max_train_steps", "1"))
    resumed = train_sdxl.main(
        args(tmp_path / "b", "--max_train_steps", "2", "--resume", str(first))
    )
    a = unet_weights(load_checkpoint(straight), straight)
    b = unet_weights(load_checkpoint(resumed), resumed)
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--full_bf16", "--use_lora"], "--full_bf16 is for full fine-tuning"),
        (["--fused_backward_pass", "--use_lora"], "--fused_backward_pass is for full fine-tuning"),
        (["--full_bf16", "--precision", "fp32"], "cannot go with --precision fp32"),
        (["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "gradients cannot accumulate"),
        (["--fused_backward_pass", "--max_grad_norm", "1"], "the global norm clipping needs"),
        (["--fused_backward_pass", "--optimizer", "prodigy"], "keeps state across parameters"),
        (["--save_model_as", "sgm", "--use_lora"], "--save_model_as is for full fine-tuning"),
    ],
)  # fmt: skip
def test_what_the_new_modes_cannot_do_is_one_line(tiny_model, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, tmp_path, *flags)))


def test_the_preflight_traces_the_new_modes_and_models_other_optimizers(tiny_model):
    """The preflight runs --full_bf16 and --fused_backward_pass themselves on the meta device:
    bf16 weights predict less than fp32 ones, and freeing each gradient in the backward pass less
    again. An optimizer that reads values back (Adafactor) cannot step there: AdamW is traced in
    its place, the note (which the report prints) says so, and the difference of their states is
    modelled from the step on (it used to stop with a traceback)."""
    from training.preflight import estimate_training, stand_in, state_bytes

    def specs_of(name="adamw", fused=False, full_bf16=False):
        optimizer = OptimizerSpec(name=name, fused_backward_pass=fused, max_grad_norm=0.0)
        step = StepSpec(precision="bf16", full_bf16=full_bf16)
        data = dataclasses.replace(
            tiny_specs().data, cache_latents=True, cache_text_embeddings=True
        )
        return dataclasses.replace(
            tiny_specs(), adapter=None, optimizer=optimizer, step=step, data=data
        )

    plain = estimate_training(specs_of(), tiny_model).peak
    bf16 = estimate_training(specs_of(full_bf16=True), tiny_model).peak
    fused = estimate_training(specs_of(fused=True, full_bf16=True), tiny_model)
    assert fused.peak < bf16 < plain, (fused.peak, bf16, plain)
    assert stand_in(specs_of(fused=True, full_bf16=True))[1] is None
    specs = specs_of("adafactor", fused=True, full_bf16=True)
    traced, note = stand_in(specs)
    assert traced.optimizer.name == "adamw" and traced.step.full_bf16
    assert note is not None and "--optimizer adafactor" in note and "modelled" in note
    adafactor = estimate_training(specs, tiny_model)
    params = list(load_sdxl(tiny_model, torch.float32).unet.parameters())
    delta = state_bytes(specs.optimizer, params) - state_bytes(OptimizerSpec(), params)
    steps = [(a, b) for a, b in zip(adafactor.phases, fused.phases) if a.name.startswith("step")]
    assert delta < 0 and len(steps) == 2 and adafactor.peak < fused.peak
    assert all(a.peak_in_phase == b.peak_in_phase + delta for a, b in steps)
    assert "adafactor's state in place of AdamW's" in adafactor.report()


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy"])
def test_the_modelled_optimizer_state_is_the_real_ones(name):
    """The preflight's bytes of each optimizer's state equal what the optimizer keeps after a step
    (on tensors of every rank a UNet has: conv, linear, bias)."""
    from training.optimizers import build_optimizer
    from training.preflight import state_bytes

    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (16, 12), (16,), (5000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    spec = OptimizerSpec(name=name, learning_rate=1.0 if name == "prodigy" else 1e-3)
    optimizer, _ = build_optimizer([(f"unet.p{i}", p) for i, p in enumerate(params)], ["unet"],
                                   spec, 10)  # fmt: skip
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    kept = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    assert state_bytes(spec, params) == kept
