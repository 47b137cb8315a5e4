"""The record index (distill/data/record_index.py): a fan-out task reads only its own shards'
records, and reads exactly the records, line numbers and bytes that reading the whole files
gives (distill/data/records.py's iter_split), whatever the files hold."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest
from test_formats import write_parquet

from distill.data import record_index
from distill.data.record_index import FileIndex, SplitIndex, build_index, open_indexed
from distill.data.records import DataFile, Select, count_records, iter_split
from distill.errors import DistillError
from distill.sources import open_split_indexed
from distill.store.storage import open_store


def chat(i: int, words: int) -> bytes:
    msgs = [
        {"role": "user", "content": f"q{i} " + "w" * words},
        {"role": "assistant", "content": f"a{i}"},
    ]
    return json.dumps({"messages": msgs}).encode()


def awkward_jsonl(path: Path, n: int, seed: int) -> Path:
    """``n`` records among blank, whitespace-only and Unicode-whitespace lines, CRLF endings,
    lengths from a few bytes to kilobytes, and no newline after the last record."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(n):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            out += rng.choice([b"\n", b"   \n", b"\t\r\n", "\u3000\u2003\n".encode()])
        out += chat(i, rng.choice([1, 5, 40, 900, 3000]))
        if i < n - 1:
            out += rng.choice([b"\n", b"\r\n"])
    path.write_bytes(bytes(out))
    return path


class Reads:
    """The tasks' reader over local files: what it read, by file."""

    def __init__(self) -> None:
        self.ranged: dict[str, int] = {}
        self.downloaded: list[str] = []

    def read(self, f: FileIndex, start: int, end: int) -> bytes:
        with open(f.url, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
        self.ranged[f.url] = self.ranged.get(f.url, 0) + len(data)
        return data

    def download(self, f: FileIndex, dest: Path) -> None:
        self.downloaded.append(Path(f.url).name)
        shutil.copyfile(f.url, dest)


def split_files(tmp_path: Path) -> list[DataFile]:
    """A split of four files: plain JSONL, gzip JSONL, Parquet (row groups of 7), JSONL."""
    d = tmp_path / "data"
    d.mkdir()
    a = awkward_jsonl(d / "a.jsonl", 97, seed=1)
    b = d / "b.jsonl.gz"
    b.write_bytes(gzip.compress(awkward_jsonl(tmp_path / "b.jsonl", 23, seed=2).read_bytes()))
    rows = [json.loads(chat(i, 3)) for i in range(19)]
    c = write_parquet(d / "c.parquet", rows, group=7)
    e = awkward_jsonl(d / "e.jsonl", 61, seed=3)
    return [DataFile(p.name, p, str(p)) for p in (a, b, c, e)]


def as_task(index: SplitIndex, scratch: Path, sel: Select, per: int) -> tuple[list, Reads]:
    """The split's files as the task whose records ``sel`` selects reads them, and its reads."""
    reads = Reads()
    files = open_indexed(
        index, scratch, lambda lo, hi: sel.any_in(lo, hi, per), reads.read, reads.download
    )
    return files, reads


def records(files: list[DataFile], select: Select, per: int) -> list[tuple]:
    return [(r.index, r.file, r.n, r.where, r.raw) for r in iter_split(files, select, per)]


@pytest.mark.parametrize("per", [1, 4, 13, 300])
@pytest.mark.parametrize("tasks", [1, 3, 5])
# a cap inside the first plain file, the gzip file, the Parquet file
@pytest.mark.parametrize("max_samples", [0, 50, 110, 125])
def test_a_task_reads_what_the_whole_files_give(tmp_path, monkeypatch, per, tasks, max_samples):
    monkeypatch.setattr(record_index, "MAX_READ", 257)  # many reads, lines longer than one
    files = split_files(tmp_path)
    index = build_index(files, "d" * 64, per)
    assert index.records == sum(count_records(files)) == 97 + 23 + 19 + 61
    if max_samples:  # counting stops at the cap, in every format
        assert sum(count_records(files, max_samples)) == max_samples
    for task in range(tasks):
        owns = (lambda t: lambda i: (i // per) % tasks == t)(task)
        want = records(files, Select(owns, max_samples), per)
        selected = Select(owns, max_samples)
        indexed, reads = as_task(index, tmp_path / f"task{task}", selected, per)
        assert records(indexed, Select(owns, max_samples), per) == want, (task, per)
        assert count_records(indexed, max_samples) == count_records(files, max_samples)
        # a compressed or Parquet file is fetched only by a task that owns one of its records
        for name, lo, hi in (("b.jsonl.gz", 97, 120), ("c.parquet", 120, 139)):
            assert (name in reads.downloaded) == selected.any_in(lo, hi, per), (name, task)


@pytest.mark.parametrize("per", [300, 513])
def test_shards_that_do_not_line_up_with_the_strides(tmp_path, per):
    """Shards of 300 or 513 records over strides of 256, across two plain files: every task
    reads what the whole files give."""
    a = awkward_jsonl(tmp_path / "a.jsonl", 1100, seed=5)
    b = awkward_jsonl(tmp_path / "b.jsonl", 700, seed=6)
    files = [DataFile(p.name, p, str(p)) for p in (a, b)]
    index = build_index(files, "d" * 64, per)
    assert index.stride == 256
    for tasks in (2, 3):
        for t in range(tasks):
            sel = Select(lambda i, t=t, n=tasks: (i // per) % n == t, 1700)
            got, _ = as_task(index, tmp_path / f"{tasks}-{t}", sel, per)
            assert records(got, sel, per) == records(files, sel, per), (tasks, t)


def test_a_short_or_long_ranged_read_is_an_error(tmp_path):
    """A store that answers a ranged read with other bytes (an object served decompressed,
    ``Content-Encoding: gzip``, ignores the range) is refused, not read as records."""
    path = awkward_jsonl(tmp_path / "a.jsonl", 40, seed=7)
    index = build_index([DataFile(path.name, path, str(path))], "d" * 64, 4)

    def whole(f: FileIndex, start: int, end: int) -> bytes:
        return Path(f.url).read_bytes()

    with pytest.raises(DistillError, match="asked for bytes 0 to .* got"):
        open_indexed(index, tmp_path, lambda lo, hi: lo < 4, whole, Reads().download)


def test_each_task_reads_about_its_share(tmp_path, monkeypatch):
    """Four tasks over 2,000 records, 25 a shard: each reads about a quarter of the bytes,
    and all of them together about the file once (plus at most a stride a shard)."""
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(chat(i, 200) for i in range(2000)) + b"\n")
    files = [DataFile(path.name, path, str(path))]
    per, n = 25, 4
    index = build_index(files, "d" * 64, per)
    assert index.stride == 25 and len(index.files[0].offsets) == 80
    size = path.stat().st_size
    total = 0
    for t in range(n):
        sel = Select(lambda i, t=t: (i // per) % n == t)
        got, reads = as_task(index, tmp_path / f"s{t}", sel, per)
        assert len(records(got, sel, per)) == 500
        assert reads.ranged[str(path)] == pytest.approx(size / n, rel=0.01)
        total += reads.ranged[str(path)]
    assert total == size


def test_a_changed_file_is_an_error_not_other_records(tmp_path):
    path = awkward_jsonl(tmp_path / "a.jsonl", 40, seed=4)
    files = [DataFile(path.name, path, str(path))]
    index = build_index(files, "d" * 64, 4)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut after indexing
    reads = Reads()
    with pytest.raises(DistillError, match="changed after teacher-cloud indexed it"):
        open_indexed(index, tmp_path, lambda lo, hi: True, reads.read, reads.download)
    # a store that gave back the bytes asked for, of fewer records: found while reading
    index = build_index([DataFile(path.name, path, str(path))], "d" * 64, 4)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(b" " * len(x) if i == 30 else x for i, x in enumerate(lines)))
    got = open_indexed(index, tmp_path / "b", lambda lo, hi: True, reads.read, reads.download)
    with pytest.raises(DistillError, match="changed after teacher-cloud indexed it"):
        records(got, Select(), 4)


def test_an_index_round_trips_and_a_bad_one_is_refused(tmp_path):
    files = split_files(tmp_path)
    index = build_index(files, "d" * 64, 8)
    assert SplitIndex.from_json(index.to_json(), "x") == index
    staged = index.with_urls({f.name: f"gs://b/inputs/{f.name}" for f in files})
    assert [f.url for f in staged.files][0] == "gs://b/inputs/a.jsonl"
    for bad in (b"{", b'{"version": 99}', b'{"version": 1, "files": [{"x": 1}]}'):
        with pytest.raises(DistillError, match="not a record index this distill can read"):
            SplitIndex.from_json(bad, "gs://b/i.json")


def test_a_task_reads_its_ranges_from_the_bucket(gcs_bucket, tmp_path):
    """The real client's ranged reads against the emulator: the same records as the whole
    file, a fraction of its bytes; an index of another dataset is refused."""
    files = split_files(tmp_path)
    store = open_store(gcs_bucket)
    for f in files:
        store.put_file(f"data/{f.name}", f.path)
    index = build_index(files, "d" * 64, 10).with_urls(
        {f.name: f"{gcs_bucket}/data/{f.name}" for f in files}
    )
    store.put_bytes("records.json", index.to_json())
    sel = Select(lambda i: (i // 10) % 3 == 1)
    got, _, reads = open_split_indexed(
        f"{gcs_bucket}/records.json",
        "d" * 64,
        tmp_path / "t",
        lambda lo, hi: sel.any_in(lo, hi, 10),
    )
    # the same records (messages name the objects they were read from)
    assert [r[:3] + r[4:] for r in records(got, sel, 10)] == [
        r[:3] + r[4:] for r in records(files, sel, 10)
    ]
    total = sum(f.path.stat().st_size for f in files)
    assert 0 < reads.ranged_bytes < 0.6 * total and reads.downloaded == 2  # task 1 owns in b, c
    assert store.read_range("records.json", 2, 9) == index.to_json()[2:9]
    with pytest.raises(DistillError, match="indexes another dataset"):
        open_split_indexed(f"{gcs_bucket}/records.json", "e" * 64, tmp_path / "u", lambda *a: True)


def test_an_object_served_other_than_stored_is_downloaded_whole(tmp_path):
    """A gs:// object whose stored size differs from the copy the controller read (stored
    with Content-Encoding: gzip, served decompressed) is not read by ranges."""
    files = split_files(tmp_path)
    listed = {"a.jsonl": (1234, 7), "e.jsonl": (files[3].path.stat().st_size, 8)}
    index = build_index(files, "d" * 64, 4, listed)
    assert [f.ranged for f in index.files] == [False, False, False, True]
    assert [f.generation for f in index.files] == [7, 0, 0, 8]
    sel = Select(lambda i: (i // 4) % 2 == 0)
    got, reads = as_task(index, tmp_path / "t", sel, 4)
    assert "a.jsonl" in reads.downloaded and str(files[0].path) not in reads.ranged
    assert records(got, sel, 4) == records(files, sel, 4)


def test_a_sample_cap_inside_a_parquet_file_counts_to_the_cap(smol_tokenizer, tmp_path):
    """data.max_samples inside a Parquet file: the run holds exactly the cap's samples and
    shards (the count went on to the file's end, and the shards past the cap were refused as
    empty)."""
    from distill.data.prepare import Rules, prepare

    files = split_files(tmp_path)
    p = prepare(files, "split", smol_tokenizer, Rules(4096, "right", 125), per=4)
    try:
        assert p.records == 125 and p.shards == 32 and p.stats.samples == 125
    finally:
        p.close()


def test_an_object_overwritten_after_indexing_is_refused(gcs_bucket, tmp_path):
    """The index pins each gs:// object's generation: while it is live the task reads it; once
    the object is overwritten (even with the same bytes) the task refuses it by name."""
    from distill.demo.fake_gcs import emulator_client

    path = awkward_jsonl(tmp_path / "a.jsonl", 40, seed=8)
    store = open_store(gcs_bucket)
    store.put_file("data/a.jsonl", path)
    (info,) = store.list_info("data/")
    url = f"{gcs_bucket}/data/a.jsonl"
    index = build_index(
        [DataFile("a.jsonl", path, url)], "d" * 64, 4, {"a.jsonl": (info.size, info.generation)}
    ).with_urls({"a.jsonl": url})
    assert index.files[0].generation == info.generation > 0
    store.put_bytes("records.json", index.to_json())
    index_url = f"{gcs_bucket}/records.json"
    got, _, _ = open_split_indexed(index_url, "d" * 64, tmp_path / "a", lambda lo, hi: True)
    assert len(records(got, Select(), 4)) == 40
    bucket = emulator_client().bucket(gcs_bucket[len("gs://") :])
    bucket.blob("data/a.jsonl").upload_from_filename(str(path))  # a new generation
    with pytest.raises(DistillError, match=r"the version teacher-cloud indexed \(generation"):
        open_split_indexed(index_url, "d" * 64, tmp_path / "b", lambda lo, hi: True)
