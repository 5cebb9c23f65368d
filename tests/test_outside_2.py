"""Tried from outside, round 2: one test per item of the issue, numbered as it numbers them."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, train_argv
from PIL import Image

import generate_images
import resume_training
import train_sdxl
from cli.train import check_args, optimizer_args
from sdxl.checkpoint import find_checkpoints, load_checkpoint, lora_metadata
from sdxl.errors import UserError
from sdxl.lora import apply_lora_to_unet, export_adapters
from sdxl.lora_formats import save_lora_file
from sdxl.unet import load_unet
from training.data_loader import load_mask, read_data
from training.scan import DataError, Record, scan
from training.specs import DataSpec


def train(tiny_model, out, *extra, data=None):
    argv = train_argv(tiny_model, out, "--use_lora", "--max_train_steps", "1", *extra)
    if data is not None:
        argv[argv.index("--data_dir") + 1] = str(data)
    return train_sdxl.main(train_sdxl.parse_args(argv))


def generate(tiny_model, out, *extra):
    argv = ["--pretrained-model", str(tiny_model), "--prompt", "a red circle", "--steps", "1"]
    argv += ["--image-size", "64", "--output-dir", str(out), *extra]
    return generate_images.main(generate_images.parse_args(argv))


def pairs(folder: Path, n: int, size=(40, 40)) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a shape {i}")
    return folder


# -- 0: the bitwise tests hold on any CPU ----------------------------------------------------------


def test_00_plain_and_freshly_adapted_unets_make_the_same_kernel_calls(tiny_model):
    """A fresh adapter adds exact zeros; for that to show bitwise, the base path must run the same
    kernels as the plain UNet. Each matrix product and convolution the frozen plain UNet runs (op,
    shapes, strides, alignment) is run the same way by the adapted one, the adapters' own aside;
    unfrozen, proj_in's strided input takes another kernel (mm after a copy, not bmm), which is
    why the tests freeze first. And MKL runs in its reproducibility mode here."""
    from conftest import unet_inputs
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "bmm", "addmm", "convolution"):
                shapes = [(tuple(a.shape), a.stride(), a.data_ptr() % 64) for a in args[:3]]
                if not any(4 in s[0][-2:] and len(s[0]) == 2 for s in shapes):  # rank-4 adapters
                    self.seen.append((name, shapes))
            return func(*args, **(kwargs or {}))

    def calls(unet):
        with torch.no_grad(), Calls() as mode:
            out = unet(*unet_inputs()[:3], unet_inputs()[3])
        return out, [c for c in mode.seen if not (c[0] == "convolution" and 4 in c[1][1][0][:2])]

    unet = load_unet(tiny_model / "unet")
    _, unfrozen = calls(unet)
    before, plain = calls(unet.requires_grad_(False))
    assert unfrozen != plain  # the kernel choice depends on requires_grad
    apply_lora_to_unet(unet, 4, 8, "attention")
    after, adapted = calls(unet)
    assert plain == adapted and torch.equal(before, after)
    assert "STRICT" in __import__("os").environ["MKL_CBWR"]


# -- 1, 2: repeat folders -------------------------------------------------------------------------


def test_01_02_repeat_folders_are_counted_said_and_bounded(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    pairs(data / "10_dog", 2)
    pairs(data / "0_cat", 1)
    pairs(data / "150_bird", 1)
    pairs(data / "misc", 1)
    with caplog.at_level(logging.WARNING):
        records = scan(data)
    printed = capsys.readouterr().out
    assert "0_cat/ 1 x 0" in printed and "10_dog/ 2 x 10" in printed
    assert "171 samples an epoch" in printed  # 2 x 10 + 150 + 1 (0_cat left out)
    assert not any(r.concept == "0_cat" for r in records) and len(records) == 4
    assert "0 repeats, so its 1 images are left out" in caplog.text
    assert "150_bird/ repeats its 1 images 150 times" in caplog.text
    for name in ("2023_trip", "999999999_x"):  # a year; a count that would not fit in memory
        other = tmp_path / name.split("_")[0]
        pairs(other / name, 3)
        with pytest.raises(DataError, match=rf"subfolder {name}/ would repeat its 3 images"):
            scan(other)


# -- 3, 4: generation folders and broken LoRAs -------------------------------------------------------


def lora_file(tiny_model, path, value=None):
    unet = load_unet(tiny_model / "unet")
    apply_lora_to_unet(unet, 4, 8)
    modules = export_adapters({"unet": unet})
    if value is not None:
        next(iter(modules.values())).up.fill_(value)
    save_lora_file(path, modules, "kohya", {})
    return path


def test_03_a_changed_lora_or_base_model_is_refused_when_a_folder_is_extended(tiny_model, tmp_path):
    lora = lora_file(tiny_model, tmp_path / "style.safetensors", 0.01)
    out = tmp_path / "gen"
    generate(tiny_model, out, "--lora-checkpoint", str(lora), "--num-images", "1")
    lora_file(tiny_model, lora, 0.02)  # retrained under the same name
    with pytest.raises(UserError, match=r"other settings \(loras_sha256\)"):
        generate(tiny_model, out, "--lora-checkpoint", str(lora), "--num-images", "2")
    base = tmp_path / "model"
    shutil.copytree(tiny_model, base)
    out2 = tmp_path / "gen2"
    generate(base, out2, "--num-images", "1")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # a weight changed, in the file's last MiB
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"other settings \(base_model_identity\)"):
        generate(base, out2, "--num-images", "2")


def test_04_a_lora_with_nan_stops_with_one_line_naming_it(tiny_model, tmp_path):
    lora = lora_file(tiny_model, tmp_path / "broken.safetensors", float("nan"))
    with pytest.raises(UserError, match=rf"{lora} holds NaN or Inf values"):
        generate(tiny_model, tmp_path / "gen", "--lora-checkpoint", str(lora))
    assert not (tmp_path / "gen" / "00000.png").exists()


# -- 5, 6, 7: masks ------------------------------------------------------------------------------


def masked_folder(tmp_path, masks) -> Path:
    data = tmp_path / "masked"
    data.mkdir(parents=True)
    for i, mask in enumerate(masks):
        Image.new("RGB", (32, 32), (200, 40 * i, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square")
        mask.save(data / f"{i}.mask.png")
    return data


def test_05_a_16_bit_mask_is_scaled_not_clipped(tmp_path):
    half = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))  # mode I;16, 50%
    data = masked_folder(tmp_path, [half])
    (record,) = scan(data)
    assert load_mask(record).getextrema() == (128, 128)


def test_06_a_mask_of_another_size_is_refused_naming_both_files(tmp_path):
    data = masked_folder(tmp_path, [Image.new("L", (32, 32), 255), Image.new("L", (40, 32), 255)])
    spec = DataSpec(data, size=(32, 32), masked_loss=True, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"1.mask.png is 40x32 but its image .*1.png is 32x32"):
        read_data(spec)
    read_data(DataSpec(data, size=(32, 32), cache_dir=tmp_path / "cache"))  # unmasked: no matter


def test_07_empty_masks_are_warned_of_and_all_empty_stops(tmp_path, caplog):
    full, empty = Image.new("L", (32, 32), 255), Image.new("L", (32, 32), 0)
    spec = DataSpec(masked_folder(tmp_path, [full, empty]), size=(32, 32), masked_loss=True)
    with caplog.at_level(logging.WARNING):
        read_data(spec)
    assert "1.png: its loss mask is empty" in caplog.text and "0.png" not in caplog.text
    spec = DataSpec(masked_folder(tmp_path / "b", [empty, empty]), size=(32, 32), masked_loss=True)
    with pytest.raises(DataError, match="every loss mask .* is empty"):
        read_data(spec)


# -- 8, 14: resume ---------------------------------------------------------------------------------


def test_08_14_block_dims_and_config_runs_resume_and_a_moved_folder_resumes_where_it_is(
    tiny_model, tmp_path, capsys
):
    config = tmp_path / "run.toml"
    config.write_text('lora_rank = 4\nrandom_flip = true\nblock_dims = [4, 2, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]\n')  # fmt: skip
    first = tmp_path / "first"
    train(
        tiny_model, first, "--config", str(config), "--save_interval", "1", "--max_train_steps", "2"
    )
    moved = tmp_path / "moved"
    first.rename(moved)
    capsys.readouterr()
    assert resume_training.main(resume_training.parse_args(["--auto", str(moved)])) == 0
    command = capsys.readouterr().out
    assert f"--output_dir={moved} " in command and "--block_dims=4,2,0,0,0,1," in command
    path, ckpt = find_checkpoints(moved)[-1]
    argv = resume_training.config_to_argv({**ckpt["config"], "output_dir": str(moved)})
    argv += ["--resume", str(path), "--max_train_steps", "3"]
    last = train_sdxl.main(train_sdxl.parse_args(argv))
    assert last.parent == moved and load_checkpoint(last)["step"] == 3
    assert load_checkpoint(last)["config"]["block_dims"][:2] == [4, 2] and not first.exists()


# -- 9, 10, 11, 13, 16, 18: flags and config files, one line each, before anything is loaded ------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shuffle_caption", "--caption_separator", ""], "--caption_separator is empty"),
        (["--block_dims", ",".join(["0"] * 23)], "--block_dims are all 0, which adapts no layer"),
        (["--block_dims", "-1" + ",1" * 22], "--block_dims values must be 0 or more, got -1"),
        (["--block_dims=-1" + ",1" * 22], "--block_dims values must be 0 or more, got -1"),
        (["--block_dims", "1,2"], "--block_dims takes 23 comma-separated values"),
        (["--optimizer_args", "betas=(0.9"], r"'\(0.9' is not a Python value"),
    ],
)
def test_09_10_13_18_bad_values_are_one_line_before_the_heavy_imports(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        check_args(train_sdxl.parse_args(train_argv("tiny", tmp_path / "o", "--use_lora", *extra)))


def test_13_optimizer_args_as_kohya_writes_them_and_missing_packages(monkeypatch):
    assert optimizer_args("adamw", ["weight_decay=0.01", "betas=(0.9,0.99)"]) == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
    }
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="--optimizer prodigy needs prodigyopt: uv sync"):
        optimizer_args("prodigy", [])


def test_13_an_unknown_optimizer_key_is_found_before_the_model_loads(tiny_model, tmp_path):
    argv = train_argv(tmp_path / "no-such-model", tmp_path / "o", "--optimizer_args", "nope=1")
    argv[argv.index("--pretrained_model") + 1] = "someone/not-cached"  # loading it would fail
    with pytest.raises(UserError, match="--optimizer adamw: .*nope.*check --optimizer_args"):
        train_sdxl.main(train_sdxl.parse_args(argv))


def test_11_16_config_files_in_other_encodings_kohya_sections_and_named_errors(tmp_path):
    argv = lambda config: train_argv("tiny", tmp_path / "o", "--config", str(config))  # noqa: E731
    config = tmp_path / "run.toml"
    for encoding in ("utf-16", "utf-8-sig"):  # PowerShell's >, and a BOM
        config.write_text("lora_rank = 4\n", encoding=encoding)
        assert train_sdxl.parse_args(argv(config)).lora_rank == 4
    config.write_text("[model_arguments]\nlora_rank = 6\n[training_arguments]\nseed = 3\n")
    args = train_sdxl.parse_args(argv(config))
    assert (args.lora_rank, args.seed) == (6, 3)
    config.write_text('lora_rank = "eight"\n')
    with pytest.raises(UserError, match=rf"--config {config}: lora_rank = 'eight': invalid int"):
        train_sdxl.parse_args(argv(config))
    config.write_text("[training_arguments]\nnetwork_module = 'networks.lora'\n")
    with pytest.raises(UserError, match=rf"--config {config}: unknown option 'network_module'"):
        train_sdxl.parse_args(argv(config))
    config.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8 or UTF-16 text|not valid TOML"):
        train_sdxl.parse_args(argv(config))


# -- 12: a run that failed after start-up does not block its rerun -------------------------------


def test_12_a_failed_start_leaves_no_lock_and_no_run_to_protect(tiny_model, tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model")
    out = tmp_path / "out"
    with pytest.raises(UserError):
        train(bad, out)
    assert (out / "config.json").exists() and not (out / ".lock").exists()
    capsys.readouterr()
    train(tiny_model, out)  # the corrected command, the same folder
    assert "stale" not in capsys.readouterr().out and list(out.glob("lora_step*.pt"))


# -- 15: a missing local path is not sent to the Hub -----------------------------------------------


def test_15_a_missing_relative_path_says_so(tmp_path):
    for name in ("../sdxl", "sdxl.safetensors"):
        with pytest.raises(UserError, match=f"there is no folder or file {name}.*owner/name"):
            check_args(train_sdxl.parse_args(train_argv(name, tmp_path / "o")))
    with pytest.raises(UserError, match="there is no folder weights/sdxl here either"):
        generate(Path("weights/sdxl"), tmp_path / "gen")  # of the form owner/name: the Hub is asked


# -- 17: a prompt row's error names its line ------------------------------------------------------


def test_17_a_jsonl_error_names_the_line(tmp_path):
    from sampling.prompts import read_rows

    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(UserError, match=r"p.jsonl, line 3: not a JSON object"):
        read_rows(rows)
    rows.write_text('{"prompt": "a"}\n\n{"prompt": ""}\n')
    with pytest.raises(UserError, match=r"line 3: no prompt"):
        read_rows(rows)


# -- 19, 20, 21: what the files and README say about other programs ---------------------------------


def test_19_21_lora_metadata_describes_the_adapter_and_dora_in_kohya_format_warns(
    tiny_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sdxl.lora_formats._warned", set())  # once per process: not yet here
    dims = [0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0]
    flags = ["--use_dora", "--conv_rank", "2", "--conv_alpha", "1", "--block_dims"]
    last = train(tiny_model, tmp_path / "out", *flags, ",".join(map(str, dims)))
    assert "a DoRA file in kohya format loads correctly in ComfyUI and Forge only" in (
        capsys.readouterr().err
    )
    meta = lora_metadata(load_checkpoint(last))
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "2" and args["conv_alpha"] == "1" and args["dora_wd"] == "True"
    assert args["block_dims"].startswith("0,1,2,2,3") and args["algo"] == "lora"
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "3"
    assert meta["target_mode"] == "attention+conv"


def test_20_23_the_readme_says_what_the_programs_do_and_where_the_figures_are():
    readme = (ROOT / "README.md").read_text()
    assert "load none of a diffusers file's modules" not in readme
    assert "Forge skips the file" in readme and "applies `dora_scale` per input channel" in readme
    assert "closing notes" not in readme
    assert "## 11. Measured on a GPU" in (ROOT / "ADVANCED.md").read_text()


# -- 22: main reads in one sitting -------------------------------------------------------------------


def test_22_train_main_is_at_most_100_lines():
    import ast

    tree = ast.parse((ROOT / "train_sdxl.py").read_text())
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= 100


def test_a_record_with_a_mask_keeps_its_size_in_the_scan_index(tmp_path):
    data = masked_folder(tmp_path, [Image.new("L", (32, 32), 255)])
    (first,) = scan(data, tmp_path / "index")
    (again,) = scan(data, tmp_path / "index")  # from the index
    assert first == again and isinstance(again, Record) and again.mask_size == (32, 32)
