"""Single-file (SGM) checkpoints and Hub ids as base models, and the shipped tokenizers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SDXL_CONFIGS
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bench.sgm_file import write_sgm_file
from sampling.inference import Pipeline, generate_unique_batch
from sdxl.errors import UserError
from sdxl.pretrained import load_sdxl, resolve_model
from sdxl.single_file import CLIP_G, CLIP_L, UNET, VAE, open_clip_items, unet_name, vae_items
from sdxl.unet import UNet2DConditionModel

# The real SDXL UNet's SGM names and shapes, from kohya's SGM-layout SDXL UNet (without the
# model.diffusion_model. prefix).
SGM_SHAPES = json.loads((ROOT / "tests" / "data" / "sdxl-sgm-unet-shapes.json").read_text())


def test_the_shipped_tokenizers_are_clips():
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(SDXL_CONFIGS / name)
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert len(tokenizer) == 49408
    assert CLIPTokenizer.from_pretrained(SDXL_CONFIGS / "tokenizer_2").pad_token_id == 0  # "!"


def meta_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def test_full_size_sgm_names_convert_to_ours_on_meta():
    """The real SDXL's SGM UNet names (listed from kohya's SGM-layout UNet) convert, with diffusers'
    converter, to exactly our UNet's 1,680 keys and shapes; and our test writer produces exactly
    those SGM names. The same round trip for both text encoders and the VAE."""
    config = json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(ours) == 1680
    assert {unet_name(k): s for k, s in ours.items()} == {
        k: tuple(v) for k, v in SGM_SHAPES.items()
    }
    sgm = {UNET + k: torch.empty(v, device="meta") for k, v in SGM_SHAPES.items()}
    converted = convert_ldm_unet_checkpoint(sgm, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder"))
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2")
        )
        vae_config = json.loads((SDXL_CONFIGS / "vae" / "config.json").read_text())
        vae = AutoencoderKL.from_config(vae_config)
    l_state = {CLIP_L + "text_model." + k: v for k, v in meta_state(clip_l).items()}
    back = convert_ldm_clip_checkpoint(l_state, remove_prefix=CLIP_L)
    assert {k.removeprefix("text_model."): v.shape for k, v in back.items()} == {
        k: v.shape for k, v in meta_state(clip_l).items()
    }
    g_state = {CLIP_G + k: v for k, v in open_clip_items(meta_state(clip_g), 32).items()}
    assert g_state[CLIP_G + "transformer.resblocks.31.attn.in_proj_weight"].shape == (
        3 * 1280,
        1280,
    )
    back = convert_open_clip_checkpoint(clip_g, g_state, prefix=CLIP_G)
    assert {k: v.shape for k, v in back.items()} == {
        k: v.shape for k, v in meta_state(clip_g).items()
    }
    v_state = {VAE + n: v for n, v in (vae_items(k, t) for k, t in meta_state(vae).items())}
    assert v_state[VAE + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_vae_checkpoint(v_state, vae_config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in meta_state(vae).items()}


def all_tensors(parts) -> dict[str, torch.Tensor]:
    models = {"unet": parts.unet, "te": parts.text_encoder, "vae": parts.vae}
    return {f"{m}.{k}": v for m, model in models.items() for k, v in model.state_dict().items()}


def test_a_single_file_loads_bitwise_as_the_folder_and_generates_the_same(
    tiny_model, tiny_configs, tmp_path
):
    path = write_sgm_file(tiny_model, tmp_path / "tiny.safetensors")
    folder, single = load_sdxl(tiny_model, torch.float32), load_sdxl(
        resolve_model(path), torch.float32
    )
    a, b = all_tensors(folder), all_tensors(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = [
        generate_unique_batch(
            Pipeline(p.unet, p.text_encoder, p.vae, p.schedule, torch.device("cpu"), torch.float32),
            ["a red circle"],
            [3],
            64,
            64,
            steps=2,
        )
        for p in (folder, single)
    ]
    assert torch.equal(images[0], images[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_wrapped_ckpt_files(tiny_model, tiny_configs, tmp_path, dtype):
    half = write_sgm_file(tiny_model, tmp_path / "half.safetensors", dtype)
    expected = {
        k: v.to(dtype).float() for k, v in all_tensors(load_sdxl(tiny_model, torch.float32)).items()
    }
    got = all_tensors(load_sdxl(resolve_model(half), torch.float32))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    from safetensors.torch import load_file

    wrapped = tmp_path / "wrapped.ckpt"  # a .ckpt with the state_dict wrapper, as older files come
    torch.save({"state_dict": load_file(half), "global_step": 10}, wrapped)
    got = all_tensors(load_sdxl(resolve_model(wrapped), torch.float32))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def fake_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path)
    return path


@pytest.mark.parametrize(
    "shapes,looks",
    [
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
            },
            "Stable Diffusion 1.x",
        ),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (
                    320,
                    1024,
                ),
            },
            "Stable Diffusion 2.x",
        ),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "Flux"),
        (
            {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
            "the SDXL refiner",
        ),
        ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640)}, "is a LoRA"),
        ({"some.other.weight": (3,)}, "no Stable Diffusion model we know"),
    ],
)
def test_a_file_that_is_not_sdxl_base_is_named_in_one_line(tmp_path, shapes, looks):
    path = fake_file(tmp_path / "other.safetensors", shapes)
    with pytest.raises(UserError, match=looks):
        load_sdxl(resolve_model(path), torch.float32)


def prefill_hub_cache(cache: Path, repo: str, folder: Path) -> Path:
    """The Hugging Face cache layout of one snapshot (as huggingface_hub writes it)."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_a_hub_id_offline_from_the_cache_or_one_line(tiny_model, tmp_path):
    snapshot = prefill_hub_cache(tmp_path / "hub", "someone/tiny-sdxl", tiny_model)
    code = (
        "from sdxl.pretrained import resolve_model\n"
        "print(resolve_model('someone/tiny-sdxl'))\n"
        "resolve_model('someone/not-cached')\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.stdout.strip() == str(snapshot)  # found in the cache, nothing fetched
    assert "Hub model someone/not-cached is not in the Hugging Face cache" in res.stderr


def test_the_scripts_train_and_generate_on_a_single_file(tiny_model, tiny_configs, tmp_path):
    from conftest import train_argv

    import generate_images
    import train_sdxl

    path = write_sgm_file(tiny_model, tmp_path / "my-finetune.safetensors")
    argv = train_argv(path, tmp_path / "out", "--use_lora", "--max_train_steps", "1")
    last = train_sdxl.main(train_sdxl.parse_args(argv))
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["base_model"] == str(path)
    gen = ["--pretrained-model", str(path), "--lora-checkpoint", str(last), "--prompt", "a cat"]
    gen += ["--image-size", "64", "--steps", "1", "--output-dir", str(tmp_path / "gen")]
    generate_images.main(generate_images.parse_args(gen))
    assert (tmp_path / "gen" / "00000.png").is_file()
