"""Text conditioning, VAE and the model-folder loader against diffusers / transformers."""

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl.pretrained import check_model_folder, load_sdxl, resolve_model
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.vae import SDXLVAE
from sdxl.weights import WeightsError

PROMPTS = ["a photo of a cat", "", "An oil painting of a lighthouse at dusk, waves, gulls"]
LONG = " ".join(["word"] * 100)


@pytest.fixture(scope="module")
def text_encoder(tiny_model):
    return SDXLTextEncoder.from_pretrained(tiny_model)


def test_context_and_pooled_match_encode_prompt(text_encoder, tiny_pipeline):
    ctx, pooled = text_encoder.encode(PROMPTS)
    ref_ctx, _, ref_pooled, _ = tiny_pipeline.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False
    )
    assert ctx.shape == (3, 77, 96) and pooled.shape == (3, 64)
    # Same transformers modules, same ids: measured 0.0; the stated bar is 1e-6 absolute in fp32.
    torch.testing.assert_close(ctx, ref_ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)


def test_no_negative_prompt_gives_zeros(text_encoder, tiny_pipeline):
    neg_ctx, neg_pooled = text_encoder.encode_negative(None, batch=2)
    _, ref_neg, _, ref_neg_pooled = tiny_pipeline.encode_prompt(
        PROMPTS[:2], do_classifier_free_guidance=True
    )
    assert neg_ctx.abs().max() == 0 and neg_pooled.abs().max() == 0
    assert neg_ctx.shape == ref_neg.shape and neg_pooled.shape == ref_neg_pooled.shape
    assert ref_neg.abs().max() == 0


def test_negative_prompt_is_encoded(text_encoder, tiny_pipeline):
    neg = ["blurry, low quality", ""]
    neg_ctx, neg_pooled = text_encoder.encode_negative(neg, batch=2)
    _, ref_neg, _, ref_neg_pooled = tiny_pipeline.encode_prompt(
        PROMPTS[:2], do_classifier_free_guidance=True, negative_prompt=neg
    )
    torch.testing.assert_close(neg_ctx, ref_neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_pooled, ref_neg_pooled, rtol=0, atol=1e-6)
    assert neg_ctx.abs().max() > 0  # an explicit "" is encoded, not zeroed


def test_long_prompt_truncated_with_one_warning(text_encoder, tiny_pipeline, caplog, capfd):
    # One chunk (training's default --max_token_length 75): truncated as the diffusers pipeline does.
    with caplog.at_level(logging.WARNING):
        ctx, pooled = text_encoder.encode([LONG], chunks=1)
        text_encoder.encode([LONG, LONG], chunks=1)  # the same caption again, as each epoch
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    # "word" is 4 letter tokens here (no merges): 100 words = 400 tokens + BOS/EOS, 77 kept.
    assert len(warnings) == 1  # once per caption, not once per tokenizer and call
    assert "325 dropped" in warnings[0].getMessage()
    # Nor transformers' own "Token indices sequence length is longer ..." (printed to stderr).
    assert "sequence length" not in capfd.readouterr().err
    ref_ctx, _, ref_pooled, _ = tiny_pipeline.encode_prompt(
        [LONG], do_classifier_free_guidance=False
    )
    torch.testing.assert_close(ctx, ref_ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)


def test_text_encoders_frozen(text_encoder):
    assert not any(p.requires_grad for p in text_encoder.parameters())
    assert text_encoder.dtype == torch.float32  # CPU default


def test_tokenizers_match_sdxl_conventions(text_encoder):
    ids_1 = text_encoder.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    ids_2 = text_encoder.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    eos = text_encoder.tokenizer.eos_token_id
    assert ids_1[-1] == eos  # tokenizer pads with <|endoftext|>
    assert ids_2[-1] == 0 and text_encoder.tokenizer_2.convert_ids_to_tokens(0) == "!"
    assert eos == max(text_encoder.tokenizer.get_vocab().values())


def test_vae_round_trip_matches_autoencoderkl(tiny_model, tiny_pipeline):
    vae = SDXLVAE.from_pretrained(tiny_model / "vae")
    assert vae.scaling_factor == 0.13025
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    eps = torch.randn((2, 4, 8, 6), generator=torch.Generator().manual_seed(0))
    latents = vae.sample(vae.moments(images), eps)
    ref = tiny_pipeline.vae
    ref_latents = ref.encode(images).latent_dist.sample(torch.Generator().manual_seed(0)) * 0.13025
    assert latents.shape == (2, 4, 8, 6)
    torch.testing.assert_close(latents, ref_latents, rtol=0, atol=1e-6)
    decoded = vae.decode(latents)
    with torch.no_grad():
        ref_decoded = ref.decode(ref_latents / 0.13025).sample
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    # Ours decodes image by image, the reference the batch: only the summation order differs
    # (measured 7.5e-6 at most).
    torch.testing.assert_close(decoded, ref_decoded, rtol=0, atol=2e-5)


def test_load_sdxl_on_tiny_folder(tiny_model):
    parts = load_sdxl(tiny_model, torch.bfloat16)
    assert next(parts.unet.parameters()).dtype == torch.bfloat16
    assert next(parts.vae.parameters()).dtype == torch.float32  # VAE stays fp32
    assert parts.schedule.timesteps(30)[0].item() == 958


def test_resolve_tiny_uses_cache(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("SDXL_LORA_CACHE", str(tmp_path))
    cached = tmp_path / "tiny-sdxl-v1"
    shutil.copytree(tiny_model, cached)
    assert resolve_model("tiny") == cached


@pytest.mark.parametrize(
    "remove,missing",
    [
        ("text_encoder_2/model.safetensors", "text_encoder_2/model.safetensors is missing"),
        (
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.safetensors is missing",
        ),
        ("tokenizer/vocab.json", "tokenizer/vocab.json is missing"),
        ("model_index.json", "model_index.json is missing"),
    ],
)
def test_broken_folder_fails_with_one_line(tmp_path, tiny_model, remove, missing):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / remove).unlink()
    with pytest.raises(WeightsError) as e:
        check_model_folder(broken)
    msg = str(e.value)
    assert missing in msg and "\n" not in msg
    assert (
        "hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir weights/sdxl-base-1.0"
        in msg
    )


def test_missing_folder_and_wrong_shapes(tmp_path, tiny_model):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")
    broken = tmp_path / "shapes"
    shutil.copytree(tiny_model, broken)
    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = torch.zeros(32, 4, 5, 5)
    save_file(state, path)
    with pytest.raises(
        WeightsError, match=r"conv_in.weight \(32, 4, 5, 5\) vs expected \(32, 4, 3, 3\)"
    ):
        load_sdxl(broken, torch.float32)


def test_long_prompts_are_encoded_in_chunks(text_encoder):
    """A prompt over 75 tokens is cut into chunks of 75, each encoded with its own BOS and EOS as a
    prompt of its own, and the contexts concatenated; the pooled vector is the first chunk's."""
    # "word" is 4 letter tokens with the tiny byte vocabulary: 100 words = 400 tokens = 6 chunks.
    assert text_encoder.chunks_needed([LONG]) == 6 and text_encoder.chunks_needed(PROMPTS) == 1
    ctx, pooled = text_encoder.encode([LONG, "a cat"])
    assert ctx.shape == (2, 6 * 77, 96)
    one_ctx, one_pooled = text_encoder.encode([LONG], chunks=1)  # today's truncated encoding
    # fp32; a larger batch sums in another order: stated bar 1e-6 absolute (measured below 5e-7).
    torch.testing.assert_close(ctx[:1, :77], one_ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[:1], one_pooled, rtol=0, atol=1e-6)
    # Chunk 2 (tokens 75-149) by hand: BOS, the tokens, EOS, padding, through both encoders.
    for tokenizer, model, features in (
        (text_encoder.tokenizer, text_encoder.text_encoder, slice(0, 32)),
        (text_encoder.tokenizer_2, text_encoder.text_encoder_2, slice(32, 96)),
    ):
        ids = tokenizer(LONG, add_special_tokens=False).input_ids[75:150]
        row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        hidden = model(torch.tensor([row]), output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(ctx[0, 77:154, features], hidden[0], rtol=0, atol=1e-6)
    # A short prompt's chunks past its end are the empty prompt's (--max_token_length 150).
    short, _ = text_encoder.encode(["a cat"], chunks=2)
    empty, _ = text_encoder.encode([""], chunks=1)
    torch.testing.assert_close(short[:, :77], ctx[1:, :77], rtol=0, atol=1e-6)
    torch.testing.assert_close(short[:, 77:], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(ctx[1:, 77:154], empty, rtol=0, atol=1e-6)
