"""LoRA invariants, full-size parameter counts, and files that diffusers / kohya tools load."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, unet_inputs
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from sdxl.lora import (
    AdaptedLayer,
    Adapter,
    LoRA,
    apply_lora_to_unet,
    export_adapters,
    get_lora_state_dict,
    load_lora_state_dict,
    merge_lora,
)
from sdxl.lora_formats import attach_lora, read_lora_file, save_lora_file
from sdxl.unet import UNet2DConditionModel, load_unet


def adapter_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if ".lora." in n]


@pytest.fixture
def unet(tiny_model):
    return load_unet(tiny_model / "unet")


def test_fresh_adapter_is_a_noop(unet):
    x, t, ctx, cond = unet_inputs()
    # Frozen first, as apply_lora_to_unet leaves it: matmul picks its kernel for a strided input
    # (proj_in's token map) by whether the weight is trained, and the two sides must make the same
    # calls for a bitwise comparison to hold on every CPU (mm and bmm round differently on some).
    unet.requires_grad_(False)
    with torch.no_grad():
        before = unet(x, t, ctx, cond)
        wrapped = apply_lora_to_unet(unet, rank=4, alpha=8, target_mode="attention")
        after = unet(x, t, ctx, cond)
    assert wrapped and all(name.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for name in wrapped)
    assert torch.equal(before, after)


def test_only_adapters_train_and_base_is_untouched(unet):
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    apply_lora_to_unet(unet, rank=4, alpha=4, target_mode="all")
    lora_before = {k: v.clone() for k, v in get_lora_state_dict(unet).items()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    # The state dict has the adapters' weights, and their alphas (buffers).
    assert trainable == {n for n in get_lora_state_dict(unet) if not n.endswith(".alpha")}
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    x, t, ctx, cond = unet_inputs()
    unet(x, t, ctx, cond).square().mean().backward()
    grads = {n: p.grad for n, p in unet.named_parameters()}
    assert all(grads[n] is not None for n in trainable)
    assert all(g is None for n, g in grads.items() if n not in trainable)
    assert any(grads[n].abs().sum() > 0 for n in trainable if ".up." in n)
    opt.step()
    after = unet.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), k  # base weights bit-identical after the step
    assert any(not torch.equal(after[k], v) for k, v in lora_before.items())


def test_adapters_fp32_on_bf16_base_and_on_the_base_device(unet):
    unet = unet.to(torch.bfloat16)
    apply_lora_to_unet(unet, rank=4, alpha=4)
    for _, wrapper in unet.named_modules():
        if isinstance(wrapper, AdaptedLayer):
            assert wrapper.weight.dtype == torch.bfloat16
            assert wrapper.lora.down.weight.dtype == torch.float32
            assert wrapper.lora.down.weight.device == wrapper.weight.device


def test_adapters_keep_one_bf16_input_not_fp32_copies():
    """to_q, to_k and to_v adapters (fp32) on one bf16 input: backward keeps that input once, in
    bf16, instead of an fp32 copy per adapter (2 bytes per element against 12); the outputs and
    gradients equal plain autograd on the cast input."""
    torch.manual_seed(0)
    bases = [torch.nn.Linear(64, 48).to(torch.bfloat16) for _ in "qkv"]
    wrappers = [AdaptedLayer(base, LoRA(base, 4, 8)) for base in bases]
    for w in wrappers:
        w.requires_grad_(False)
        w.lora.requires_grad_(True)
        torch.nn.init.normal_(w.lora.up.weight)  # non-zero, so down gets a gradient too
    x = torch.randn(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
    weights = [p for w in wrappers for p in (w.lora.down.weight, w.lora.up.weight)]
    parameters = {p.data_ptr() for w in wrappers for p in w.parameters()}

    def plain(w: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:  # autograd does the casts
        lora = w.lora
        scale = lora.alpha / lora.rank
        return F.linear(x, w.weight, w.bias) + (lora.up(lora.down(x.float())) * scale).to(x.dtype)

    def run(layer) -> tuple[list[torch.Tensor], int]:
        saved: dict[int, int] = {}  # storage -> bytes, parameters left out

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in parameters:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [layer(w, x) for w in wrappers]
        loss = sum((o.float() ** 2).sum() for o in outs)
        return [*outs, *torch.autograd.grad(loss, [x, *weights])], sum(saved.values())

    ours, ours_bytes = run(lambda w, x: w(x))
    ref, ref_bytes = run(plain)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    # Beyond x itself, each side keeps only the rank-4 hidden states (3 x 4 x 128 x 4 fp32) and
    # the scales alpha / rank (3 fp32 scalars).
    small = 3 * 4 * 128 * 4 * 4 + 3 * 4
    assert ours_bytes <= x.numel() * 2 + small
    assert ref_bytes >= x.numel() * 12


def test_save_load_round_trip_exact(tiny_model, unet):
    apply_lora_to_unet(unet, rank=4, alpha=8)
    randomize_adapters(unet)
    state = {k: v.clone() for k, v in get_lora_state_dict(unet).items()}
    other = load_unet(tiny_model / "unet")
    apply_lora_to_unet(other, rank=4, alpha=8)
    load_lora_state_dict(other, state)
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, cond), other(x, t, ctx, cond))


def test_load_rejects_other_rank_and_targets(tiny_model, unet):
    apply_lora_to_unet(unet, rank=4, alpha=4)
    state = get_lora_state_dict(unet)
    other = load_unet(tiny_model / "unet")
    apply_lora_to_unet(other, rank=8, alpha=4)
    key = next(k for k in get_lora_state_dict(other) if k.endswith("down.weight"))
    with pytest.raises(
        ValueError, match=rf"{key}: file has \(4, 64\), this model expects \(8, 64\)"
    ):
        load_lora_state_dict(other, state)
    narrow = load_unet(tiny_model / "unet")
    apply_lora_to_unet(narrow, rank=4, alpha=4, target_mode="attention_out")
    with pytest.raises(ValueError, match="another target mode"):
        load_lora_state_dict(narrow, state)


def test_merge_equals_unmerged_and_merges_once(unet):
    apply_lora_to_unet(unet, rank=4, alpha=16, target_mode="all")
    randomize_adapters(unet)
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        unmerged = unet(x, t, ctx, cond)
        merge_lora(unet)
        merged = unet(x, t, ctx, cond)
        merge_lora(unet)  # a second merge is a no-op
        again = unet(x, t, ctx, cond)
    # fp32: merging reorders sums, so equal to ~1e-5 relative (stated bar).
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    assert torch.equal(again, merged)


@pytest.mark.parametrize(
    "mode,rank,expected",
    [
        ("attention", 4, 5_806_080),
        ("attention", 8, 11_612_160),
        ("attention_out", 4, 1_331_200),
        ("all", 16, 42_557_440),
    ],
)
def test_full_size_counts_on_meta(sdxl_unet_config, mode, rank, expected):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_unet_config)
    wrapped = apply_lora_to_unet(unet, rank=rank, alpha=rank, target_mode=mode)
    assert len(wrapped) == {"attention": 560, "attention_out": 140, "all": 722}[mode]
    assert sum(p.numel() for p in adapter_parameters(unet)) == expected
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected


# -- interop --------------------------------------------------------------------------------------


def diffusers_unet_output(pipe, x, t, ctx, cond):
    with torch.no_grad():
        return pipe.unet(x, t, ctx, added_cond_kwargs=cond).sample


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("mode", ["attention", "all"])
def test_exported_file_loads_in_diffusers(tmp_path, tiny_model, unet, fmt, mode):
    apply_lora_to_unet(unet, rank=4, alpha=12, target_mode=mode)  # alpha != rank: scale 3
    randomize_adapters(unet)
    path = tmp_path / f"lora_{fmt}.safetensors"
    modules = export_adapters({"unet": unet})
    save_lora_file(path, modules, fmt, {"rank": 4, "alpha": 12, "target_mode": mode})
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.load_lora_weights(path)
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        ours = unet(x, t, ctx, cond)
    ref = diffusers_unet_output(pipe, x, t, ctx, cond)
    plain = load_unet(tiny_model / "unet")
    with torch.no_grad():
        # the LoRA does something
        assert not torch.allclose(plain(x, t, ctx, cond), ours, atol=1e-3)
    # fp32, LoRA computed in the same order by peft: stated bar 1e-5 relative.
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya"])
def test_own_files_load_back(tmp_path, tiny_model, unet, fmt):
    apply_lora_to_unet(unet, rank=4, alpha=2, target_mode="all")
    randomize_adapters(unet)
    path = tmp_path / "lora.safetensors"
    modules = export_adapters({"unet": unet})
    save_lora_file(path, modules, fmt, {"rank": 4, "alpha": 2, "target_mode": "all"})
    other = load_unet(tiny_model / "unet")
    attach_lora({"unet": other}, read_lora_file(path, other))
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, cond), other(x, t, ctx, cond))


def peft_lora_pipeline(tiny_model, rank=4, alpha=8):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    pipe.unet.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe, config


def test_diffusers_written_file_loads_into_ours(tmp_path, tiny_model, unet):
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe, config = peft_lora_pipeline(tiny_model)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    attach_lora({"unet": unet}, read_lora_file(tmp_path / "pytorch_lora_weights.safetensors", unet))
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        ours = unet(x, t, ctx, cond)
    ref = diffusers_unet_output(pipe, x, t, ctx, cond)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_kohya_file_from_diffusers_converter_loads_into_ours(tmp_path, tiny_model, unet):
    from diffusers.utils import convert_state_dict_to_kohya

    pipe, _ = peft_lora_pipeline(tiny_model, rank=4, alpha=4)  # the converter writes alpha = rank
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp_path / "kohya.safetensors")
    attach_lora({"unet": unet}, read_lora_file(tmp_path / "kohya.safetensors", unet))
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        ours = unet(x, t, ctx, cond)
    ref = diffusers_unet_output(pipe, x, t, ctx, cond)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_file_for_another_architecture_fails(tmp_path, tiny_model, unet):
    bad = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": Adapter(
            torch.zeros(4, 40), torch.zeros(64, 4), 4.0
        )
    }
    save_lora_file(tmp_path / "bad.safetensors", bad, "kohya", {"rank": 4})
    with pytest.raises(
        ValueError,
        match="shape mismatch at down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ):
        attach_lora({"unet": unet}, read_lora_file(tmp_path / "bad.safetensors", unet))
