"""Our UNet against diffusers' UNet2DConditionModel: parity, keys, checkpointing, loading, configs."""

import gc
import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet_config
from safetensors.torch import save_file

from bench.unet_step import MALLINFO2, malloc_in_use
from sdxl.errors import UserError
from sdxl.unet import GroupNormSiLU, LeanConv2d, UNet2DConditionModel, load_unet
from sdxl.weights import WeightsError

# The numerical tests run on the CPU everywhere, and on the GPU too where one is present (CI has
# none; a lent GPU machine runs `pytest tests/test_unet.py -k cuda`).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    # cuDNN would otherwise run fp32 convolutions in TF32 (10-bit mantissa) and pick different
    # algorithms for forward and backward on the two sides: the fp32 bars below assume fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param


def _pair(
    seed: int = 0, device: str = "cpu"
) -> tuple[UNet2DConditionModel, diffusers.UNet2DConditionModel]:
    """Our UNet and diffusers' with identical random (non-zero, non-default) weights."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**tiny_unet_config())
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ours = UNet2DConditionModel.from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(device), ref.to(device)


def _inputs(batch: int = 2, h: int = 12, w: int = 20, seed: int = 1, device: str = "cpu") -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g).to(device)
    t = torch.tensor([17, 803][:batch], device=device)
    ctx = torch.randn(batch, 7, 32, generator=g).to(device)
    time_ids = torch.tensor([[512.0, 384, 0, 12, 1024, 768], [100, 200, 3, 4, 512, 512]][:batch])
    text_embeds = torch.randn(batch, 32, generator=g)
    cond = {"text_embeds": text_embeds.to(device), "time_ids": time_ids.to(device)}
    return x, t, ctx, cond


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_fp32_parity_nonsquare_per_sample_timesteps(device):
    ours, ref = _pair(device=device)
    x, t, ctx, cond = _inputs(device=device)
    with torch.no_grad():
        a = ours(x, t, ctx, cond)
        b = ref(x, t, ctx, added_cond_kwargs=cond).sample
    assert a.shape == (2, 4, 12, 20)
    # Issue bar: 1e-5 relative. Measured: 0.0 (the same ops in the same order), so we hold 1e-6.
    assert _rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("timestep", [5, 5.0, torch.tensor(999)])
def test_scalar_timesteps_and_odd_latent_size(timestep):
    ours, ref = _pair()
    x, _, ctx, cond = _inputs(h=11, w=13)
    with torch.no_grad():
        a = ours(x, timestep, ctx, cond)
        b = ref(x, timestep, ctx, added_cond_kwargs=cond).sample
    assert a.shape == (2, 4, 11, 13)
    assert _rel_err(a, b) <= 1e-6


def test_bf16_parity(device):
    ours, ref = _pair(device=device)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x, t, ctx, cond = _inputs(device=device)
    x, ctx = x.bfloat16(), ctx.bfloat16()
    cond = {k: v.bfloat16() for k, v in cond.items()}
    with torch.no_grad():
        a = ours(x, t, ctx, cond)
        b = ref(x, t, ctx, added_cond_kwargs=cond).sample
    # Same bf16 kernels in the same order: measured 0.0; bf16 has 8 bits of mantissa, so 1e-2
    # relative is the stated bar.
    assert _rel_err(a, b) <= 1e-2


def test_full_size_keys_shapes_and_count_on_meta(sdxl_unet_config):
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(sdxl_unet_config)
        ref = diffusers.UNet2DConditionModel.from_config(sdxl_unet_config)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(ours_sd) == len(ref_sd) == 1680
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684


@pytest.mark.parametrize("interval", [1, 2, 4])
def test_gradient_checkpointing_same_output_and_gradients(interval):
    """Checkpointing every unit, or every 2nd or 4th (--gradient_checkpointing_interval), gives
    the plain output and gradients in fp32."""
    ours, _ = _pair()
    x, t, ctx, cond = _inputs()

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        ours.zero_grad()
        out = ours(x, t, ctx, cond)
        (out**2).mean().backward()
        return out.detach(), [p.grad.clone() for p in ours.parameters()]

    plain_out, plain_grads = run()
    ours.enable_gradient_checkpointing(interval)
    units = list(ours.checkpoint_units())
    checkpointed = ["forward" in m.__dict__ for m in units]
    assert len(units) > 4 and checkpointed == [i % interval == 0 for i in range(len(units))]
    ckpt_out, ckpt_grads = run()
    ours.disable_gradient_checkpointing()
    assert all("forward" not in m.__dict__ for m in units)
    assert torch.equal(plain_out, ckpt_out)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # checkpointing leaves the state dict untouched
    assert list(ours.state_dict()) == list(_pair()[0].state_dict())


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_memory_format_is_kept_through_the_unet(memory_format):
    """The scripts run the UNet in channels_last (NCHW bf16 convolutions are slow on the CPU): every
    convolution and GroupNorm must then see channels_last input, with no silent switch back to NCHW
    (and an NCHW UNet must stay NCHW). The output equals the NCHW result."""
    ours, _ = _pair()
    x, t, ctx, cond = _inputs()
    with torch.no_grad():
        expected = ours(x, t, ctx, cond)
    ours.to(memory_format=memory_format)
    layouts: list[tuple[str, bool]] = []
    for name, module in ours.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.GroupNorm)):
            module.register_forward_pre_hook(
                lambda m, args, name=name: layouts.append(
                    (name, args[0].is_contiguous(memory_format=memory_format))
                )
            )
    with torch.no_grad():
        out = ours(x.contiguous(memory_format=memory_format), t, ctx, cond)
    assert len(layouts) > 50
    assert [name for name, kept in layouts if not kept] == []
    # Different layouts pick different convolution kernels: equal up to fp32 rounding.
    assert _rel_err(out, expected) <= 1e-5


def test_checkpointing_stores_no_concatenated_skips():
    """The up path's ResNets concatenate their skip inside the checkpointed unit, so backward keeps
    `x` and `skip` (which exist anyway) and never a concatenated copy of them."""
    ours, _ = _pair()
    ours.requires_grad_(False)  # frozen base, as under LoRA: only the input needs a gradient
    ours.enable_gradient_checkpointing()
    x, t, ctx, cond = _inputs()
    x.requires_grad_(True)

    concatenated: list[torch.Tensor] = []  # held, so no other tensor can reuse their memory

    class RecordCat(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.cat and out.dim() == 4:
                concatenated.append(out)
            return out

    saved: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with RecordCat(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = ours(x, t, ctx, cond)
    n_up_resnets = sum(len(block.resnets) for block in ours.up_blocks)
    assert len(concatenated) == n_up_resnets  # one (B, C + C_skip, H, W) per up-path ResNet
    assert not saved & {c.untyped_storage().data_ptr() for c in concatenated}
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen base", "all trainable"])
def test_gradients_match_diffusers(frozen, device):
    """Backward through our layers (frozen convolutions that keep no input, GroupNorm+SiLU that
    recomputes its map, checkpointed ResNets and transformer blocks) against diffusers' plain
    backward: the gradients of the input and context, and of every trainable parameter."""
    ours, ref = _pair(device=device)
    ours.enable_gradient_checkpointing()
    if frozen:  # as under LoRA: the base gets no gradient, the input gradient still flows
        ours.requires_grad_(False)
        ref.requires_grad_(False)
    x, t, ctx, cond = _inputs(device=device)

    def gradients(model: torch.nn.Module, call) -> tuple[torch.Tensor, ...]:
        inputs = [x.clone().requires_grad_(), ctx.clone().requires_grad_()]
        weights = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        return torch.autograd.grad((call(*inputs) ** 2).mean(), [*inputs, *weights])

    a = gradients(ours, lambda x, ctx: ours(x, t, ctx, cond))
    b = gradients(ref, lambda x, ctx: ref(x, t, ctx, added_cond_kwargs=cond).sample)
    assert len(a) == len(b) == 2 + (0 if frozen else len(ours.state_dict()))
    # fp32: stated bar 1e-5 relative to each gradient's largest entry. Measured: 0.0 with the
    # frozen base, 2e-7 with every weight trainable.
    assert max(_rel_err(ga, gb) for ga, gb in zip(a, b)) <= 1e-5


def _bytes_kept(make_output) -> int:
    """Heap bytes that make_output() leaves allocated beyond its output: what its graph keeps."""
    make_output()  # a first call may allocate kernel workspaces once, for the process
    gc.collect()
    before = malloc_in_use()
    out = make_output()
    return malloc_in_use() - before - out.numel() * out.element_size()


needs_glibc = pytest.mark.skipif(MALLINFO2 is None, reason="counts bytes with glibc's mallinfo2")


@needs_glibc
def test_frozen_convolution_and_groupnorm_silu_keep_less_for_backward():
    """What the autograd graph of GroupNorm -> SiLU -> frozen conv keeps: diffusers' layers keep
    the normalised map (for SiLU) and SiLU's output (for the conv), two maps as large as the input;
    ours keep only the input, which exists anyway."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 64, 64, requires_grad=True)
    map_bytes = x.numel() * x.element_size()  # 1 MiB
    norm, conv = GroupNormSiLU(32, 64), LeanConv2d(64, 64, 3, padding=1)
    ref_norm, ref_conv = torch.nn.GroupNorm(32, 64), torch.nn.Conv2d(64, 64, 3, padding=1)
    ref_norm.load_state_dict(norm.state_dict())
    ref_conv.load_state_dict(conv.state_dict())
    conv.requires_grad_(False)
    ref_conv.requires_grad_(False)

    ours_kept = _bytes_kept(lambda: conv(norm(x)))
    ref_kept = _bytes_kept(lambda: ref_conv(F.silu(ref_norm(x))))
    assert ref_kept >= 1.9 * map_bytes
    assert ours_kept <= 0.1 * map_bytes
    # ...and the same gradients, exactly: the same kernels compute them.
    g = torch.randn(1, 64, 64, 64)
    ours_grads = torch.autograd.grad(conv(norm(x)), [x, norm.weight, norm.bias], g)
    ref_grads = torch.autograd.grad(
        ref_conv(F.silu(ref_norm(x))), [x, ref_norm.weight, ref_norm.bias], g
    )
    for ga, gb in zip(ours_grads, ref_grads):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_frozen_convolution_input_gradient(stride, autocast, device):
    """The frozen path computes only the input gradient, from the weight: equal to nn.Conv2d's,
    in channels_last too and under autocast (where the forward runs in bf16)."""
    torch.manual_seed(0)
    conv = LeanConv2d(8, 16, 3, stride=stride, padding=1, device=device).requires_grad_(False)
    ref = torch.nn.Conv2d(8, 16, 3, stride=stride, padding=1, device=device).requires_grad_(False)
    ref.load_state_dict(conv.state_dict())
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 9, 10, device=device).contiguous(memory_format=memory_format)
        x.requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out, ref_out = conv(x), ref(x)
        g = torch.randn_like(ref_out)
        (grad,) = torch.autograd.grad(out, x, g)
        (ref_grad,) = torch.autograd.grad(ref_out, x, g)
        assert out.dtype == ref_out.dtype and grad.dtype == x.dtype
        assert grad.stride() == ref_grad.stride()
        assert torch.equal(out, ref_out)
        # Exact when x and the weight share a layout; otherwise the kernel works in the weight's
        # layout and rounds differently: measured 6e-7 relative (5e-3 in bf16); stated bars 1e-6
        # and 1e-2.
        assert _rel_err(grad, ref_grad) <= (1e-2 if autocast else 1e-6)


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "down_block_types",
            ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            "down_block_types",
        ),
        ("addition_embed_type", "text", "addition_embed_type"),
        ("use_linear_projection", False, "use_linear_projection"),
        ("class_embed_type", "timestep", "class_embed_type"),
        ("block_out_channels", [32, 64], "block_out_channels must be"),
        ("attention_head_dim", [1, 2, 3], "not divisible by 3 heads"),
        ("some_new_option", 1, "unknown key 'some_new_option'"),
    ],
)
def test_bad_configs_are_rejected(key, value, message):
    cfg = dict(tiny_unet_config(), **{key: value})
    with pytest.raises(UserError, match=message):  # printed by the scripts as one line
        UNet2DConditionModel.from_config(cfg)


@pytest.mark.parametrize("variant", ["", ".fp16"])
def test_load_unet_folder(tmp_path, variant):
    ours, ref = _pair()
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    dtype = torch.float16 if variant else torch.float32
    state = {k: v.to(dtype).contiguous() for k, v in ref.state_dict().items()}
    save_file(state, tmp_path / f"diffusion_pytorch_model{variant}.safetensors")
    target = torch.bfloat16 if variant else torch.float32
    loaded = load_unet(tmp_path, dtype=target)
    assert all(p.dtype == target and p.device.type == "cpu" for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k].to(target)), k


def test_load_unet_fails_loudly(tmp_path):
    ours, ref = _pair()
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors"):
        load_unet(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state.pop("conv_in.weight")
    state["conv_out.bias"] = torch.zeros(5)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_unet(tmp_path)
    msg = str(e.value)
    assert "1 missing keys (first: conv_in.weight)" in msg
    assert "1 unexpected keys (first: extra.weight)" in msg
    assert "conv_out.bias (5,) vs expected (4,)" in msg
    truncated = tmp_path / "diffusion_pytorch_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        load_unet(tmp_path)
