"""Conv LoRA (LoCon), DoRA, text-encoder LoRA and per-block ranks: parity with peft, files diffusers
loads, key coverage on the full-size SDXL, the invariants of each kind, training and resuming."""

import json
import re

import pytest
import torch
from conftest import ROOT, SDXL_CONFIGS, close, randomize_adapters, train_argv, unet_inputs
from diffusers import StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import generate_images
import train_sdxl
from sdxl.checkpoint import load_checkpoint
from sdxl.lora import (
    DoRA,
    LoRAError,
    apply_lora_to_text_encoders,
    apply_lora_to_unet,
    components,
    count_parameters,
    export_adapters,
    get_lora_state_dict,
    lora_modules,
    merge_lora,
)
from sdxl.lora_formats import attach_lora, kohya_name, read_lora_file, save_lora_file
from sdxl.names import block_index, canonical, sgm_path
from sdxl.pretrained import load_sdxl
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.unet import UNet2DConditionModel, load_unet

PROMPTS = ["a red circle on a white background", "a blue square"]


def assert_like_pipeline(parts, pipe) -> None:
    """Our UNet and text encoders give the diffusers pipeline's outputs (`close`)."""
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        close(parts.unet(x, t, ctx, cond), pipe.unet(x, t, ctx, added_cond_kwargs=cond).sample)
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        ours_context, ours_pooled = parts.text_encoder.encode(PROMPTS)
    close(ours_context, context)
    close(ours_pooled, pooled)


KINDS = {  # name: apply_lora_to_unet keywords
    "conv": {"conv_rank": 4, "conv_alpha": 8},
    "dora": {"kind": "dora"},
    "dora_conv": {"kind": "dora", "conv_rank": 4, "conv_alpha": 8},
}


@pytest.fixture
def unet(tiny_model):
    return load_unet(tiny_model / "unet")


# -- parity with peft -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_outputs_and_gradients_match_peft(tiny_model, unet, kind):
    """The same initial weights in peft (on diffusers' UNet) and in ours: the same outputs and
    gradients, for LoRA on convolutions and DoRA on Linear and Conv2d layers."""
    names = apply_lora_to_unet(unet, 4, 8, "attention", **KINDS[kind])
    randomize_adapters(unet)
    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    ref.add_adapter(
        LoraConfig(
            r=4, lora_alpha=8, target_modules=names, use_dora=KINDS[kind].get("kind") == "dora"
        )
    )
    ref_params = dict(ref.named_parameters())
    peft_name = {"down.weight": "lora_A.default.weight", "up.weight": "lora_B.default.weight"}
    peft_name["magnitude"] = "lora_magnitude_vector.default.weight"
    pairs = []
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora." in name:
                path, _, leaf = name.partition(".lora.")
                theirs = ref_params[f"{path}.{peft_name[leaf]}"]
                theirs.copy_(p.reshape(theirs.shape))
                pairs.append((p, theirs))
    assert any(".resnets." in n for n in names) == ("conv" in kind)
    x, t, ctx, cond = unet_inputs()
    ours = unet(x, t, ctx, cond)
    theirs = ref(x, t, ctx, added_cond_kwargs=cond).sample
    close(ours, theirs)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for p, q in pairs:
        close(p.grad, q.grad.reshape(p.shape))


# -- invariants of each kind ------------------------------------------------------------------------


# ... and LyCORIS's kinds (tests/test_lycoris.py compares them with LyCORIS itself)
EVERY_KIND = KINDS | {
    "loha": {"kind": "loha", "conv_rank": 4, "conv_alpha": 8},
    "lokr": {"kind": "lokr", "conv_rank": 4, "conv_alpha": 8, "lokr_factor": 4},
}


@pytest.mark.parametrize("kind", list(EVERY_KIND))
def test_invariants_of_each_kind(tiny_model, unet, kind, tmp_path):
    """A fresh adapter changes nothing, only adapters get gradients, merged equals unmerged, and
    the round trip through every file format is exact."""
    x, t, ctx, cond = unet_inputs()
    unet.requires_grad_(False)  # as the adapters leave it: the same matmul kernels (test_lora.py)
    with torch.no_grad():
        before = unet(x, t, ctx, cond)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    apply_lora_to_unet(unet, 4, 8, "attention", **EVERY_KIND[kind])
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, cond), before)
    randomize_adapters(unet)
    out = unet(x, t, ctx, cond)
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None) == (".lora." in name), name
        assert (p.grad is not None) == p.requires_grad
    for fmt in ("native", "kohya", "diffusers"):
        path = tmp_path / f"{fmt}.safetensors"
        save_lora_file(path, export_adapters({"unet": unet}), fmt, {})
        other = load_unet(tiny_model / "unet")
        attach_lora({"unet": other}, read_lora_file(path, other))
        theirs, ours = get_lora_state_dict(other), get_lora_state_dict(unet)
        assert theirs.keys() == ours.keys()
        for k, v in ours.items():
            assert torch.equal(theirs[k], v), (fmt, k)
    with torch.no_grad():
        unmerged = unet(x, t, ctx, cond)
        merge_lora(unet)
        merged = unet(x, t, ctx, cond)
    assert unet.state_dict().keys() == base.keys()  # plain layers again
    close(merged, unmerged)  # merging reorders fp32 sums


def test_dora_with_a_magnitude_per_input_channel(tiny_model, unet, tmp_path):
    """OneTrainer's default DoRA (and older LyCORIS): dora_scale of shape (1, in[, 1, 1]), the norm
    taken over each input channel. Our UNet with such a file equals diffusers' UNet whose weights
    are replaced by m * (W + dW) / ||W + dW||, the norm per input channel, as ComfyUI computes it.
    """
    layers = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",  # in != out
        "down_blocks.0.resnets.0.conv1",  # 3x3
        "up_blocks.0.resnets.0.conv_shortcut",  # 1x1
    ]
    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    weights = dict(ref.named_parameters())
    g = torch.Generator().manual_seed(5)
    kohya = {}
    with torch.no_grad():
        for path in layers:
            w = weights[f"{path}.weight"]
            out, in_ = w.shape[:2]
            down = torch.randn(4, in_, *w.shape[2:], generator=g) * 0.1
            up = torch.randn(out, 4, *[1] * (w.dim() - 2), generator=g) * 0.1
            alpha = 2.0
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha / 4
            direction = w + delta
            # (out, in, ...) -> (1, in, 1...): one norm per input channel
            norm = (
                direction.transpose(0, 1)
                .flatten(1)
                .norm(dim=1)
                .reshape(1, in_, *[1] * (w.dim() - 2))
            )
            scale = norm * (1 + 0.2 * torch.rand(norm.shape, generator=g))
            w.copy_(direction * scale / norm)
            name = kohya_name(f"unet.{path}")
            kohya |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            kohya |= {f"{name}.alpha": torch.tensor(alpha), f"{name}.dora_scale": scale}
    save_file(kohya, tmp_path / "onetrainer.safetensors")
    modules = read_lora_file(tmp_path / "onetrainer.safetensors", unet)
    assert all(a.magnitude is not None and a.magnitude.shape[0] == 1 for a in modules.values())
    attach_lora({"unet": unet}, modules)
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        theirs = ref(x, t, ctx, added_cond_kwargs=cond).sample
        close(unet(x, t, ctx, cond), theirs)
    for fmt in ("native", "kohya"):  # the round trip keeps the axis
        save_lora_file(tmp_path / f"{fmt}.safetensors", export_adapters({"unet": unet}), fmt, {})
        again = read_lora_file(tmp_path / f"{fmt}.safetensors", unet)
        assert again.keys() == modules.keys()
        for key, a in again.items():
            assert torch.equal(a.magnitude, modules[key].magnitude), (fmt, key)
    with pytest.raises(LoRAError, match="per input channel, which peft's format cannot hold"):
        save_lora_file(tmp_path / "d.safetensors", export_adapters({"unet": unet}), "diffusers", {})
    with torch.no_grad():
        merge_lora(unet)
        close(unet(x, t, ctx, cond), theirs)


def test_text_encoder_invariants_and_round_trip(tiny_model, tmp_path):
    text = SDXLTextEncoder.from_pretrained(tiny_model)
    before = text.encode(PROMPTS)
    names = apply_lora_to_text_encoders(text, 4, 8, kind="lora")
    last = text.text_encoder.config.num_hidden_layers - 1
    assert not any(f"text_encoder.text_model.encoder.layers.{last}." in n for n in names)
    assert any(f"text_encoder_2.text_model.encoder.layers.{last}." in n for n in names)
    assert all(torch.equal(a, b) for a, b in zip(text.encode(PROMPTS), before))
    models = {"text_encoder": text.text_encoder, "text_encoder_2": text.text_encoder_2}
    randomize_adapters(text)
    context, pooled = text.encode(PROMPTS)
    (context.square().mean() + pooled.square().mean()).backward()
    for model in models.values():
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (".lora." in name), name
    for fmt in ("native", "kohya", "diffusers"):
        path = tmp_path / f"{fmt}.safetensors"
        save_lora_file(path, export_adapters(models), fmt, {})
        fresh = SDXLTextEncoder.from_pretrained(tiny_model)
        fresh_models = {"text_encoder": fresh.text_encoder, "text_encoder_2": fresh.text_encoder_2}
        attach_lora(fresh_models, read_lora_file(path, load_unet(tiny_model / "unet")))
        for a, b in zip(fresh.encode(PROMPTS), text.encode(PROMPTS)):
            assert torch.equal(a, b), fmt


# -- files diffusers loads --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("kind", ["conv", "dora", "text"])
def test_our_files_in_diffusers_load_lora_weights(tiny_model, tmp_path, fmt, kind, caplog):
    """Our kohya and diffusers exports, loaded by StableDiffusionXLPipeline.load_lora_weights, give
    our UNet's and text encoders' outputs, where diffusers supports the kind."""
    parts = load_sdxl(tiny_model, torch.float32)
    apply_lora_to_unet(parts.unet, 4, 8, "attention", **KINDS.get(kind, {}))
    randomize_adapters(parts.unet)
    if kind == "text":
        apply_lora_to_text_encoders(parts.text_encoder, 4, 8)
        randomize_adapters(parts.text_encoder, seed=2)
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, export_adapters(components(parts.unet, parts.text_encoder)), fmt, {})
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    if fmt == "kohya" and kind == "dora":
        # diffusers drops the dora_scale of a kohya SDXL file (with a warning) and applies the
        # rest as plain LoRA, so it cannot match; it reads our diffusers export of DoRA exactly.
        # ComfyUI reads dora_scale.
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(path)
        assert "DoRA checkpoint that is not compatible" in caplog.text
        return
    pipe.load_lora_weights(path)
    assert_like_pipeline(parts, pipe)


# -- key coverage on the full-size SDXL -------------------------------------------------------------


def sgm_shapes() -> dict[str, list[int]]:
    """The weight shapes of the real SDXL UNet by module name, in its original layout: the names
    ComfyUI maps `lora_unet_*` keys to (every weight of the model), and kohya's networks/lora.py
    builds its names from."""
    shapes = json.loads((ROOT / "tests" / "data" / "sdxl-sgm-unet-shapes.json").read_text())
    return {k.removesuffix(".weight"): v for k, v in shapes.items() if k.endswith(".weight")}


def kohya_targets(conv: bool) -> dict[str, list[int]]:
    """The layers kohya's LoRA network adapts in SDXL, read off the original layout: every Linear
    in a transformer (sub-module 1 of a slot, or middle_block.1), and with conv_dim every layer of
    the ResBlocks (in_layers.2, emb_layers.1, out_layers.3, skip_connection), of the Downsamples
    (op) and of the Upsamples (conv)."""
    transformer = re.compile(r"(input_blocks\.\d+\.1|output_blocks\.\d+\.1|middle_block\.1)\..+")
    resnet = re.compile(
        r"(input_blocks\.\d+\.0|output_blocks\.\d+\.0|middle_block\.[02])\."
        r"(in_layers\.2|emb_layers\.1|out_layers\.3|skip_connection)"
        r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.2\.conv"
    )
    return {
        m: shape
        for m, shape in sgm_shapes().items()
        if (transformer.fullmatch(m) and len(shape) == 2) or (conv and resnet.fullmatch(m))
    }


@pytest.mark.parametrize("conv", [False, True])
def test_kohya_names_cover_the_real_sdxl(sdxl_unet_config, conv):
    """Full-size SDXL on the meta device, target mode all (+ conv): every kohya name we write is
    exactly one that kohya's networks/lora.py builds and ComfyUI maps, and none is missing."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_unet_config)
    names = apply_lora_to_unet(unet, 4, 4, "all", conv_rank=4 if conv else 0)
    ours = {kohya_name(f"unet.{n}").removeprefix("lora_unet_") for n in names}
    shapes = sgm_shapes()
    assert ours <= {m.replace(".", "_") for m in shapes}  # ComfyUI maps each to a weight
    assert ours == {m.replace(".", "_") for m in kohya_targets(conv)}  # kohya's, all of them
    for n, layer in lora_modules(unet):  # and each is the layer of that name and shape
        assert list(layer.weight.shape) == shapes[sgm_path(n, 2)], n


def test_text_encoder_names_cover_comfyui(tmp_path):
    """Full-size CLIP-L and bigG on the meta device: every text-encoder name is one ComfyUI's key
    map builds (lora_te1_ / lora_te2_ + text_model_encoder_layers_{i}_{mlp_fc1, ..., self_attn_q_proj}),
    with all six projections of every layer SDXL reads."""
    with torch.device("meta"):
        text = torch.nn.Module()
        text.text_encoder = CLIPTextModel(
            CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder")
        )
        text.text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2")
        )
    names = apply_lora_to_text_encoders(text, 4, 4)
    projections = ["mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj"]
    projections.append("self_attn_out_proj")
    comfy = {
        f"lora_te{e}_text_model_encoder_layers_{b}_{c}"
        for e in (1, 2)
        for b in range(32)
        for c in projections
    }
    ours = {kohya_name(n) for n in names}
    assert ours <= comfy
    assert len(ours) == 6 * (11 + 32)


def test_block_index_and_per_block_ranks(unet):
    assert block_index("input_blocks.4.1.proj_in") == 5
    assert block_index("middle_block.1.transformer_blocks.0.attn1.to_q") == 11
    assert block_index("output_blocks.8.0.skip_connection") == 21
    assert block_index("time_embed.0") == 0 and block_index("out.2") == 22
    ranks = [0] * 23
    ranks[5], ranks[11], ranks[14] = 2, 4, 8  # input_blocks.4, middle_block.1, output_blocks.1
    alphas = [float(r) * 2 for r in ranks]
    names = apply_lora_to_unet(unet, 16, 16, "all", block_ranks=ranks, block_alphas=alphas)
    assert {block_index(sgm_path(n, 2)) for n in names} == {5, 11, 14}
    for n, layer in lora_modules(unet):
        k = block_index(sgm_path(n, 2))
        assert layer.lora.rank == ranks[k] and float(layer.lora.alpha) == alphas[k]


def test_full_size_parameter_counts(sdxl_unet_config):
    """The counts README.md lists (rank 4), against counts read off the real layout: a LoRA on a
    weight (out, in[, kh, kw]) has rank * (in * kh * kw + out) parameters; DoRA adds out."""
    with torch.device("meta"):
        conv = UNet2DConditionModel.from_config(sdxl_unet_config)
        dora = UNet2DConditionModel.from_config(sdxl_unet_config)
    apply_lora_to_unet(conv, 4, 4, "all", conv_rank=4)
    apply_lora_to_unet(dora, 4, 4, "attention", kind="dora")

    def lora_size(shape: list[int]) -> int:
        return 4 * (shape[0] + torch.Size(shape[1:]).numel())

    targets = kohya_targets(conv=True)
    expected = {"linear": 0, "conv": 0, "magnitude": 0}
    for shape in targets.values():
        expected["conv" if len(shape) == 4 else "linear"] += lora_size(shape)
    assert count_parameters(conv) == expected
    attention = {m: s for m, s in kohya_targets(conv=False).items() if re.search(r"attn\d\.to_", m)}
    assert count_parameters(dora) == {
        "linear": sum(lora_size(s) for s in attention.values()),
        "conv": 0,
        "magnitude": sum(s[0] for s in attention.values()),
    }
    print(count_parameters(conv), count_parameters(dora))  # for README.md


# -- training -------------------------------------------------------------------------------------

ADAPTER_RUN = [
    "--use_lora",
    "--use_dora",
    "--conv_rank",
    "2",
    "--train_text_encoder",
    "--text_encoder_lr",
    "2e-3",
    "5e-4",
    "--learning_rate",
    "1e-3",
    "--batch_size",
    "2",
    "--use_ema",
    "--max_train_steps",
    "4",
    "--save_interval",
    "2",
]


def run(tiny_model, out, *extra):
    return train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, out, *ADAPTER_RUN, *extra)))


def test_text_encoder_conv_dora_training_resumes_exactly_and_exports(tiny_model, tmp_path, capsys):
    last = run(tiny_model, tmp_path / "straight")
    assert "adapter parameters: unet linear" in capsys.readouterr().out
    final = load_checkpoint(last)
    lora = final["lora"]
    assert any(k.startswith("text_encoder.") for k in lora)
    assert any(k.startswith("text_encoder_2.") for k in lora)
    assert any(".resnets." in k for k in lora) and any(k.endswith(".magnitude") for k in lora)
    # The text encoders' adapters trained, at their own learning rates.
    assert all(
        lora[k].abs().sum() > 0 for k in lora if k.startswith("text_encoder") and ".up." in k
    )
    assert [g["initial_lr"] for g in final["optimizer"]["param_groups"]] == [1e-3, 2e-3, 5e-4]
    # Train-then-resume equals train straight through, bitwise.
    step2 = next((tmp_path / "straight").glob("lora_step000002_2*.pt"))
    resumed = load_checkpoint(run(tiny_model, tmp_path / "resumed", "--resume", str(step2)))
    for k, v in lora.items():
        assert torch.equal(resumed["lora"][k], v), k
    for k, v in final["ema"]["shadow"].items():
        assert torch.equal(resumed["ema"]["shadow"][k], v), k
    # The kohya file beside it names every part as ComfyUI does.
    keys = read_lora_file(last.with_suffix(".safetensors"), load_unet(tiny_model / "unet"))
    assert keys.keys() == {
        canonical(k.removesuffix(".lora.down.weight")) for k in lora if k.endswith("down.weight")
    }
    from safetensors import safe_open

    with safe_open(last.with_suffix(".safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in names)
    assert any(n.startswith("lora_te2_") for n in names)
    assert any(n.endswith("in_layers_2.dora_scale") for n in names)
    # Generation applies the text encoders' adapters with the UNet's.
    parts = load_sdxl(tiny_model, torch.float32)
    plain = parts.text_encoder.encode(PROMPTS)[0]
    from sampling.inference import apply_lora
    from sdxl.checkpoint import read_lora_weights

    apply_lora(components(parts.unet, parts.text_encoder), read_lora_weights(last, parts.unet))
    assert not torch.allclose(parts.text_encoder.encode(PROMPTS)[0], plain, atol=1e-4)
    out = tmp_path / "gen"
    generate_images.main(
        generate_images.parse_args(
            ["--pretrained-model", str(tiny_model), "--lora-checkpoint", str(last)]
            + ["--prompt", "a cat", "--steps", "1", "--image-size", "64", "--output-dir", str(out)]
        )
    )
    assert (out / "00000.png").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--use_lora", "--train_text_encoder", "--cache_text_embeddings"], "cannot be cached"),
        (["--train_text_encoder"], "--train_text_encoder is an adapter option; add --use_lora"),
        (["--use_lora", "--text_encoder_lr", "1e-4"], "needs --train_text_encoder"),
        (["--use_lora", "--block_dims", "1,2,3"], "takes 23 comma-separated values"),
        (["--use_lora", "--block_alphas", ",".join(["1"] * 23)], "needs --block_dims"),
        (["--use_lora", "--conv_rank", "-1"], "--conv_rank must be 0 or more"),
    ],
)
def test_adapter_flags_are_checked(tiny_model, tmp_path, flags, message):
    from sdxl.errors import UserError

    args = train_sdxl.parse_args(train_argv(tiny_model, tmp_path, *flags))
    with pytest.raises(UserError, match=re.escape(message)):
        train_sdxl.check_args(args)


def test_block_dims_from_the_command_line_and_a_config_file(tiny_model, tmp_path):
    dims = [0] * 23
    dims[5] = 2  # input_blocks.4: the tiny model's second level, first transformer
    config = tmp_path / "run.toml"
    config.write_text(f"use_lora = true\nblock_dims = {dims}\n")
    args = train_sdxl.parse_args(train_argv(tiny_model, tmp_path / "out", "--config", str(config)))
    assert args.block_dims == dims
    args.max_train_steps = 1
    last = train_sdxl.main(args)
    lora = load_checkpoint(last)["lora"]
    blocks = {block_index(sgm_path(k.split(".lora.")[0].removeprefix("unet."), 2)) for k in lora}
    assert blocks == {5}


# -- files other programs write ---------------------------------------------------------------------


def test_a_kohya_file_with_text_encoder_conv_and_dora_keys_loads_fully(tiny_model, tmp_path):
    """A kohya file as diffusers' converter (and trainers built on peft) writes it: diffusers block
    names, text-encoder keys, convolutions, DoRA scales. Our models with it give diffusers'
    outputs; a key that names nothing is one line."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=unet_targets, use_dora=True))
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        # transformers' own add_adapter wants a newer peft than diffusers does; inject directly
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=text_targets), encoder)
    randomize_adapters(pipe.unet)
    randomize_adapters(pipe.text_encoder, 2)
    randomize_adapters(pipe.text_encoder_2, 3)
    state = {}
    for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        state |= {f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    state |= {
        f"text_encoder_2.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder_2).items()
    }
    kohya = {}
    for key, value in convert_state_dict_to_kohya(state).items():
        # diffusers' converter leaves the UNet's magnitudes under half-converted peft names;
        # written as LyCORIS and OneTrainer write them: <name>.dora_scale, (out, 1[, 1, 1]).
        if key.endswith(".lora_magnitude_vector"):
            name = key.removesuffix(".lora_magnitude_vector").replace(".", "_")
            key, value = f"{name}.dora_scale", value.reshape(-1, *[1] * (value.dim() - 1))
        kohya[key] = value.contiguous()
    assert any(k.startswith("lora_te1_") for k in kohya) and any("dora_scale" in k for k in kohya)
    path = tmp_path / "foreign.safetensors"
    save_file(kohya, path)
    parts = load_sdxl(tiny_model, torch.float32)
    modules = read_lora_file(path, parts.unet)
    attach_lora(components(parts.unet, parts.text_encoder), modules)
    assert {k.split(".")[0] for k in modules} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(isinstance(layer.lora, DoRA) and layer.conv for _, layer in lora_modules(parts.unet))
    assert_like_pipeline(parts, pipe)
    from sdxl.errors import UserError

    nowhere = {"lora_unet_nowhere_9.lora_down.weight": torch.zeros(4, 8)}
    nowhere["lora_unet_nowhere_9.lora_up.weight"] = torch.zeros(8, 4)
    ia3 = {"lora_unet_conv_in.on_input": torch.zeros(4)}
    half_loha = {"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}
    for extra, message in (
        (nowhere, "lora_unet_nowhere_9 does not exist in this model"),
        (ia3, "1 keys of the LoRA file are of no adapter kind .*on_input"),
        (half_loha, r"a loha adapter with only \['hada_w1_a'\]: the file is incomplete"),
    ):
        save_file({**kohya, **extra}, path)
        with pytest.raises(UserError, match=message):
            generate_images.main(
                generate_images.parse_args(
                    ["--pretrained-model", str(tiny_model), "--lora-checkpoint", str(path)]
                    + ["--prompt", "x", "--steps", "1", "--image-size", "64"]
                    + ["--output-dir", str(tmp_path / "gen")]
                )
            )
