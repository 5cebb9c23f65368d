"""LyCORIS's LoHa and LoKr (sdxl/lora.py: LoHa, LoKr) against LyCORIS itself (the lycoris-lora
package, on diffusers' UNet with the same weights): outputs and gradients, files both ways, peft's
LoHa / LoKr layout, training and the file's metadata. (Their invariants, with every kind's:
tests/test_adapters.py.)"""

import copy

import pytest
import torch
from conftest import EXAMPLES, close, randomize_adapters, tiny_specs, train_argv, unet_inputs
from diffusers import UNet2DConditionModel as DiffusersUNet
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris.wrapper import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from safetensors import safe_open
from torch import nn

import extract_lora_weights
import train_sdxl
from sdxl.device import Distributed, resolve_precision
from sdxl.lora import (
    AdaptedLayer,
    Factors,
    LoHa,
    LoKr,
    apply_lora_to_unet,
    export_adapters,
    factorization,
    lora_modules,
)
from sdxl.lora_formats import attach_lora, read_lora_file, save_lora_file
from sdxl.names import sgm_path
from sdxl.pretrained import load_sdxl
from sdxl.unet import load_unet
from training.data_loader import SampleRules, TrainingData, collate
from training.scan import scan
from training.specs import AdapterSpec, OptimizerSpec, StepSpec
from training.train_loop import build_trainer, train_step

REFERENCE = {"loha": LohaModule, "lokr": LokrModule}
KINDS = {  # apply_lora_to_unet keywords: attention, and the ResNet blocks' convolutions
    "loha": {"kind": "loha", "conv_rank": 4, "conv_alpha": 8},
    "lokr": {"kind": "lokr", "conv_rank": 4, "conv_alpha": 8, "lokr_factor": 4},
    "lokr_even": {"kind": "lokr", "conv_rank": 2, "conv_alpha": 2},  # factor -1, full w2 too
}


@pytest.fixture
def unet(tiny_model):
    return load_unet(tiny_model / "unet")


def sgm_container(reference: nn.Module, paths: list[str]) -> nn.Module:
    """The reference UNet's layers at `paths` under their original (SGM) names, `unet.input_blocks.
    ...`, which kohya's file names spell: LyCORIS reads and writes a file of a module by its
    module names."""
    root = nn.Module()
    for path in paths:
        parent = root
        *parts, leaf = f"unet.{sgm_path(path, 2)}".split(".")
        for part in parts:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, reference.get_submodule(path))
    return root


@pytest.fixture
def kohya_prefix(monkeypatch):
    """LyCORIS names modules lycoris_<path>; kohya's files, lora_<path>."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora")


# -- against LyCORIS --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_outputs_and_gradients_match_lycoris(tiny_model, unet, kind):
    """The same weights in LyCORIS's modules (on diffusers' UNet) and in ours: the same outputs
    and the same gradients of every factor."""
    apply_lora_to_unet(unet, 4, 8, "attention", **KINDS[kind])
    randomize_adapters(unet)
    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    pairs, shapes = [], set()
    for path, layer in lora_modules(unet):
        lora = layer.lora
        factor = KINDS[kind].get("lokr_factor", -1)
        options = {"factor": factor} if kind.startswith("lokr") else {}
        three_by_three = layer.weight.dim() == 4 and layer.weight.shape[-1] == 3
        rank = KINDS[kind]["conv_rank"] if three_by_three else 4  # as apply_lora_to_unet plans
        theirs = REFERENCE[lora.kind](path, ref.get_submodule(path), 1.0, rank,
                                      float(lora.alpha), **options)  # fmt: skip
        with torch.no_grad():
            for name, p in lora.factors().items():
                getattr(theirs, name).copy_(p)
                pairs.append((p, getattr(theirs, name)))
        theirs.apply_to()
        shapes.add(tuple(sorted(lora.factors())))
    x, t, ctx, cond = unet_inputs()
    ours = unet(x, t, ctx, cond)
    theirs = ref(x, t, ctx, added_cond_kwargs=cond).sample
    close(ours, theirs)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for p, q in pairs:
        close(p.grad, q.grad)
    if kind == "lokr_even":  # a full w2 where the rank is half its side or more
        assert ("lokr_w1", "lokr_w2") in shapes and ("lokr_w1", "lokr_w2_a", "lokr_w2_b") in shapes


@pytest.mark.parametrize(
    "kind, options",
    [
        ("loha", {"algo": "loha"}),
        ("loha_tucker", {"algo": "loha", "use_tucker": True}),
        ("lokr", {"algo": "lokr", "factor": 4}),
        ("lokr_both_tucker", {"algo": "lokr", "decompose_both": True, "use_tucker": True,
                              "linear_dim": 2, "conv_dim": 2}),
    ],
)  # fmt: skip
def test_files_lycoris_writes_load_here(tiny_model, unet, tmp_path, kohya_prefix, kind, options):
    """LyCORIS's own network (Tucker cores and a factored w1 included), saved by LyCORIS, loads
    into our UNet and gives LyCORIS's outputs."""
    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    probe = load_unet(tiny_model / "unet")
    paths = apply_lora_to_unet(probe, 4, 8, "attention", conv_rank=4)  # which layers to adapt
    dims = {"linear_dim": 8, "linear_alpha": 4, "conv_dim": 4, "conv_alpha": 2} | options
    network = create_lycoris(sgm_container(ref, paths), 1.0, **dims)
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    names = {k.rpartition(".")[2] for k in network.state_dict()}
    assert ("hada_t1" in names) == (kind == "loha_tucker")
    assert {"lokr_t2", "lokr_w1_a"} <= names if kind == "lokr_both_tucker" else True
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {})
    attach_lora({"unet": unet}, read_lora_file(path, unet))
    assert len(list(lora_modules(unet))) == len(paths)
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        close(unet(x, t, ctx, cond), ref(x, t, ctx, added_cond_kwargs=cond).sample)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_our_files_load_in_lycoris(tiny_model, unet, tmp_path, kohya_prefix, kind):
    """A file we write (kohya layout) loads in LyCORIS (create_lycoris_from_weights) as the
    same adapters: LyCORIS's outputs are ours."""
    paths = apply_lora_to_unet(unet, 4, 8, "attention", **KINDS[kind])
    randomize_adapters(unet)
    path = tmp_path / f"{kind}.safetensors"
    save_lora_file(path, export_adapters({"unet": unet}), "kohya", {})
    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    network, _ = create_lycoris_from_weights(1.0, str(path), sgm_container(ref, paths))
    assert len(network.loras) == len(paths)
    assert {type(m) for m in network.loras} == {REFERENCE[kind]}
    network.apply_to()
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        close(unet(x, t, ctx, cond), ref(x, t, ctx, added_cond_kwargs=cond).sample)


def test_factorization_is_lycoris():
    from lycoris.functional.general import factorization as theirs

    for dimension in (1, 7, 64, 96, 127, 128, 250, 320, 360, 640, 768, 1280, 2048, 2560):
        for factor in (-1, 1, 2, 4, 8, 16, 3):
            assert factorization(dimension, factor) == theirs(dimension, factor), (
                dimension,
                factor,
            )


# -- invariants ---------------------------------------------------------------------------------


def test_a_layer_of_each_kind_against_lycoris_directly():
    """One Linear and one 3x3 Conv2d, every factor layout LyCORIS builds (LoKr's full w2, its
    factored w1, Tucker cores): the same delta weight as LyCORIS's rebuild, bit for bit up to fp32
    rounding."""
    torch.manual_seed(0)
    for base in (nn.Linear(64, 96), nn.Conv2d(32, 48, 3, padding=1)):
        x = torch.randn(2, 64) if isinstance(base, nn.Linear) else torch.randn(2, 32, 6, 6)
        for cls, options in (
            (LoHa, {}),
            (LoHa, {"use_tucker": True}),
            (LoKr, {"factor": 4}),
            (LoKr, {"factor": -1}),
            (LoKr, {"factor": 4, "decompose_both": True, "use_tucker": True}),
        ):
            theirs = REFERENCE[cls.kind]("m", copy.deepcopy(base), 1.0, 4, 8.0, **options)
            with torch.no_grad():
                for p in theirs.parameters():
                    p.normal_(std=0.3)
            ours = cls(base, 4, 8.0, factor=options["factor"]) if cls is LoKr else cls(base, 4, 8.0)
            factors = {k: v for k, v in theirs.state_dict().items() if k != "alpha"}
            ours.load(Factors(cls.kind, factors, 8.0))
            theirs.apply_to()
            close(AdaptedLayer(base, ours)(x), theirs(x))


# -- peft's layout, training, metadata ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_diffusers_layout_is_peft_loha_and_lokr(tiny_model, unet, tmp_path, kind):
    """Our diffusers-layout file is peft's LoHa / LoKr state dict with its config: peft builds the
    adapters from the header and gives our outputs."""
    import json

    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict

    apply_lora_to_unet(unet, 4, 8, "attention", **KINDS[kind])
    randomize_adapters(unet)
    path = tmp_path / "peft.safetensors"
    save_lora_file(path, export_adapters({"unet": unet}), "diffusers", {})
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
        weights = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
    config = {k.removeprefix("unet."): v for k, v in header.items() if k.startswith("unet.")}
    assert config.pop("peft_type") == kind.partition("_")[0].upper()
    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    config_class = LoHaConfig if kind == "loha" else LoKrConfig
    assert config.get("decompose_factor", -1) == KINDS[kind].get("lokr_factor", -1)
    inject_adapter_in_model(config_class(**config), ref)
    result = set_peft_model_state_dict(ref, weights)
    assert not result.unexpected_keys
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        close(unet(x, t, ctx, cond), ref(x, t, ctx, added_cond_kwargs=cond).sample)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_overfit_one_batch(tiny_model, kind):
    """Trained on one batch (the same noise and timesteps every step), the loss falls by half in
    30 steps; only the adapters change."""
    torch.manual_seed(0)
    parts = load_sdxl(tiny_model, torch.float32)
    base = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    specs = tiny_specs(
        AdapterSpec(kind=kind, rank=4, alpha=4, target_mode="all", lokr_factor=4),
        OptimizerSpec(learning_rate=3e-3, weight_decay=0.0),
        StepSpec(precision="fp32", gradient_checkpointing=False),
    )
    cpu = Distributed(0, 1, torch.device("cpu"))
    encoders = (parts.vae.moments, parts.text_encoder.encode)
    tr = build_trainer(
        specs, parts, *encoders, resolve_precision("fp32", cpu.device), cpu, max_steps=30
    )
    data = TrainingData(scan(EXAMPLES)[:2], 32, rules=SampleRules(center_crop=True))
    batch = collate([data[(0, 0)], data[(1, 1)]])
    losses = [train_step(tr, [batch], [])[0].item() for _ in range(30)]
    assert losses[-1] < losses[0] / 2, losses
    for k, v in tr.unet.state_dict().items():
        if ".lora." not in k:
            assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_the_command_line_trains_and_exports_lycoris_metadata(tiny_model, tmp_path, kind):
    """train_sdxl.py --adapter loha|lokr, then extract_lora_weights.py: the kohya file says
    lycoris.kohya with algo=loha|lokr (and LoKr's factor), as LyCORIS writes it."""
    import json

    out = tmp_path / "run"
    extra = ["--lokr_factor", "4"] if kind == "lokr" else []
    argv = train_argv(tiny_model, out, "--use_lora", "--adapter", kind, "--lora_rank", "4",
                      "--conv_rank", "2", "--max_train_steps", "2", *extra)  # fmt: skip
    train_sdxl.main(train_sdxl.parse_args(argv))
    ckpt = sorted(out.glob("*step*.pt"))[-1]
    target = tmp_path / f"{kind}.safetensors"
    extract_lora_weights.main(extract_lora_weights.build_parser().parse_args([str(ckpt), "--format", "kohya",
                                                               "--output", str(target)]))  # fmt: skip
    with safe_open(target, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == kind and args["conv_dim"] == "2"
    assert (args.get("factor") == "4") == (kind == "lokr")
    assert any(k.endswith(".hada_w1_a" if kind == "loha" else ".lokr_w1") for k in keys)


def test_generate_images_takes_a_lycoris_file(tiny_model, tmp_path, kohya_prefix):
    """A LoKr file LyCORIS wrote (attention and convolutions) drives generate_images.py: the
    images differ from the base model's, and equal those of the same file in our kohya layout."""
    import numpy as np
    from PIL import Image

    import generate_images

    ref = DiffusersUNet.from_pretrained(tiny_model / "unet")
    paths = apply_lora_to_unet(load_unet(tiny_model / "unet"), 4, 8, "attention", conv_rank=4)
    network = create_lycoris(sgm_container(ref, paths), 1.0, linear_dim=4, linear_alpha=4,
                             conv_dim=2, conv_alpha=2, algo="lokr", factor=4)  # fmt: skip
    network.apply_to()  # (which registers its modules: their weights are its state dict)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = tmp_path / "lycoris_lokr.safetensors"
    network.save_weights(str(theirs), torch.float32, {})
    unet = load_unet(tiny_model / "unet")
    ours = tmp_path / "ours.safetensors"
    save_lora_file(ours, read_lora_file(theirs, unet), "kohya", {})

    def image(*extra):
        out = tmp_path / f"gen{len(list(tmp_path.glob('gen*')))}"
        argv = ["--pretrained-model", str(tiny_model), "--output-dir", str(out), "--image-size",
                "64", "--steps", "2", "--prompt", "a red circle", "--num-images", "1", *extra]  # fmt: skip
        generate_images.main(generate_images.parse_args(argv))
        return np.asarray(Image.open(out / "00000.png"), dtype=np.int16)

    base, lycoris_made, ours_made = (
        image(),
        image("--lora-checkpoint", str(theirs)),
        image("--lora-checkpoint", str(ours)),
    )
    assert np.abs(lycoris_made - base).max() > 0
    assert np.array_equal(lycoris_made, ours_made)
