"""Training data as the tools write it: the same records in LLaVA's JSON, LLaMA-Factory's sharegpt
(both tag styles) and alpaca, and ms-swift's JSONL read as many's own JSONL does, give the same
statistics; no media a record names is ever dropped; images are read as they are stored (16-bit,
EXIF orientation)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, stats_covariances
from PIL import Image

from many_cli.data import BadRecord, Record, load_image
from many_cli.errors import InputError
from many_cli.formats import read_records

SAMPLE = Path(__file__).parent.parent / "sample_adapters"
CALIBRATION = SAMPLE / "data" / "1_colour" / "calibration.jsonl"


def own_records(count: int = 6) -> list[dict]:
    rows = [json.loads(line) for line in CALIBRATION.read_text().splitlines()[:count]]
    return [{**row, "image": str(CALIBRATION.parent / row["image"])} for row in rows]


def in_format(name: str, row: dict) -> dict:
    """One many record as each tool writes it (their documented examples' fields)."""
    image, prompt, answer = row["image"], row["prompt"], row["answer"]
    return {
        "llava": {
            "id": "0",
            "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}],
        },
        "sharegpt": {
            "conversations": [{"from": "human", "value": f"<image>{prompt}"}, {"from": "gpt", "value": answer}],
            "images": [image],
        },
        "sharegpt-messages": {
            "messages": [{"role": "user", "content": f"<image>{prompt}"}, {"role": "assistant", "content": answer}],
            "images": [image],
        },
        "alpaca": {"instruction": prompt, "input": "", "output": answer, "images": [image]},
        "swift": {
            "messages": [{"role": "user", "content": f"<image>{prompt}"}, {"role": "assistant", "content": answer}],
            "images": [{"path": image}],
        },
    }[name]


FORMATS = {"llava": ".json", "sharegpt": ".json", "sharegpt-messages": ".json", "alpaca": ".json", "swift": ".jsonl"}


def write(path: Path, entries: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    else:
        path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_reads_as_the_same_records(name, tmp_path):
    rows = own_records()
    path = write(tmp_path / f"{name}{FORMATS[name]}", [in_format(name, row) for row in rows])
    records = list(read_records(path))
    assert not [record for record in records if isinstance(record, BadRecord)], records
    read = [(r.images, r.prompt.replace("<image>", "").strip(), r.answer, r.history) for r in records]
    assert read == [((Path(row["image"]),), row["prompt"], row["answer"], ()) for row in rows]


def test_sharegpt_statistics_equal_many_jsonl_statistics(tmp_path, capsys):
    import shutil

    rows = own_records()
    own = write(tmp_path / "own.jsonl", rows)
    sharegpt = write(tmp_path / "sharegpt.json", [in_format("sharegpt", row) for row in rows])
    results = []
    for data in (own, sharegpt):
        adapter = shutil.copytree(SAMPLE / "adapters" / "1_colour", tmp_path / data.stem)
        code, err = run_cli(capsys, "stats", "--model", SAMPLE / "base", "--adapter", adapter, "--data", data)
        assert code == 0, err
        results.append(stats_covariances(adapter / "many_stats.safetensors"))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "entry, fault",
    [
        (
            {
                "conversations": [{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}],
                "images": ["x.png", "y.png"],
            },
            "has 1 <image> tags for 2 images",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}]},
            "has 1 <image> tags for 0 images",
        ),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}]}, "has the turns"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "has the turns"),
        ({"question": "a"}, "of no shape"),
        ({"question": "a", "image": "x.png"}, "lacks the string field(s) prompt"),
        ({"prompt": "a", "videos": "v.mp4"}, "field videos is not a list"),
        ({"prompt": "a", "videos": ["v.mp4", "w.mp4"]}, "names 2 videos"),
        ({"prompt": "<video> a"}, "holds <video> but the record names no video"),
    ],
)
def test_what_cannot_be_read_is_refused_naming_the_record(entry, fault, tmp_path, capsys):
    data = write(tmp_path / "data.json", [entry])
    [record] = list(read_records(data))
    assert isinstance(record, BadRecord) and fault in record.fault and record.source == f"{data}[0]"
    code, err = stats_on_sample(capsys, data, tmp_path / "stats.safetensors")
    assert code == 2 and str(data) in err and fault in err and err.count("\n") == 1, err


def test_data_without_any_media_is_refused_for_a_multimodal_model(tmp_path, capsys):
    text = write(tmp_path / "text.jsonl", [{"prompt": row["prompt"], "answer": row["answer"]} for row in own_records()])
    args = [
        "stats",
        "--model",
        SAMPLE / "base",
        "--adapter",
        SAMPLE / "adapters" / "1_colour",
        "--data",
        text,
        "--out",
        tmp_path / "stats.safetensors",
    ]
    code, err = run_cli(capsys, *args)
    assert code == 2 and str(text) in err and "--text-only" in err and err.count("\n") == 1, err
    assert not (tmp_path / "stats.safetensors").exists()
    assert run_cli(capsys, *args, "--text-only")[0] == 0


def test_a_conversation_of_several_turns_and_images_against_a_brute_force_forward(tmp_path, capsys):
    """Stats over LLaMA-Factory sharegpt records of two images and two exchanges equal Σ x xᵀ of
    every adapted layer's input in base + adapter, fed the whole conversation as the chat
    template writes it (built here by hand) with both images, one record at a time; each image is
    one exemplar."""
    import shutil

    from helpers import input_sums, load_base
    from peft import PeftModel
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor

    rows = own_records(6)
    entries = []
    for first, second in zip(rows[0::2], rows[1::2]):
        entries.append(
            {
                "messages": [
                    {"role": "user", "content": f"<image>{first['prompt']}"},
                    {"role": "assistant", "content": first["answer"]},
                    {"role": "user", "content": f"and here ? <image> {second['prompt']}"},
                    {"role": "assistant", "content": second["answer"]},
                ],
                "images": [first["image"], second["image"]],
            }
        )
    data = write(tmp_path / "conversations.json", entries)
    adapter = shutil.copytree(SAMPLE / "adapters" / "1_colour", tmp_path / "adapter")
    code, err = run_cli(
        capsys, "stats", "--model", SAMPLE / "base", "--adapter", adapter, "--data", data, "--batch-size", 2
    )
    assert code == 0 and "3 records" in err and "6 images" in err, err

    processor = AutoProcessor.from_pretrained(SAMPLE / "base")
    model = PeftModel.from_pretrained(load_base(SAMPLE / "base"), adapter).eval()

    def run():
        for entry in entries:
            turns = entry["messages"]
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0]["content"][7:]}]},
                {"role": "assistant", "content": [{"type": "text", "text": turns[1]["content"]}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "and here ?"},
                        {"type": "image"},
                        {"type": "text", "text": turns[2]["content"].split("<image> ")[1]},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": turns[3]["content"]}]},
            ]
            text = processor.apply_chat_template(conversation, tokenize=False)
            images = [Image.open(path).convert("RGB") for path in entry["images"]]
            model(**processor(text=[text], images=[images], return_tensors="pt"))

    expected = input_sums(model, run)
    got = stats_covariances(adapter / "many_stats.safetensors")
    assert len(expected) == 14 and set(expected) <= set(got)
    for name, covariance in expected.items():
        mine = got[name]
        assert torch.linalg.norm(mine - covariance) <= 1e-5 * torch.linalg.norm(covariance), name
    with safe_open(str(adapter / "many_stats.safetensors"), "pt") as handle:
        assert handle.get_tensor("exemplars").shape[0] == 6


def test_infer_routes_each_image_of_a_record_and_answers_its_last_turn(tmp_path, capsys):
    """A record with a colour image and a count image: two routing decisions, each what the image
    gets alone; the answer is scored against the last assistant turn."""
    import shutil

    adapters = []
    for task in ("1_colour", "2_count"):
        adapters.append(shutil.copytree(SAMPLE / "adapters" / task, tmp_path / task))
        code, err = run_cli(
            capsys,
            "stats",
            "--model",
            SAMPLE / "base",
            "--adapter",
            adapters[-1],
            "--data",
            SAMPLE / "data" / task / "calibration.jsonl",
        )
        assert code == 0, err
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    evaluation = [SAMPLE / "data" / task / "evaluation.jsonl" for task in ("1_colour", "2_count")]
    colour, count = (
        [
            {**row, "image": str(path.parent / row["image"])}
            for row in map(json.loads, path.read_text().splitlines()[:2])
        ]
        for path in evaluation
    )
    pairs = write(
        tmp_path / "pairs.json",
        [
            {
                "messages": [
                    {"role": "user", "content": f"<image>{a['prompt']}"},
                    {"role": "assistant", "content": a["answer"]},
                    {"role": "user", "content": f"<image>{b['prompt']}"},
                    {"role": "assistant", "content": b["answer"]},
                ],
                "images": [a["image"], b["image"]],
            }
            for a, b in zip(colour, count)
        ],
    )
    alone = write(tmp_path / "alone.jsonl", [row for pair in zip(colour, count) for row in pair])
    infer = ["infer", "--model", SAMPLE / "base", "--merged", merged, "--max-new-tokens", 2]
    assert run_cli(capsys, *infer, "--data", pairs, "--out", tmp_path / "pairs.out")[0] == 0
    assert run_cli(capsys, *infer, "--data", alone, "--out", tmp_path / "alone.out")[0] == 0
    paired = [json.loads(line) for line in (tmp_path / "pairs.out").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "alone.out").read_text().splitlines()]
    assert len(paired) == 2 and all(len(row["routing"]) == 2 and len(row["images"]) == 2 for row in paired)
    for index, row in enumerate(paired):
        for image in range(2):
            expected = single[2 * index + image]["routing"]
            assert row["routing"][image].keys() == expected.keys()
            assert all(abs(row["routing"][image][task] - expected[task]) < 1e-6 for task in expected)
        assert row["answer"] == count[index]["answer"] and row["prompt"].endswith(count[index]["prompt"])
    assert [max(routing, key=routing.get) for row in paired for routing in row["routing"]] == [
        "1_colour",
        "2_count",
    ] * 2


def stats_on_sample(capsys, data: Path, out: Path, *options) -> tuple[int, str]:
    """`many stats` of the sample's first task over `data` with `options`: (exit status, stderr)."""
    return run_cli(
        capsys,
        "stats",
        "--model",
        SAMPLE / "base",
        "--adapter",
        SAMPLE / "adapters" / "1_colour",
        "--data",
        data,
        *options,
        "--out",
        out,
    )


def records_of(data, **reading) -> list[tuple]:
    from many_cli.formats import Reading

    read = list(read_records(Path(data), Reading(**reading)))
    assert not [record for record in read if isinstance(record, BadRecord)], read
    return [
        (
            tuple(str(image) if not hasattr(image, "image") else image.image.tobytes() for image in record.images),
            record.prompt.replace("<image>", "").strip(),
            record.answer,
            record.task,
        )
        for record in read
    ]


def expected_rows(rows, task, image=lambda row: row["image"]) -> list[tuple]:
    return [((image(row),), row["prompt"], row["answer"], task) for row in rows]


def test_llava_json_with_an_image_folder_and_internvl_meta(tmp_path):
    rows = own_records()
    relative = [{**row, "image": Path(row["image"]).name} for row in rows]
    llava = write(tmp_path / "llava.json", [in_format("llava", row) for row in relative])
    assert records_of(llava, media_dir=CALIBRATION.parent / "calibration") == expected_rows(
        rows, "llava", lambda row: str(CALIBRATION.parent / "calibration" / Path(row["image"]).name)
    )

    (tmp_path / "anno").mkdir()
    write(tmp_path / "anno" / "colour.jsonl", [in_format("llava", row) for row in relative])
    meta = write(
        tmp_path / "meta.json",
        {
            "colour": {
                "root": str(CALIBRATION.parent / "calibration"),
                "annotation": "anno/colour.jsonl",
                "repeat_time": 1,
                "length": len(rows),
            }
        },
    )
    assert records_of(meta) == expected_rows(rows, "colour")


def test_llama_factory_dataset_info_entry_with_its_columns_and_tags(tmp_path):
    rows = own_records()
    media = tmp_path / "media"
    media.mkdir()
    for row in rows:
        (media / Path(row["image"]).name).write_bytes(Path(row["image"]).read_bytes())
    (tmp_path / "data").mkdir()
    write(
        tmp_path / "data" / "mine.json",
        [
            {
                "dialogue": [
                    {"speaker": "me", "text": f"<image>{row['prompt']}"},
                    {"speaker": "bot", "text": row["answer"]},
                ],
                "pictures": [f"media/{Path(row['image']).name}"],
            }
            for row in rows
        ],
    )
    write(
        tmp_path / "data" / "alpaca.jsonl",
        [{"q": row["prompt"], "a": row["answer"], "images": [row["image"]]} for row in rows],
    )
    info = write(
        tmp_path / "dataset_info.json",
        {
            "mine": {
                "file_name": "data/mine.json",
                "formatting": "sharegpt",
                "columns": {"messages": "dialogue", "images": "pictures"},
                "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
            },
            "qa": {"file_name": "data/alpaca.jsonl", "columns": {"prompt": "q", "response": "a"}},
            "hub": {"hf_hub_url": "someone/something"},
        },
    )
    assert records_of(f"{info}:mine") == expected_rows(rows, "mine", lambda row: str(media / Path(row["image"]).name))
    assert records_of(f"{info}:qa") == expected_rows(rows, "qa")
    with pytest.raises(InputError, match="no local file_name"):
        list(read_records(Path(f"{info}:hub")))
    with pytest.raises(InputError, match="has no dataset 'nope'"):
        list(read_records(Path(f"{info}:nope")))
    with pytest.raises(
        InputError, match=r"give one as --data .*dataset_info.json:NAME \(its datasets: hub, mine, qa\)"
    ):
        list(read_records(info))


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "arrow", "json"])
def test_hugging_face_datasets_with_image_columns(kind, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rows = own_records()
    pixels = {row["image"]: Image.open(row["image"]).convert("RGB") for row in rows}
    table = {
        "prompt": [row["prompt"] for row in rows],
        "answer": [row["answer"] for row in rows],
        "image": [row["image"] for row in rows],
    }
    features = datasets.Features(
        {"prompt": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image()}
    )
    dataset = datasets.Dataset.from_dict(table, features=features)  # images stored as bytes, decoded to PIL
    path = {
        "save_to_disk": tmp_path / "colour",
        "parquet": tmp_path / "colour.parquet",
        "arrow": tmp_path / "colour",
        "json": tmp_path / "colour.jsonl",
    }[kind]
    if kind == "save_to_disk":
        dataset.save_to_disk(str(path))
    elif kind == "parquet":
        dataset.to_parquet(str(path))
    elif kind == "arrow":
        dataset.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    else:  # a JSON image column of paths, read by datasets when forced
        datasets.Dataset.from_dict(table).to_json(str(path))
    read = records_of(path, **({"format": "hf"} if kind == "json" else {}))
    if kind == "json":
        assert read == expected_rows(rows, "colour")
    else:  # the images as many opens them (bytes embedded, or a path parquet kept), pixel for pixel
        opened = [
            (tuple(load_image(record.source, image).tobytes() for image in record.images), record.prompt, record.answer)
            for record in read_records(path)
        ]
        assert opened == [((pixels[row["image"]].tobytes(),), row["prompt"], row["answer"]) for row in rows]


def test_ambiguous_records_need_format_and_the_format_is_checked(tmp_path, capsys):
    row = own_records(1)[0]
    both = write(tmp_path / "both.jsonl", [{**row, "messages": [{"role": "user", "content": "x"}]}])
    [record] = list(read_records(both))
    assert isinstance(record, BadRecord) and "ambiguous" in record.fault and "--format" in record.fault
    assert records_of(both, format="many") == expected_rows([row], row["task"])
    alpaca = write(tmp_path / "alpaca.json", [in_format("alpaca", row)])
    [record] = list(read_records(alpaca, __import__("many_cli.formats").formats.Reading(format="sharegpt")))
    assert isinstance(record, BadRecord) and "lacks a list of turns" in record.fault
    code, err = stats_on_sample(capsys, alpaca, tmp_path / "s.safetensors", "--format", "nope")
    assert code == 2 and "'--format'" in err and "'nope'" in err and err.count("\n") == 1


def test_a_dataset_without_the_datasets_package_gets_a_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    (tmp_path / "colour.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"needs the datasets package: pip install 'many-cli\[datasets\]'"):
        list(read_records(tmp_path / "colour.parquet"))


def test_a_16_bit_grey_image_reads_as_its_8_bit_values(tmp_path):
    values = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values * 257).save(path)  # 16-bit PNG: v·257 is v at 8 bits
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    pixels = np.asarray(load_image("grey16", path))
    assert pixels.shape == (16, 16, 3) and (pixels == values[..., None]).all()


def test_an_image_is_read_upright_as_its_exif_orientation_says(tmp_path):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "sideways.png"
    Image.fromarray(pixels).save(path, exif=exif)
    upright = np.asarray(load_image("sideways", path))
    assert (upright == np.rot90(pixels, k=-1)).all()


def test_every_field_that_changes_what_is_read_is_honoured_or_refused(tmp_path):
    rows = own_records()
    relative = [{**row, "image": Path(row["image"]).name} for row in rows]
    write(tmp_path / "colour.jsonl", [in_format("llava", row) for row in relative])
    root = str(CALIBRATION.parent / "calibration")

    def meta(**fields) -> Path:
        return write(tmp_path / "meta.json", {"colour": {"root": root, "annotation": "colour.jsonl", **fields}})

    # InternVL trains on each record repeat_time times: read it that many times, in order.
    assert records_of(meta(repeat_time=2)) == expected_rows(rows, "colour") * 2
    for repeat, fault in ((0.5, "random share"), (1.5, "random share"), (0, "not a positive number"), ("2", "not a")):
        with pytest.raises(InputError, match=rf"dataset 'colour': repeat_time .*{fault}"):
            list(read_records(meta(repeat_time=repeat)))

    write(tmp_path / "train.json", [in_format("sharegpt", row) for row in rows])
    for fields, fault in (
        ({"num_samples": 2}, "num_samples makes LLaMA-Factory train on a random sample"),
        ({"ranking": True}, "ranking marks preference pairs"),
        ({"formatting": "openai"}, "formatting is 'openai'"),
    ):
        info = write(
            tmp_path / "dataset_info.json", {"d": {"file_name": "train.json", "formatting": "sharegpt", **fields}}
        )
        with pytest.raises(InputError, match=rf"^{info}: dataset 'd': {fault}"):
            list(read_records(Path(f"{info}:d")))


def test_a_file_a_dataset_info_entry_names_is_faulted_through_that_entry(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "broken.json").write_text("{not json")
    (tmp_path / "data").mkdir()
    info = write(tmp_path / "data" / "dataset_info.json", {"d": {"file_name": "../elsewhere/broken.json"}})
    with pytest.raises(InputError) as raised:
        list(read_records(Path(f"{info}:d")))
    assert str(raised.value).startswith(
        f"{info}: dataset 'd': its file_name {info.parent / '../elsewhere/broken.json'}: not valid JSON"
    )
    (tmp_path / "elsewhere" / "broken.jsonl").write_text(
        '{"conversations": [{"from": "human", "value": "hi"}]}\n{oops\n'
    )
    write(info, {"d": {"file_name": "../elsewhere/broken.jsonl", "formatting": "sharegpt"}})
    read = list(read_records(Path(f"{info}:d")))
    assert isinstance(read[0], Record) and isinstance(read[1], BadRecord) and read[1].fault.startswith("not JSON")


def test_a_dataset_image_that_is_not_an_image_names_its_record(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    image = Path(own_records()[0]["image"])
    features = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image()})
    table = {
        "prompt": ["a", "b"],
        "image": [{"bytes": image.read_bytes(), "path": None}, {"bytes": b"not a png", "path": None}],
    }
    path = tmp_path / "colour.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    read = list(read_records(path))
    assert isinstance(read[0], Record) and isinstance(read[1], BadRecord)
    fault = "its image[0] holds bytes that are not a readable image (not an image format Pillow knows)"
    assert read[1].source == f"{path}[1]" and read[1].fault == fault
    code, err = stats_on_sample(capsys, path, tmp_path / "s.safetensors")
    assert code == 2 and err.startswith(f"many: error: {path}[1]: ") and err.count("\n") == 1, err
    assert "Generating" not in err and "%|" not in err  # no progress bar of the datasets library


def test_images_as_base64_or_data_uris_read_as_their_files_and_urls_are_refused(tmp_path):
    import base64

    rows = own_records(3)
    encoded = [base64.b64encode(Path(row["image"]).read_bytes()).decode() for row in rows]
    as_file = [{**in_format("swift", row)} for row in rows]
    inline = [
        {**entry, "images": [text if index % 2 else f"data:image/png;base64,{text}"]}
        for index, (entry, text) in enumerate(zip(as_file, encoded))
    ]
    files = list(read_records(write(tmp_path / "files.jsonl", as_file)))
    inlined = list(read_records(write(tmp_path / "inline.jsonl", inline)))
    assert [load_image(r.source, r.image).tobytes() for r in inlined] == [
        load_image(r.source, r.image).tobytes() for r in files
    ]
    assert [r.prompt for r in inlined] == [r.prompt for r in files]
    bad = [
        (
            "https://example.com/x.png",
            "its image[0] is the URL https://example.com/x.png: many fetches no remote media",
        ),
        ("data:image/png;base64,!!!!", "its image[0] is not valid base64"),
        ("data:image/png,rawbytes", "its image[0] is a data: URI that is not base64-encoded"),
        (base64.b64encode(b"not a png" * 40).decode(), "its image[0] holds bytes that are not a readable image"),
    ]
    for image, fault in bad:
        [record] = read_records(write(tmp_path / "bad.jsonl", [{**as_file[0], "images": [image]}]))
        assert isinstance(record, BadRecord) and record.fault.startswith(fault), record
    [record] = read_records(write(tmp_path / "bad.jsonl", [{"prompt": "hi", "video": "http://example.com/v.mp4"}]))
    assert isinstance(record, BadRecord) and "local files only" in record.fault


@contextmanager
def fails_within(seconds: int):
    """A test that would wait forever fails instead (SIGALRM interrupts a blocking open)."""

    def expired(*_):
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifos_and_devices_are_refused_without_waiting(tmp_path, capsys):
    """A FIFO with no writer waits forever in open(); a device never ends: both refused in one line
    wherever a file is read (the data file, a record's image, a folder's image, --image)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    data_fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(data_fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(own_records()[0]["image"], folder / "a.png")
    os.mkfifo(folder / "b.png")
    records = write(tmp_path / "fifo_image.jsonl", [{"image": str(fifo), "prompt": "colour?"}])
    device = write(tmp_path / "device_image.jsonl", [{"image": "/dev/zero", "prompt": "colour?"}])
    cases = [
        (data_fifo, f"{data_fifo}: is a FIFO (named pipe), not a regular file"),
        (records, f"{records}:1: image {fifo} is a FIFO (named pipe), not a regular file"),
        (device, f"{device}:1: image /dev/zero is a character device, not a regular file"),
        (folder, f"{folder / 'b.png'}: image {folder / 'b.png'} is a FIFO (named pipe)"),
    ]
    with fails_within(120):
        for data, line in cases:
            code, err = stats_on_sample(capsys, data, tmp_path / "stats.safetensors")
            assert code == 2 and line in err and err.count("\n") == 1, err
        infer = ["infer", "--model", SAMPLE / "base", "--adapter", SAMPLE / "adapters" / "1_colour", "--image", fifo]
        code, err = run_cli(capsys, *infer)
    assert code == 2 and f"{fifo}: is a FIFO (named pipe)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "stats.safetensors").exists()


def test_a_fifo_named_on_the_command_line_is_refused_by_every_command(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    adapter = tmp_path / "adapter"
    shutil.copytree(SAMPLE / "adapters" / "1_colour", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(adapter / "adapter_model.safetensors")
    cases = [
        (["report", fifo, "--out", tmp_path / "r"], fifo),
        (["merge", adapter, "--method", "average", "--out", tmp_path / "m"], adapter / "adapter_model.safetensors"),
    ]
    with fails_within(120):
        for args, named in cases:
            code, err = run_cli(capsys, *args)
            assert code == 2 and f"{named}: is a FIFO (named pipe)" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["adapter", "pipe.jsonl"]
