"""lora_tools.py: resize, extract, merge, combine (sdxl/lora_svd.py), on the tiny SDXL."""

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from PIL import Image
from safetensors import safe_open

import generate_images
import lora_tools
from sdxl.errors import UserError
from sdxl.lora import Adapter, apply_lora_to_unet, export_adapters
from sdxl.lora_formats import read_lora_file, save_lora_file
from sdxl.lora_svd import chosen_rank, update_of
from sdxl.pretrained import load_sdxl
from sdxl.unet import load_unet


def run(*argv):
    """lora_tools.py with its arguments; resize and combine are told the LoRAs are the tiny
    SDXL's."""
    argv = [str(a) for a in argv]
    if argv[0] in ("resize", "combine"):
        argv += ["--model", "tiny"]
    return lora_tools.main(lora_tools.parse_args(argv))


def make_lora(tiny_model, path, seed, rank=8, kind="lora", true_rank=None):
    """A random LoRA (attention and convolutions) of the tiny UNet, written in kohya's layout;
    with `true_rank`, each update has that rank though the file's rank is `rank`."""
    unet = load_unet(tiny_model / "unet")
    apply_lora_to_unet(
        unet, rank, rank / 2, "attention", kind=kind, conv_rank=rank, conv_alpha=rank
    )
    randomize_adapters(unet, seed)
    if true_rank is not None:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name.endswith("lora.up.weight"):
                    p[:, true_rank:] = 0  # the update has rank true_rank
    save_lora_file(path, export_adapters({"unet": unet}), "kohya", {})
    return read_lora_file(path, unet), unet


def updates(modules, unet) -> dict[str, torch.Tensor]:
    shapes = {f"unet.{n}": tuple(m.weight.shape) for n, m in unet.named_modules() if hasattr(m, "weight") and m.weight is not None}  # fmt: skip
    return {k: update_of(a, shapes[k]) for k, a in modules.items()}


def assert_updates_close(actual, expected, rtol=1e-5):
    """The same layers, and each update within rtol of its largest entry (fp32 SVD round trip)."""
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, rtol=0, atol=rtol * v.abs().max().item())


# -- resize ---------------------------------------------------------------------------------------


def test_resize_to_the_full_rank_and_to_the_true_rank_is_exact(tiny_model, tmp_path, capsys):
    modules, unet = make_lora(tiny_model, tmp_path / "a.safetensors", 1)
    out = tmp_path / "r8.safetensors"
    run("resize", tmp_path / "a.safetensors", "--rank", "8", "--output", out, "--dtype", "fp32")
    resized = read_lora_file(out, unet)
    assert {a.rank for a in resized.values()} == {8}
    assert_updates_close(updates(resized, unet), updates(modules, unet))
    assert "mean 100.00% of the Frobenius norm kept" in capsys.readouterr().out
    # rank 8 in the file, rank 4 in truth: resized to 4, nothing is lost
    low, _ = make_lora(tiny_model, tmp_path / "b.safetensors", 2, true_rank=4)
    run("resize", tmp_path / "b.safetensors", "--rank", "4", "--output", tmp_path / "r4.safetensors",
        "--dtype", "fp32")  # fmt: skip
    r4 = read_lora_file(tmp_path / "r4.safetensors", unet)
    assert {a.rank for a in r4.values()} == {4}
    assert_updates_close(updates(r4, unet), updates(low, unet))
    # the scale alpha / rank is kept
    assert {a.alpha / a.rank for a in r4.values()} == {a.alpha / a.rank for a in low.values()}
    with safe_open(tmp_path / "r4.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_dynamic_ranks_follow_kohyas_rules():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    assert chosen_rank(s, None, "sv_ratio", 4.0) == 3  # 8, 4, 2 >= 8 / 4
    assert chosen_rank(s, 2, "sv_ratio", 4.0) == 2  # at most --rank
    energy = (s**2).cumsum(0) / (s**2).sum()
    assert chosen_rank(s, None, "sv_fro", float(energy[1].sqrt())) == 2
    assert chosen_rank(s, None, "sv_fro", 1.0) == 5
    assert chosen_rank(s, None, "sv_cumulative", 12 / 15.5) == 2
    assert chosen_rank(s, None, "sv_cumulative", 12 / 15.5 + 1e-3) == 3


def test_a_loha_resizes_into_a_plain_lora(tiny_model, tmp_path, capsys):
    modules, unet = make_lora(tiny_model, tmp_path / "loha.safetensors", 3, rank=2, kind="loha")
    out = tmp_path / "from_loha.safetensors"
    run("resize", tmp_path / "loha.safetensors", "--rank", "4", "--output", out, "--dtype", "fp32")
    assert "holds loha adapters; the output is a plain LoRA" in capsys.readouterr().out
    resized = read_lora_file(out, unet)
    assert all(isinstance(a, Adapter) for a in resized.values())
    # a LoHa of rank 2 has updates of rank at most 4: rank 4 holds them exactly
    assert_updates_close(updates(resized, unet), updates(modules, unet))


# -- combine --------------------------------------------------------------------------------------


def test_combine_by_concatenation_is_exact_and_by_svd_needs_a_rank(tiny_model, tmp_path):
    a, unet = make_lora(tiny_model, tmp_path / "a.safetensors", 1, rank=4)
    b, _ = make_lora(tiny_model, tmp_path / "b.safetensors", 2, rank=2)
    out = tmp_path / "ab.safetensors"
    run("combine", f"{tmp_path / 'a.safetensors'}:0.5", tmp_path / "b.safetensors", "--output", out,
        "--dtype", "fp32")  # fmt: skip
    both = read_lora_file(out, unet)
    assert {x.rank for x in both.values()} == {6}
    ua, ub = updates(a, unet), updates(b, unet)
    assert_updates_close(updates(both, unet), {k: 0.5 * ua[k] + ub[k] for k in ua}, rtol=1e-6)
    # a LoKr has no ranks to concatenate: with --rank its sum is factored
    make_lora(tiny_model, tmp_path / "k.safetensors", 4, rank=2, kind="lokr")
    with pytest.raises(UserError, match="give --rank"):
        run("combine", tmp_path / "a.safetensors", tmp_path / "k.safetensors", "--output",
            tmp_path / "ak.safetensors")  # fmt: skip
    run("combine", tmp_path / "a.safetensors", tmp_path / "k.safetensors", "--rank", "3",
        "--output", tmp_path / "ak.safetensors")  # fmt: skip
    assert {x.rank for x in read_lora_file(tmp_path / "ak.safetensors", unet).values()} == {3}


# -- merge and extract ----------------------------------------------------------------------------


def test_merge_equals_the_loras_applied_and_extract_recovers_the_lora(
    tiny_model, tiny_configs, tmp_path
):
    a, unet = make_lora(tiny_model, tmp_path / "a.safetensors", 1, rank=4)
    make_lora(tiny_model, tmp_path / "k.safetensors", 2, rank=2, kind="lokr")
    merged = tmp_path / "merged.safetensors"
    run("merge", "--base", tiny_model, f"{tmp_path / 'a.safetensors'}:0.7", tmp_path / "k.safetensors",
        "--output", merged, "--dtype", "fp32")  # fmt: skip

    with safe_open(
        merged, "pt"
    ) as f:  # a model file ComfyUI and AUTOMATIC1111 list, ours to replace
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.title"] == "merged" and meta["written_by"] == "sdxl-lora"
    # the file loads in our single-file loader bitwise as the merged models
    from sampling.inference import apply_lora
    from sdxl.checkpoint import read_lora_weights
    from sdxl.lora import components

    expected = load_sdxl(tiny_model, torch.float32)
    models = components(expected.unet, expected.text_encoder)
    apply_lora(models, read_lora_weights(tmp_path / "a.safetensors", expected.unet), 0.7)
    apply_lora(models, read_lora_weights(tmp_path / "k.safetensors", expected.unet), 1.0)
    loaded = load_sdxl(merged, torch.float32)
    for name, model in components(loaded.unet, loaded.text_encoder).items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, models[name].state_dict()[key]), (name, key)
    for key, value in loaded.vae.state_dict().items():
        assert torch.equal(value, expected.vae.state_dict()[key]), key

    # generating from the merged file equals generating with the LoRAs applied
    def image(*extra):
        out = tmp_path / f"gen{len(list(tmp_path.glob('gen*')))}"
        argv = ["--output-dir", str(out), "--image-size", "64", "--steps", "2", "--prompt",
                "a red circle", "--num-images", "1", "--precision", "fp32", *map(str, extra)]  # fmt: skip
        generate_images.main(generate_images.parse_args(argv))
        return np.asarray(Image.open(out / "00000.png"), dtype=np.int16)

    applied = image("--pretrained-model", tiny_model, "--lora-checkpoint",
                    f"{tmp_path / 'a.safetensors'}:0.7", "--lora-checkpoint", tmp_path / "k.safetensors")  # fmt: skip
    from_file = image("--pretrained-model", merged)
    assert np.abs(applied - from_file).max() <= 1  # the generation tests' fp32 bar: 1/255

    # a model with only LoRA a merged in: extract gives back a's update at its rank
    only_a = tmp_path / "only_a.safetensors"
    run(
        "merge",
        "--base",
        tiny_model,
        tmp_path / "a.safetensors",
        "--output",
        only_a,
        "--dtype",
        "fp32",
    )
    out = tmp_path / "extracted.safetensors"
    run("extract", "--base", tiny_model, "--tuned", only_a, "--rank", "4", "--conv_rank", "4",
        "--output", out, "--dtype", "fp32")  # fmt: skip
    extracted = read_lora_file(out, unet)
    assert {x.rank for x in extracted.values()} == {4}
    assert_updates_close(updates(extracted, unet), updates(a, unet))


def test_outputs_never_replace_a_foreign_file_and_bad_flags_are_one_line(tiny_model, tmp_path):
    make_lora(tiny_model, tmp_path / "a.safetensors", 1, rank=4)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("mine")
    with pytest.raises(UserError, match="this project did not write it"):
        run("resize", tmp_path / "a.safetensors", "--rank", "2", "--output", notes)
    assert notes.read_text() == "mine"
    for argv, message in (
        (["resize", tmp_path / "a.safetensors", "--output", tmp_path / "x.safetensors"], "needs --rank"),
        (["resize", tmp_path / "a.safetensors", "--dynamic", "sv_fro", "--param", "2", "--output",
          tmp_path / "x.safetensors"], "a fraction in"),
        (["resize", tmp_path / "nope.safetensors", "--rank", "2", "--output", tmp_path / "x.safetensors"], "does not exist"),
        (["resize", tmp_path / "a.safetensors", "--rank", "2", "--output", tmp_path / "x.pt"], "give a .safetensors"),
        (["combine", tmp_path / "a.safetensors", "--rank", "0", "--output", tmp_path / "x.safetensors"], "at least 1"),
    ):  # fmt: skip
        with pytest.raises(UserError, match=message):
            run(*argv)
    assert not list(tmp_path.glob("x*"))
