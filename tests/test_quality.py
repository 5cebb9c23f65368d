"""What a generated dataset is worth (evaluate_dataset.py, sampling/quality.py) and the index files
that dataset tools read (sampling/outputs.py: write_index)."""

import json
import tarfile

import generate_images


def gen(tiny_model, out, *extra):
    argv = ["--pretrained-model", str(tiny_model), "--output-dir", str(out), "--image-size", "64"]
    return generate_images.main(generate_images.parse_args([*argv, "--steps", "1", *extra]))


# -- the index files ----------------------------------------------------------------------------


def test_each_shard_has_a_parquet_index_that_follows_resumes_and_extensions(tiny_model, tmp_path):
    import pyarrow.parquet as pq

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "a red circle", "num_images": 3, "label": "circle"}) + "\n"
        + json.dumps({"prompt": "a blue square", "seed": 100, "group": 2}) + "\n"
    )  # fmt: skip
    out = tmp_path / "shards"
    flags = ["--prompt-file", str(rows), "--output-format", "webdataset", "--shard-size", "2"]

    def check(count):
        tars = sorted(out.glob("shard-*.tar"))
        assert len(tars) == (count + 1) // 2
        for tar_path in tars:
            table = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
            with tarfile.open(tar_path) as tar:
                metas = {
                    m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
                    for m in tar.getmembers()
                    if m.name.endswith(".json")
                }
                names = tar.getnames()
            assert [row["key"] for row in table] == sorted(metas)  # one row per sample
            for row in table:
                meta = metas[row["key"]]
                assert row["file_name"] == f"{row['key']}.png" and row["file_name"] in names
                assert (row["caption"], row["seed"]) == (meta["prompt"], meta["seed"])
                assert (row["width"], row["height"]) == (64, 64)
                assert row.get("label") == meta.get("label") and row.get("group") == meta.get(
                    "group"
                )

    gen(tiny_model, out, *flags)
    check(4)
    # killed while shard 1 was written: it is rebuilt, and so is its index
    (out / "shard-000001.tar").unlink()
    gen(tiny_model, out, *flags)
    check(4)
    # extended to 6 images: a new shard, with its index
    gen(tiny_model, out, *flags, "--num-images", "6")
    check(6)


def test_a_generated_folder_loads_as_a_hugging_face_imagefolder(tiny_model, tmp_path):
    from datasets import load_dataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green triangle\n")
    out = tmp_path / "gen"
    gen(tiny_model, out, "--prompt-file", str(prompts), "--images-per-prompt", "2")
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"{i:05d}.png" for i in range(4)]
    data = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(data) == 4
    got = sorted((row["caption"], row["seed"], row["image"].size) for row in data)
    assert got == sorted(
        (p, s, (64, 64)) for p, s in zip(["a red circle"] * 2 + ["a green triangle"] * 2, range(4))
    )
    # extended: the index covers the new images too
    gen(
        tiny_model,
        out,
        "--prompt-file",
        str(prompts),
        "--images-per-prompt",
        "2",
        "--num-images",
        "6",
    )
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 6
