"""What keeps GPU memory down, checked on the CPU: the VAE one image at a time and in tiles above a
size, and training's phases (caches built before the UNet reaches the device, replaced encoders
off it)."""

import json
import os

import torch
from conftest import train_argv, unet_inputs
from diffusers import AutoencoderKL

import train_sdxl
from sdxl.vae import SDXLVAE


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def test_one_image_at_a_time_equals_the_whole_batch(tiny_model):
    """Below the tile size nothing but the batching changes: encoding and decoding image by image
    equals diffusers' AutoencoderKL on the whole batch within 1e-5 (fp32; the same kernels on
    smaller batches, so only summation order may differ)."""
    ref = AutoencoderKL.from_pretrained(tiny_model / "vae")
    ours = SDXLVAE(AutoencoderKL.from_pretrained(tiny_model / "vae"), tile_size=128)
    x = images(3, 64)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        expected = torch.cat([dist.mean, dist.logvar], dim=1)
        torch.testing.assert_close(ours.moments(x), expected, rtol=1e-5, atol=1e-5)
        z = dist.mean * ours.scaling_factor
        torch.testing.assert_close(
            ours.decode(z), ref.decode(dist.mean).sample, rtol=1e-5, atol=1e-5
        )


def test_tiles_above_the_tile_size(tiny_model):
    """Above the tile size images go through diffusers' tiling with our tile size (tiles of 128 px
    here, every 96 px, blended over 32), one image at a time; at the tile size or below they do
    not, and the result is the untiled one exactly."""
    vae = SDXLVAE(AutoencoderKL.from_pretrained(tiny_model / "vae"), tile_size=128)
    whole = SDXLVAE(AutoencoderKL.from_pretrained(tiny_model / "vae"), tile_size=0)
    ref = AutoencoderKL.from_pretrained(tiny_model / "vae")
    ref.tile_sample_min_size, ref.tile_latent_min_size = 128, 16
    x = images(2, 256)
    with torch.no_grad():
        z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        tiled = vae.decode(z)
        expected = torch.cat(
            [ref.tiled_decode(z[i : i + 1] / vae.scaling_factor).sample for i in range(2)]
        )
        torch.testing.assert_close(tiled, expected, rtol=0, atol=0)
        assert tiled.shape == (2, 3, 256, 256)
        assert not torch.equal(tiled, whole.decode(z))  # the tiles' GroupNorms see only a tile
        moments = vae.moments(x)
        assert moments.shape == (2, 8, 32, 32) and torch.isfinite(moments).all()
        assert not torch.equal(moments, whole.moments(x))
        small = images(2, 128)
        assert vae.tiles(x) and not vae.tiles(small) and not whole.tiles(x)
        assert torch.equal(vae.moments(small), whole.moments(small))
        assert torch.equal(vae.decode(z[:, :, :16, :16]), whole.decode(z[:, :, :16, :16]))


def test_the_lean_encoder_and_decoder_are_diffusers_bit_for_bit_with_less_alive(tiny_model):
    """sdxl/vae.py: lean_encoder walks diffusers' encoder with fewer activations alive. The same
    operations on the same tensors: equal to diffusers' forward bit for bit (whole and tiled). Its
    peak, traced on the CPU: at most three of the first block's activations, where diffusers' keeps
    four (five with SDXL's two ResNets a block: the first block's input is held through it)."""
    from sdxl.memory import MemoryTrace

    ours = SDXLVAE(AutoencoderKL.from_pretrained(tiny_model / "vae"), tile_size=128)
    ref = AutoencoderKL.from_pretrained(tiny_model / "vae")
    ref.use_tiling, ref.tile_sample_min_size, ref.tile_latent_min_size = True, 128, 16
    peaks = []
    with torch.no_grad():
        for encoder in (ours.vae.encoder, ref.encoder):
            with MemoryTrace(torch.device("cpu")) as trace:
                x = images(1, 128)  # made inside the trace: on its device
                start = trace.live
                assert encoder(x).shape == (1, 8, 16, 16)
                peaks.append(trace.reserved_default - start)
        assert torch.equal(ours.vae.encoder(x), ref.encoder(x))
        big = images(1, 256)  # tiled: diffusers' tiling calls the lean encoder on each tile
        tiled = ref.encode(big).latent_dist
        assert torch.equal(ours.moments(big), torch.cat([tiled.mean, tiled.logvar], dim=1))
    first = ref.config.block_out_channels[0] * 128 * 128 * 4  # bytes of one first-block activation
    assert peaks[0] <= 3 * first + 4096, (peaks, first)
    assert peaks[1] >= 4 * first, (peaks, first)
    # lean_decoder alike: the same bits as diffusers' decoder (whole; tiled: test_tiles_above_...),
    # with less alive at its peak
    with torch.no_grad():
        for decoder in (ours.vae.decoder, ref.decoder):
            with MemoryTrace(torch.device("cpu")) as trace:  # (its attention: a memory model)
                z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
                start = trace.live
                assert decoder(z).shape == (1, 3, 128, 128)
                peaks.append(trace.reserved_default - start)
        assert torch.equal(ours.vae.decoder(z), ref.decoder(z))
    assert peaks[2] < peaks[3], peaks


def test_caches_are_built_before_the_unet_reaches_the_device(tiny_model, tmp_path, monkeypatch):
    """The order of moves in a cached run: the VAE's decoder to the host, its encoder and the text
    encoders to the device, the caches built, both encoders back to the CPU, and only then the
    UNet to the device. Validation images move
    nothing: their prompts were encoded at the start, and the VAE's decoder never leaves the host.
    """
    from diffusers.models.autoencoders.vae import Decoder, Encoder

    from sdxl.text_encoders import SDXLTextEncoder
    from sdxl.unet import UNet2DConditionModel
    from training import cache

    events = []
    move = torch.nn.Module.to

    def to(self, *args, **kwargs):
        kinds = {Encoder: "vae encoder", Decoder: "vae decoder", SDXLVAE: "vae"}
        kinds |= {SDXLTextEncoder: "text", UNet2DConditionModel: "unet"}
        kind = kinds.get(type(self))
        if kind and args and isinstance(args[0], (str, torch.device)):
            events.append(f"{kind} -> {torch.device(args[0]).type}")
        return move(self, *args, **kwargs)

    def caching(init):
        def wrapped(self, *args, **kwargs):
            events.append(f"cache {type(self).__name__}")
            return init(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(cache.CachedLatents, "__init__", caching(cache.CachedLatents.__init__))
    monkeypatch.setattr(cache.CachedText, "__init__", caching(cache.CachedText.__init__))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    argv = ["--use_lora", "--cache_latents", "--cache_text_embeddings", "--max_train_steps", "1"]
    argv += ["--validation_prompts", str(prompts), "--validation_steps", "1"]
    argv += ["--validation_sampling_steps", "1", "--cache_dir", str(tmp_path / "cache")]
    train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, tmp_path / "out", *argv)))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["cuda_alloc_conf"] == os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    first_unet = events.index("unet -> cpu")
    assert events[: first_unet + 1] == [
        "vae decoder -> cpu",  # the host, where training decodes (validation images)
        "vae encoder -> cpu",  # "cpu" is this machine's device: the same moves as on CUDA
        "text -> cpu",
        "cache CachedLatents",
        "cache CachedText",
        "vae decoder -> cpu",
        "vae encoder -> cpu",
        "text -> cpu",
        "unet -> cpu",
    ]
    assert events[first_unet + 1 :] == []  # nothing borrowed back
    assert (tmp_path / "out" / "validation_step000001.png").is_file()


# -- fp8 storage of the frozen UNet --------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_base_stays_close_to_bf16_and_keeps_what_it_should(tiny_model):
    """Each stored weight, upcast, is within 2^-4 of its value (e4m3's rounding; plus half the
    smallest subnormal step of its channel's scale). The UNet stored in fp8 and computed in bf16
    against the same UNet in bf16: relative L2 error of the output below 0.12 (measured 0.073 on
    the tiny random model, where bf16 is 0.014 from fp32: random weights make both larger than a
    trained model's). The norms, biases, conv_in/conv_out and the embeddings stay in bf16;
    state-dict keys do not change."""
    from sdxl.frozen import FP8, FrozenLayer, store_in_fp8
    from sdxl.unet import load_unet

    fp32 = load_unet(tiny_model / "unet")
    bf16 = load_unet(tiny_model / "unet", torch.bfloat16)
    fp8 = load_unet(tiny_model / "unet", torch.bfloat16)
    keys = fp8.state_dict().keys()
    stored = store_in_fp8(fp8)
    assert fp8.state_dict().keys() == keys
    dtypes = {k: v.dtype for k, v in fp8.state_dict().items()}
    assert stored == sum(1 for k, d in dtypes.items() if d == FP8) and stored > 50
    for k, d in dtypes.items():
        kept = k.startswith(("conv_in", "conv_out", "time_embedding", "add_embedding"))
        kept |= "norm" in k or k.endswith("bias")
        assert (d == torch.bfloat16) == kept, k
    x, t, ctx, cond = unet_inputs()
    with torch.no_grad():
        reference = fp32(x, t, ctx, cond)
        ours = fp8(x.bfloat16(), t, ctx.bfloat16(), {k: v.bfloat16() for k, v in cond.items()})
        half = bf16(x.bfloat16(), t, ctx.bfloat16(), {k: v.bfloat16() for k, v in cond.items()})
    print(
        f"fp8 vs bf16 {relative_error(ours, half):.4f}, bf16 vs fp32 {relative_error(half, reference):.4f}"
    )
    assert relative_error(ours, half) < 0.12
    for name, layer in fp8.named_modules():
        if isinstance(layer, FrozenLayer):
            original = bf16.get_submodule(name).weight.float()
            scale = layer.weight_scale.reshape(-1, *[1] * (original.dim() - 1))
            error = (layer.base_weight(torch.float32) - original).abs()
            assert (error <= original.abs() / 16 + scale * 2.0**-10).all(), name


def test_lora_on_an_fp8_base_trains(tiny_model, tmp_path):
    """LoRA and conv LoRA on the fp8 base: only adapters are trainable, and at a fixed batch the
    loss falls at least 2x in 8 steps (measured 1.35 -> 0.25), the fp8 weights untouched."""
    from conftest import EXAMPLES, tiny_specs

    from sdxl.device import Distributed, resolve_precision
    from sdxl.frozen import FP8
    from sdxl.pretrained import load_sdxl
    from training.data_loader import SampleRules, TrainingData, collate
    from training.scan import scan
    from training.specs import AdapterSpec, OptimizerSpec, StepSpec
    from training.train_loop import build_trainer, train_step

    torch.manual_seed(0)
    parts = load_sdxl(tiny_model, torch.float32)
    specs = tiny_specs(
        AdapterSpec(rank=8, target_mode="all", conv_rank=4),
        OptimizerSpec(learning_rate=3e-3, weight_decay=0.0),
        StepSpec(precision="fp32", fp8_base=True),
    )
    cpu = Distributed(0, 1, torch.device("cpu"))
    tr = build_trainer(
        specs,
        parts,
        parts.vae.moments,
        parts.text_encoder.encode,
        resolve_precision("fp32", cpu.device),
        cpu,
        max_steps=8,
    )
    stored = {k: v.clone() for k, v in tr.unet.state_dict().items() if v.dtype == FP8}
    assert len(stored) > 50
    data = TrainingData(scan(EXAMPLES)[:2], 32, rules=SampleRules(center_crop=True))
    batch = collate([data[(0, 0)], data[(1, 1)]])
    losses = [train_step(tr, [batch], [])[0].item() for _ in range(8)]
    print(f"fp8 base: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] / 2, losses
    for name, p in tr.unet.named_parameters():
        assert p.requires_grad == (".lora." in name), name
    for k, v in tr.unet.state_dict().items():
        if k in stored:
            assert torch.equal(v.view(torch.uint8), stored[k].view(torch.uint8)), k


def test_the_allocator_setting_is_ours_only_where_the_user_set_none(monkeypatch):
    from sdxl.device import default_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert default_allocator() == "expandable_segments:True"
    assert default_allocator() == "expandable_segments:True"  # and stays so
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(name, "max_split_size_mb:128")
        assert default_allocator() == "max_split_size_mb:128"
        assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") in (None, "max_split_size_mb:128")
