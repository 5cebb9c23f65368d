"""The project tried from outside: bad data, bad flags, used folders, full disks, signals.

Each test is named after the defect it guards against (the numbers are the items of the issue
"Tried from outside").
"""

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, ROOT, train_argv
from PIL import Image

import extract_lora_weights
import generate_images
import resume_training
import sdxl.checkpoint
import train_sdxl
from cli.options import run_cli
from cli.train import training_specs
from sampling.prompts import read_prompt_file
from sdxl.checkpoint import load_checkpoint
from sdxl.device import Distributed, resolve_precision
from sdxl.errors import StoppedBySignal, UserError
from sdxl.files import atomic_write
from sdxl.pretrained import load_sdxl
from sdxl.weights import read_safetensors_header
from training.checkpoint import save_checkpoints
from training.data_loader import SampleRules, TrainingData, assign_buckets, load_image
from training.scan import scan
from training.train_loop import TrainState, build_trainer


def train(tiny_model, out, *extra):
    return train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, out, *extra)))


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def pairs(folder: Path, n: int, size=(40, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 7 % 256, 90, 30)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"caption {i}")
    return folder


# -- 1: a second run into a used folder ---------------------------------------------------------


def test_01_a_used_output_dir_is_refused_continued_or_overwritten(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    train(tiny_model, out, "--use_lora", "--save_interval", "1", "--max_train_steps", "3")
    assert f"are in {out}" in capsys.readouterr().out  # (item 18) where the outputs are
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UserError, match="holds another run"):
        train(tiny_model, out, "--use_lora", "--max_train_steps", "2", "--lora_rank", "4")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    # Resuming one of its checkpoints continues the run, and metrics.jsonl has no repeated steps.
    step2 = next(out.glob("lora_step000002_2*.pt"))
    train(tiny_model, out, "--use_lora", "--max_train_steps", "4", "--resume", str(step2))
    assert metrics_steps(out) == [1, 2, 3, 4]
    # --overwrite deletes the old run first.
    train(
        tiny_model, out, "--use_lora", "--max_train_steps", "1", "--lora_rank", "4", "--overwrite"
    )
    assert metrics_steps(out) == [1]
    assert {load_checkpoint(p)["config"]["lora_rank"] for p in out.glob("*.pt")} == {4}


def gen(tiny_model, out, *extra):
    argv = ["--pretrained-model", str(tiny_model), "--output-dir", str(out), "--image-size", "64"]
    return generate_images.main(generate_images.parse_args([*argv, "--steps", "1", *extra]))


def test_01_generation_refuses_a_folder_made_with_other_settings(tiny_model, tmp_path):
    out = tmp_path / "gen"
    gen(tiny_model, out, "--prompt", "a red circle", "--num-images", "1")
    gen(tiny_model, out, "--prompt", "a red circle", "--num-images", "2")  # same settings: more
    with pytest.raises(UserError, match=r"other settings \(prompts_sha256\)"):
        gen(tiny_model, out, "--prompt", "a blue square", "--num-images", "2", "--seed", "5")
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]
    # The VAE's tiling and an fp8 base change the images too.
    with pytest.raises(UserError, match=r"other settings \(fp8_base, vae_tile_size\)"):
        gen(tiny_model, out, "--prompt", "a red circle", "--fp8-base", "--vae-tile-size", "0")
    gen(tiny_model, out, "--prompt", "a blue square", "--num-images", "1", "--overwrite")
    assert sorted(p.name for p in out.glob("0*")) == ["00000.json", "00000.png", "00000.txt"]
    assert (out / "00000.txt").read_text().strip() == "a blue square"


# -- 2: a failed save keeps the previous lowest-loss checkpoint -------------------------------


def test_02_a_failed_lowest_loss_save_keeps_the_previous_one(tiny_model, tmp_path, monkeypatch):
    args = train_sdxl.parse_args(train_argv(tiny_model, tmp_path, "--use_lora"))
    cpu = Distributed(0, 1, torch.device("cpu"))
    parts = load_sdxl(tiny_model, torch.float32)
    precision = resolve_precision("fp32", cpu.device)
    tr = build_trainer(training_specs(args), parts, None, None, precision, cpu, 10)
    config = {**vars(args), "base_model": str(tiny_model), "image_size": [32, 32]}
    state = TrainState(step=1)
    save_checkpoints(tmp_path, ["step"], state.improves(1.0), tr, state, config, {})
    real_link = sdxl.checkpoint._link

    def disk_full_for_the_lowest(src, dst):  # (a copy where the filesystem has no hard links)
        if "lowest" in Path(dst).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(sdxl.checkpoint, "_link", disk_full_for_the_lowest)
    state.step = 2
    with pytest.raises(UserError, match="no space left on"):
        save_checkpoints(tmp_path, ["step"], state.improves(0.5), tr, state, config, {})
    lowest = list(tmp_path.glob("*_lowest_loss.pt"))
    assert [p.name for p in lowest] == ["lora_step000001_lowest_loss.pt"]
    assert load_checkpoint(lowest[0])["step"] == 1 and not list(tmp_path.glob(".*.tmp"))
    # The lowest-loss checkpoint is the step's own files under a second name, not a second copy.
    step1 = next(tmp_path.glob("lora_step000001_2*.pt"))
    for suffix in (".pt", ".safetensors"):
        assert os.path.samefile(step1.with_suffix(suffix), lowest[0].with_suffix(suffix))


# -- 3: two runs into one folder at once --------------------------------------------------------


def test_03_one_run_at_a_time_with_a_lock_and_stale_locks_replaced(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = os.getppid()  # a process that is running (the one that started the tests)
    (out / ".lock").write_text(f"{socket.gethostname()} {live}\n")
    with pytest.raises(UserError, match=rf"in use by another run \(process {live}\)"):
        train(tiny_model, out, "--use_lora", "--max_train_steps", "1")
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (out / ".lock").write_text(f"{socket.gethostname()} {ended.pid}\n")  # left by a kill -9
    train(tiny_model, out, "--use_lora", "--max_train_steps", "1")
    assert (out / "config.json").is_file() and not (out / ".lock").exists()  # released at the end


def test_03_two_writers_never_share_a_temporary_name(tmp_path):
    target = tmp_path / "f.txt"
    with atomic_write(target) as a, atomic_write(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    # b finished first, then a: the last writer to finish wins, and each file was whole.
    assert target.read_text() == "a" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# -- 4, 5, 6: pixels: high bit depth, EXIF orientation, truncated files -------------------------


def test_04_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    (tmp_path / "deep.txt").write_text("a gradient")
    pixels = np.asarray(load_image(scan(tmp_path)[0])).astype(float)
    assert pixels.shape == (32, 64, 3)
    # Measured: 0 .. 255 across, mean 127.5 (it was 254 with 99.6% of the pixels white).
    assert pixels[:, 0].max() == 0 and pixels[:, -1].min() == 255
    assert abs(pixels.mean() - 127.5) < 1


def test_05_exif_orientation_is_applied_to_pixels_sizes_buckets_and_time_ids(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # the stored image's left half is red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "phone.txt").write_text("a phone photo")
    record = scan(tmp_path)[0]
    assert record.size == (20, 40)  # upright: portrait
    upright = np.asarray(load_image(record)).astype(float)
    assert upright.shape == (40, 20, 3)
    assert upright[:18, :, 0].mean() > 200 and upright[22:, :, 0].mean() < 50  # red on top
    width, height = assign_buckets([record], 128)[0]
    assert width < height
    _, time_ids, _, _, _ = TrainingData([record], 16, rules=SampleRules(center_crop=True))[(0, 0)]
    assert time_ids[:2].tolist() == [40, 20]  # original (height, width) as seen


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) * 6 // 10]


def test_06_a_truncated_jpeg_is_skipped_mid_run_not_fatal(tiny_model, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    (data / "zz_cut.jpg").write_bytes(truncated_jpeg())
    (data / "zz_cut.txt").write_text("a cut photo")
    assert len(scan(data)) == 9  # Image.verify() does not decode a JPEG: the scan keeps it
    argv = train_argv(tiny_model, tmp_path / "out", "--use_lora", "--batch_size", "3")
    argv[argv.index("--data_dir") + 1] = str(data)
    last = train_sdxl.main(train_sdxl.parse_args([*argv, "--num_epochs", "2"]))
    assert load_checkpoint(last)["step"] == 6  # 9 images, batch 3: two whole epochs
    skipped = [r.getMessage() for r in caplog.records if "zz_cut.jpg" in r.getMessage()]
    assert len(skipped) == 1 and "the next image takes its place" in skipped[0]


# -- 7: damaged WebDataset shards ---------------------------------------------------------------


def write_shard(path: Path, n: int, start: int = 0) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            for ext, data in (("png", png_bytes(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return tar.getmembers()


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (i * 30 % 256, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_07_damaged_shards_are_named_skipped_in_part_and_counted(tmp_path, caplog, capsys):
    write_shard(tmp_path / "a_good.tar", 3)
    (tmp_path / "b_empty.tar").write_bytes(b"")
    (tmp_path / "c_garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    members = write_shard(tmp_path / "d_cut_in_a_member.tar", 3, start=10)
    with open(tmp_path / "d_cut_in_a_member.tar", "r+b") as f:  # cut inside sample 11's image
        f.truncate(members[2].offset_data + members[2].size // 2)
    members = write_shard(tmp_path / "e_cut_between.tar", 3, start=20)
    with open(tmp_path / "e_cut_between.tar", "r+b") as f:  # cut where sample 22 begins
        f.truncate(members[4].offset)
    with caplog.at_level("WARNING"):
        records = scan(tmp_path)
    keys = sorted(r.key for r in records)
    assert keys == [
        "a_good.tar/000000",
        "a_good.tar/000001",
        "a_good.tar/000002",
        "d_cut_in_a_member.tar/000010",
        "e_cut_between.tar/000020",
        "e_cut_between.tar/000021",
    ]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("b_empty.tar", "c_garbage.tar", "d_cut_in_a_member.tar", "e_cut_between.tar"):
        assert name in messages
    assert "no end-of-archive marker" in messages
    summary = capsys.readouterr().out
    assert (
        "6 image-caption pairs" in summary
        and "4 damaged shards, at least 1 samples lost" in summary
    )
    # A good shard's samples are read back exactly (pixels and caption).
    data = TrainingData(records, 24, rules=SampleRules(center_crop=True))
    pixels, _, caption, _, _ = data[(keys.index("e_cut_between.tar/000021"), 0)]
    assert caption == "caption 21" and pixels[0].mean() > -1


# -- 8: a resume started from another directory ------------------------------------------------


def test_08_config_has_absolute_paths_and_resume_works_from_anywhere(
    tiny_model, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    shutil.copytree(EXAMPLES, work / "data")
    monkeypatch.chdir(work)
    argv = ["--data_dir", "data", "--output_dir", "out", "--pretrained_model", str(tiny_model)]
    argv += ["--image_size", "32", "--precision", "fp32", "--use_lora", "--max_train_steps", "1"]
    train_sdxl.main(train_sdxl.parse_args(argv))
    config = json.loads((work / "out" / "config.json").read_text())
    assert config["data_dir"] == str(work / "data") and config["output_dir"] == str(work / "out")
    monkeypatch.chdir(tmp_path)
    resume_training.main(resume_training.parse_args(["--auto", str(work / "out")]))
    command = capsys.readouterr().out
    assert f"--data_dir={work / 'data'} " in command and f"--output_dir={work / 'out'} " in command


# -- 9, 10, 11: flags -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (
            ["--gradient_accumulation_steps", "0"],
            "--gradient_accumulation_steps must be at least 1",
        ),
        (["--image_size", "0"], "--image_size: '0': width and height must be positive multiples"),
        (["--image_size", "30"], "--image_size: '30': width and height must be positive multiples"),
        (["--bucket", "--image_size", "32"], "--bucket needs --image_size 64 or more"),
        (["--learning_rate=-1e-4"], "--learning_rate must be positive"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--noise_offset", "nan"], "--noise_offset must be 0 or more, got nan"),
        (["--num_epochs", "0"], "--num_epochs must be at least 1"),  # 10
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),  # 10
        (["--output_dir", "FILE"], "is a file, not a folder"),  # 11
        (["--output_dir", "FILE/sub"], "which is a file; give a folder"),  # 11
    ],
)
def test_09_10_11_bad_flags_are_one_line_errors_before_anything(
    tiny_model, tmp_path, extra, message
):
    (tmp_path / "f").write_text("a file")
    extra = [e.replace("FILE", str(tmp_path / "f")) for e in extra]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, out, "--use_lora", *extra)))
    assert not out.exists()  # nothing written


def test_09_bad_flags_on_the_command_line_answer_before_the_heavy_imports(tmp_path):
    """The scripts check their flags before importing torch: one line, exit 2, no output folder,
    and torch never imported (python -X importtime lists every import)."""
    out = tmp_path / "out"
    for script, argv, message in (
        ("train_sdxl.py", ["--data_dir", str(EXAMPLES), "--batch_size", "0"], "--batch_size"),
        ("generate_images.py", ["--prompt", "x", "--batch-size", "0"], "--batch-size must be"),
    ):
        res = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                script,
                *argv,
                "--output_dir" if script.startswith("train") else "--output-dir",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        errors = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
        assert (
            res.returncode == 2 and errors == [f"error: {errors[0][7:]}"] and message in errors[0]
        )
        assert not any(line.rstrip().endswith("| torch") for line in res.stderr.splitlines())
        assert not out.exists()


# -- 12: a full disk and a read-only folder ----------------------------------------------------


def test_12_a_full_disk_says_so_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    with atomic_write(path) as tmp:
        torch.save({"step": 1}, tmp)

    def torch_save_on_a_full_disk(obj, f):
        Path(f).write_bytes(b"partial")
        # What torch.save raises when the disk fills: no errno, no word of space.
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(UserError, match=f"no space left on {tmp_path}"):
        with atomic_write(path) as tmp:
            torch.save({"step": 2}, tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous one is kept


def test_12_a_read_only_folder_names_the_folder(tmp_path, monkeypatch):
    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", mkstemp)
    with pytest.raises(UserError, match=f"cannot write into {tmp_path}: permission denied"):
        with atomic_write(tmp_path / "x.json"):
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs), where the machine lets the tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_12_a_really_full_disk_stops_the_run_with_one_line(tiny_model, small_disk):
    out = small_disk / "out"  # a checkpoint is about 2 MiB: the disk fills within a few saves
    with pytest.raises(UserError, match=f"no space left on {out}"):
        train(tiny_model, out, "--use_lora", "--save_interval", "1", "--max_train_steps", "20")
    assert not list(out.glob(".*.tmp"))  # the partial file is gone
    kept = sorted(out.glob("*.pt"))
    assert kept and all(load_checkpoint(p)["step"] >= 1 for p in kept)  # each one whole
    for path in out.glob("*.safetensors"):
        read_safetensors_header(path)  # and each LoRA file beside them
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(UserError, match="permission denied"):
        train(tiny_model, small_disk / "out", "--use_lora", "--max_train_steps", "1", "--overwrite")


# -- 13: captions that are not UTF-8 ------------------------------------------------------------


def test_13_captions_utf8_with_a_bom_and_latin1_with_a_warning(tmp_path, caplog):
    pairs(tmp_path, 2)
    (tmp_path / "000.txt").write_bytes("\ufeffcafé au lait".encode())
    (tmp_path / "001.txt").write_bytes("crème brûlée".encode("latin-1"))
    with caplog.at_level("WARNING"):
        records = scan(tmp_path)
    assert [r.caption for r in records] == ["café au lait", "crème brûlée"]
    assert any("001.txt is not UTF-8" in r.getMessage() for r in caplog.records)


# -- 14, 15: files that are not what they claim -----------------------------------------------


def test_14_a_text_file_as_lora_is_one_line_error(tiny_model, tmp_path):
    with pytest.raises(UserError, match="README.md: not a readable safetensors file"):
        gen(
            tiny_model,
            tmp_path / "g",
            "--prompt",
            "x",
            "--lora-checkpoint",
            str(ROOT / "README.md"),
        )


def test_15_extract_never_overwrites_a_foreign_file_or_leaves_a_stray_tmp(tiny_model, tmp_path):
    out = tmp_path / "run"
    last = train(tiny_model, out, "--use_lora", "--max_train_steps", "1")
    extract = lambda *extra: extract_lora_weights.main(  # noqa: E731
        extract_lora_weights.build_parser().parse_args([str(last), *extra])
    )
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="is not a file this script wrote"):
        extract("--output", str(notes))
    assert notes.read_text() == "my notes"
    with pytest.raises(UserError, match="is a folder"):
        extract("--output", str(tmp_path))
    assert not list(tmp_path.glob(".*.tmp"))
    assert extract("--output", str(notes), "--overwrite") == notes
    assert extract() == extract()  # an earlier export of ours is replaced


# -- 16: stale temporary files ----------------------------------------------------------------


def test_16_stale_temporary_files_are_reported_then_removed(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    last = train(tiny_model, out, "--use_lora", "--max_train_steps", "1")
    stale = out / ".lora_step000002_x.pt.k3j5.tmp"  # a kill -9 in the middle of a save
    stale.write_bytes(b"half a checkpoint")
    resume_training.main(resume_training.parse_args(["--list", str(out)]))
    assert "1 temporary files left by an interrupted write" in capsys.readouterr().err
    train(tiny_model, out, "--use_lora", "--max_train_steps", "2", "--resume", str(last))
    assert not stale.exists() and "removed 1 temporary files" in capsys.readouterr().out


# -- 17: a signal stops the run with the shell's exit code ------------------------------------


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_17_stopped_by_a_signal_exits_128_plus_the_signal(signum, code, monkeypatch, capsys):
    def stopped(args):
        raise StoppedBySignal(signum, "stopped by a signal at step 5; saved x.pt")

    monkeypatch.setattr(sys, "argv", ["train_sdxl.py"])
    with pytest.raises(SystemExit) as info:
        run_cli(stopped, train_sdxl.argparse.ArgumentParser())
    assert info.value.code == code and "saved x.pt" in capsys.readouterr().err


# -- 19, 20 ----------------------------------------------------------------------------------


def test_19_prompt_files_take_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red circle\n\n  # an indented comment\na blue square\n")
    assert read_prompt_file(path) == ["a red circle", "a blue square"]
    path.write_text("# only a comment\n")
    with pytest.raises(UserError, match="has no prompts"):
        read_prompt_file(path)


def test_20_exported_files_honour_the_umask(tiny_model, tmp_path):
    last = train(tiny_model, tmp_path / "run", "--use_lora", "--max_train_steps", "1")
    old = os.umask(0o022)
    try:
        path = extract_lora_weights.main(
            extract_lora_weights.build_parser().parse_args([str(last), "--format", "kohya"])
        )
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # ComfyUI running as another user can read it
    assert last.stat().st_mode & 0o777 == 0o666 & ~old


# -- 22: the start-up scan keeps an index and runs in parallel ---------------------------------


def test_22_the_scan_index_rescans_only_changed_files(tmp_path, monkeypatch):
    data, index = pairs(tmp_path / "data", 70), tmp_path / "index"
    parallel = scan(data, index, workers=2)  # 70 files: two worker processes
    assert len(parallel) == 70 and list(index.glob("*.json"))
    import training.scan

    scanned: list[str] = []
    real = training.scan._scan_image
    monkeypatch.setattr(
        training.scan, "_scan_image", lambda p, **kw: scanned.append(p.name) or real(p, **kw)
    )
    assert scan(data, index, workers=1) == parallel and scanned == []  # unchanged: the index only
    Image.new("RGB", (80, 40)).save(data / "003.png")  # a new image under an old name
    (data / "005.txt").write_text("a new caption")
    records = {r.key: r for r in scan(data, index, workers=1)}
    assert sorted(scanned) == ["003.png", "005.png"]
    assert records["003.png"].size == (80, 40) and records["005.png"].caption == "a new caption"
    (index / next(index.iterdir()).name).write_text("{not json")  # a broken index is rebuilt
    assert len(scan(data, index, workers=1)) == 70
