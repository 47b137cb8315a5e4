"""data.train / data.eval in the formats users have: JSONL, .jsonl.gz, .jsonl.zst, Parquet, a
directory or a glob of them, local or gs:// (the GCS emulator); the same samples from each,
stable keys, and bad input named by file and line (Parquet: row and row group)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from distill.config import load_job, splits
from distill.data.dataset import TokenizeStats, tokenize_file
from distill.data.records import count_records, iter_split, key_stem
from distill.errors import DistillError
from distill.sources import digest, list_files, open_split
from distill.store.storage import open_store
from distill.teacher.batching import tokenize_split

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "eval.jsonl"  # 98 lines, chat and instruction forms


def demo_rows() -> list[dict]:
    return [json.loads(x) for x in DEMO.read_text().splitlines()]


def write_parquet(path: Path, rows: list[dict], group: int = 30) -> Path:
    chat = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("messages", chat), ("prompt", pa.string()), ("response", pa.string())])
    cols = {k: [r.get(k) for r in rows] for k in ("messages", "prompt", "response")}
    pq.write_table(pa.table(cols, schema=schema), path, row_group_size=group)
    return path


def all_forms(tmp_path: Path) -> dict[str, Path]:
    raw = DEMO.read_bytes()
    out = {"jsonl": tmp_path / "plain" / "eval.jsonl"}
    out["jsonl"].parent.mkdir()
    out["jsonl"].write_bytes(raw)
    out["gz"] = tmp_path / "eval.jsonl.gz"
    out["gz"].write_bytes(gzip.compress(raw))
    out["zst"] = tmp_path / "eval.jsonl.zst"
    out["zst"].write_bytes(zstandard.ZstdCompressor().compress(raw))
    out["parquet"] = write_parquet(tmp_path / "eval.parquet", demo_rows())
    return out


def test_every_format_gives_the_same_samples_and_keys(smol_tokenizer, tmp_path):
    forms = all_forms(tmp_path)
    ref = tokenize_file(forms["jsonl"], smol_tokenizer, 128, "right")
    assert [s.key for s in ref] == [f"eval-{i:07d}" for i in range(1, 99)]
    for name, path in forms.items():
        got = tokenize_file(path, smol_tokenizer, 128, "right")
        assert [s.key for s in got] == [s.key for s in ref], name
        for a, b in zip(got, ref, strict=True):
            assert np.array_equal(a.input_ids, b.input_ids), name
            assert np.array_equal(a.loss_mask, b.loss_mask), name


def test_keys_drop_the_data_suffix_and_stay_as_before_for_one_file():
    assert key_stem("train.jsonl") == "train" and key_stem("d.jsonl") == "d"
    assert key_stem("my.data.jsonl") == "my_data" and key_stem("notes.txt") == "notes"
    assert key_stem("a/part-1.jsonl.zst") == "a_part-1" and key_stem("x.parquet") == "x"


def test_a_directory_and_a_glob_read_their_files_in_sorted_order(smol_tokenizer, tmp_path):
    rows = demo_rows()
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    (d / "b" / "late.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n")
    (d / "a.jsonl.gz").write_bytes(
        gzip.compress(b"\n".join(json.dumps(r).encode() for r in rows[5:9]))
    )
    write_parquet(d / "c.parquet", rows[9:12])
    (d / "README.md").write_text("not data")
    files = list_files(str(d))
    assert [f.name for f in files] == ["a.jsonl.gz", "b/late.jsonl", "c.parquet"]
    assert [f.name for f in list_files(str(d / "*.jsonl*"))] == ["a.jsonl.gz"]
    assert [f.name for f in list_files(str(d / "**" / "*.jsonl"))] == ["b/late.jsonl"]
    job = load_job(_job(tmp_path, str(d)))
    samples, st = tokenize_split(job, splits(job)["train"], smol_tokenizer)
    keys = [s.key for s in samples]
    assert keys == [f"a-{i:07d}" for i in range(1, 5)] + [
        f"b_late-{i:07d}" for i in range(1, 6)
    ] + [f"c-{i:07d}" for i in range(1, 4)]
    assert st.samples == 12
    # a relative glob in the job file resolves against the job file's directory
    job = load_job(_job(tmp_path, "data/*.parquet"))
    assert splits(job)["train"] == str(tmp_path / "data" / "*.parquet")


def _job(tmp_path: Path, train: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(f'[job]\noutput = "{tmp_path / "out"}"\n[data]\ntrain = "{train}"\n')
    return p


def test_colliding_keys_and_empty_selections_are_refused(tmp_path):
    (tmp_path / "x.jsonl").write_text("{}\n")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DistillError, match="x.jsonl and x.parquet would give the same sample"):
        list_files(str(tmp_path))
    with pytest.raises(DistillError, match="matches no data file"):
        list_files(str(tmp_path / "*.zst"))
    with pytest.raises(DistillError, match="not found"):
        list_files(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="holds no data file"):
        list_files(str(tmp_path / "empty"))


def test_parquet_bad_input_names_file_column_row_and_row_group(smol_tokenizer, tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), p)
    with pytest.raises(DistillError, match=r"t.parquet: expected a 'messages' column .*: text$"):
        tokenize_file(p, smol_tokenizer, 128)
    pq.write_table(pa.table({"prompt": [1, 2], "response": ["a", "b"]}), p)
    with pytest.raises(DistillError, match="t.parquet: column 'prompt' is int64, expected string"):
        tokenize_file(p, smol_tokenizer, 128)
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(7)]
    rows[4]["response"] = None  # row 5: the second row group's second row
    rows[5]["response"] = "  "  # row 6: nothing to learn
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=4)
    with pytest.raises(DistillError) as e:
        tokenize_file(p, smol_tokenizer, 128)
    msg = str(e.value)
    assert f"{p}: row 5 (row group 1): instruction form needs string 'response'" in msg
    assert f"{p}: row 6 (row group 1): no assistant turn with content" in msg
    st = TokenizeStats()
    got = tokenize_file(p, smol_tokenizer, 128, stats=st, on_invalid="skip")
    assert [s.key for s in got] == [f"t-{i:07d}" for i in (1, 2, 3, 4, 7)]
    assert st.invalid_info() == {"count": 2, "first_lines": [5, 6]}


def test_jsonl_bad_lines_keep_their_messages_when_compressed(smol_tokenizer, tmp_path):
    lines = [
        b'{"prompt": "a", "response": "b"}',
        b"{oops",
        b'{"prompt": "caf\xe9", "response": "x"}',
    ]
    p = tmp_path / "d.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(DistillError) as e:
        tokenize_file(p, smol_tokenizer, 128)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 invalid lines:")
    assert f"{p}:2: malformed JSON" in msg
    assert f"{p}:3: not UTF-8 (byte 0xe9 at column 16)" in msg
    broken = tmp_path / "e.jsonl.gz"
    broken.write_bytes(gzip.compress(b"\n".join(lines))[:-12])
    with pytest.raises(DistillError, match=r"e.jsonl.gz: cannot read"):
        tokenize_file(broken, smol_tokenizer, 128)


def test_records_count_without_parsing_and_skip_blank_lines(tmp_path):
    from distill.data.records import DataFile

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n\n   \n\xc2\xa0\n{oops\n[1]\n')  # a NBSP-only line is blank
    f = DataFile("d.jsonl", p, str(p))
    assert count_records([f]) == [3]
    assert [r.n for r in iter_split([f])] == [1, 5, 6]


def test_digest_one_file_is_its_sha256_and_a_directory_covers_every_file(tmp_path):
    f = tmp_path / "d" / "a.jsonl"
    f.parent.mkdir()
    f.write_text('{"prompt": "a", "response": "b"}\n')
    assert digest(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()  # as before #22
    before = digest(str(f.parent))
    (f.parent / "b.jsonl").write_text('{"prompt": "c", "response": "d"}\n')
    after = digest(str(f.parent))
    assert after != before
    (f.parent / "b.jsonl").write_text('{"prompt": "c", "response": "e"}\n')
    assert digest(str(f.parent)) not in (before, after)


def test_a_gs_dataset_is_read_from_the_bucket(smol_tokenizer, gcs_bucket, tmp_path):
    forms = all_forms(tmp_path)
    store = open_store(f"{gcs_bucket}/data")
    store.put_file("eval/part-0.jsonl.zst", forms["zst"])
    store.put_file("eval/part-1.parquet", forms["parquet"])
    spec = f"{gcs_bucket}/data/eval"
    files = list_files(spec)
    assert [f.name for f in files] == ["part-0.jsonl.zst", "part-1.parquet"]
    assert all(f.content_hash.startswith("md5:") for f in files)
    d = digest(spec)  # from the listing: no byte downloaded
    assert d == digest(spec) and d != digest(f"{gcs_bucket}/data/eval/part-0.jsonl.zst")
    local = open_split(spec, tmp_path / "scratch")
    assert [f.shown for f in local] == [f"{spec}/part-0.jsonl.zst", f"{spec}/part-1.parquet"]
    job = load_job(_job(tmp_path, spec))
    samples, _ = tokenize_split(job, splits(job)["train"], smol_tokenizer)
    assert [s.key for s in samples] == [f"part-0-{i:07d}" for i in range(1, 99)] + [
        f"part-1-{i:07d}" for i in range(1, 99)
    ]
    store.put_bytes("bad/x.jsonl", b'{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DistillError, match=f"{gcs_bucket}/data/bad/x.jsonl:2: malformed JSON"):
        tokenize_split(job, f"{gcs_bucket}/data/bad/x.jsonl", smol_tokenizer)
    with pytest.raises(DistillError, match="not found"):
        list_files(f"{gcs_bucket}/data/nothing")
