"""The Hugging Face Hub and Secret Manager doubles (tests/fakes/hub.py, secrets.py) against
the real clients: huggingface_hub and transformers for the Hub, urllib for Secret Manager."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import google_crc32c
import huggingface_hub
import pytest
from fakes.hub import FakeHub, git_blob_oid
from fakes.secrets import FakeSecretManager
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "acme/teacher"
CONFIG_V1 = b'{"model_type": "llama", "v": 1}'
CONFIG_V2 = b'{"model_type": "llama", "v": 2}'
WEIGHTS = bytes(range(256)) * 64  # an LFS file (*.safetensors)


def small_repo(hub: FakeHub, **kw: bool) -> str:
    return hub.add_repo(REPO, {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS}, **kw)


# --- revisions ------------------------------------------------------------------------------


def test_model_info_at_a_branch_gives_its_head_and_the_files_metadata(fake_hub: FakeHub):
    sha = small_repo(fake_hub)
    info = HfApi().model_info(REPO, revision="main", files_metadata=True)
    assert info.id == REPO and info.sha == sha and len(sha) == 40
    files = {s.rfilename: s for s in info.siblings}
    assert set(files) == {"config.json", "model.safetensors"}
    assert files["config.json"].size == len(CONFIG_V1)
    assert files["config.json"].blob_id == git_blob_oid(CONFIG_V1)
    assert files["config.json"].lfs is None
    lfs = files["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert lfs.size == len(WEIGHTS)
    # the module-level functions (their own HfApi) are pointed here too
    assert huggingface_hub.model_info(REPO).sha == sha
    # expand: only what was asked
    assert HfApi().model_info(REPO, expand=["sha"]).siblings is None


def test_a_new_commit_moves_main_and_the_old_sha_keeps_its_files(fake_hub: FakeHub, tmp_path: Path):
    old = small_repo(fake_hub)
    new = fake_hub.commit(REPO, {"config.json": CONFIG_V2})
    assert new != old
    assert HfApi().model_info(REPO).sha == new
    assert HfApi().model_info(REPO, revision=old).sha == old
    assert HfApi().model_info(REPO, revision=old[:7]).sha == old  # the Hub resolves short shas
    at_old = hf_hub_download(REPO, "config.json", revision=old)
    at_main = hf_hub_download(REPO, "config.json")
    assert Path(at_old).read_bytes() == CONFIG_V1
    assert Path(at_main).read_bytes() == CONFIG_V2
    assert Path(at_main).is_relative_to(tmp_path / "hf-home" / "hub")  # the patched cache
    # the weights, unchanged, are in both commits
    names = {s.rfilename for s in HfApi().model_info(REPO, revision=old).siblings}
    assert names == {"config.json", "model.safetensors"}


def test_unknown_revision_repo_and_file_are_the_hubs_typed_errors(fake_hub: FakeHub):
    sha = small_repo(fake_hub)
    with pytest.raises(RevisionNotFoundError) as e:
        HfApi().model_info(REPO, revision="no-such-branch")
    assert e.value.response.status_code == 404
    assert "Invalid rev id: no-such-branch" in str(e.value)
    with pytest.raises(RevisionNotFoundError):  # a well-formed sha of no commit
        hf_hub_download(REPO, "config.json", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):  # shorter than 7: not resolved
        HfApi().model_info(REPO, revision=sha[:6])
    with pytest.raises(EntryNotFoundError) as e:
        hf_hub_download(REPO, "nope.json", revision=sha)
    assert e.value.response.status_code == 404
    assert e.value.response.headers["X-Repo-Commit"] == sha
    with pytest.raises(RepositoryNotFoundError) as e:
        hf_hub_download("acme/nothing", "config.json")
    assert e.value.response.status_code == 401  # anonymous: the Hub does not say it is missing
    fake_hub.add_token("hf_user")
    with pytest.raises(RepositoryNotFoundError) as e:
        HfApi(token="hf_user").model_info("acme/nothing")
    assert e.value.response.status_code == 404


def test_a_token_the_hub_does_not_know_is_refused_even_on_a_public_repo(fake_hub: FakeHub):
    small_repo(fake_hub)
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download(REPO, "config.json", token="hf_stale")
    assert e.value.response.status_code == 401
    assert not isinstance(e.value, RepositoryNotFoundError)
    assert "Invalid credentials in Authorization header" in str(e.value)
    assert fake_hub.requests[-1].token == "hf_stale"


def test_an_outage_answers_503_then_recovers(fake_hub: FakeHub):
    sha = small_repo(fake_hub)
    fake_hub.failures = 1
    with pytest.raises(HfHubHTTPError) as e:
        HfApi().model_info(REPO)
    assert e.value.response.status_code == 503
    assert HfApi().model_info(REPO).sha == sha


def test_a_private_repo_is_not_found_unless_granted(fake_hub: FakeHub):
    small_repo(fake_hub, private=True)
    fake_hub.add_token("hf_other")
    fake_hub.grant(REPO, "hf_owner")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token="hf_other").model_info(REPO)
    assert HfApi(token="hf_owner").model_info(REPO).private is True


# --- gated repos and tokens -----------------------------------------------------------------


def test_a_gated_repo_401_anonymous_403_not_granted_then_served(fake_hub: FakeHub):
    small_repo(fake_hub, gated=True)
    fake_hub.add_token("hf_waiting")
    fake_hub.grant(REPO, "hf_granted")
    assert HfApi().model_info(REPO).gated == "manual"  # its card and file list stay public
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download(REPO, "config.json")
    assert e.value.response.status_code == 401
    assert "You must have access to it and be authenticated" in str(e.value)
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download(REPO, "config.json", token="hf_waiting")
    assert e.value.response.status_code == 403
    assert "not in the authorized list" in str(e.value)
    assert fake_hub.downloads == {}
    path = hf_hub_download(REPO, "model.safetensors", token="hf_granted")
    assert Path(path).read_bytes() == WEIGHTS
    tokens = [(r.host.startswith("localhost"), r.token) for r in fake_hub.requests[-2:]]
    # the HEAD on the Hub carried the token, the download from the "CDN" none
    assert tokens == [(False, "hf_granted"), (True, None)]


# --- downloads --------------------------------------------------------------------------------


def test_snapshot_at_a_sha_with_allow_patterns_fetches_no_weights(
    fake_hub: FakeHub, tiny_llama_files: dict[str, bytes]
):
    sha = fake_hub.add_repo(REPO, tiny_llama_files)
    weights = {p for p in tiny_llama_files if p.endswith(".safetensors")}
    assert len(weights) == 3  # sharded: the rest, then one file per layer
    folder = snapshot_download(REPO, revision=sha, allow_patterns=["config.json", "tokenizer*"])
    got = {p.name for p in Path(folder).iterdir()}
    assert got == {"config.json", "tokenizer.json", "tokenizer_config.json"}
    assert fake_hub.requested_paths(REPO) == got
    assert not any(w in r.path for r in fake_hub.requests for w in weights)
    assert all(fake_hub.bytes_served[(REPO, w)] == 0 for w in weights)
    # a sha needs no revision lookup: the tree listing, then the files
    assert not any("/revision/" in r.path for r in fake_hub.requests)


def test_a_tiny_llama_through_snapshot_download_loads_and_downloads_once(
    fake_hub: FakeHub, tiny_llama_files: dict[str, bytes]
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = fake_hub.add_repo(REPO, tiny_llama_files)
    folder = snapshot_download(REPO)  # main
    assert Path(folder).name == sha
    again = snapshot_download(REPO, revision=sha)
    assert again == folder
    assert dict(fake_hub.downloads) == {(REPO, p): 1 for p in tiny_llama_files}
    sizes = {(REPO, p): len(d) for p, d in tiny_llama_files.items()}
    assert dict(fake_hub.bytes_served) == sizes
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    assert ids.shape == (1, 6) and int(ids.max()) < model.config.vocab_size
    assert model(ids).logits.shape == (1, 6, model.config.vocab_size)


def test_transformers_from_pretrained_by_repo_id_at_a_sha(
    fake_hub: FakeHub, tiny_llama_files: dict[str, bytes]
):
    from transformers import AutoModelForCausalLM

    sha = fake_hub.add_repo(REPO, tiny_llama_files, gated=True)
    fake_hub.grant(REPO, "hf_granted")
    fake_hub.commit(REPO, {"config.json": b"{}"})  # main moves on, broken
    model = AutoModelForCausalLM.from_pretrained(REPO, revision=sha, token="hf_granted")
    assert model.config.num_hidden_layers == 2
    assert {r.token for r in fake_hub.requests if not r.host.startswith("localhost")} == {
        "hf_granted"
    }
    fetched = fake_hub.requested_paths(REPO)
    assert "model.safetensors.index.json" in fetched and "config.json" in fetched


def test_a_subprocess_uses_the_fake_through_its_environment(fake_hub: FakeHub, tmp_path: Path):
    sha = small_repo(fake_hub)
    home = tmp_path / "child-home"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    code = (
        "import huggingface_hub as h, huggingface_hub.constants;"
        "print(h.constants.ENDPOINT);"
        f"print(open(h.hf_hub_download({REPO!r}, 'config.json', revision={sha!r})).read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **fake_hub.env(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out == [fake_hub.url, CONFIG_V1.decode()]
    assert (home / "hub").is_dir()


def test_range_requests_on_the_hub_and_the_cdn(fake_hub: FakeHub):
    sha = small_repo(fake_hub)

    def get(url: str, rng: str) -> tuple[int, bytes, str | None]:
        req = urllib.request.Request(url, headers={"Range": rng})
        try:
            with urllib.request.urlopen(req) as r:  # follows the 302 to the CDN
                return r.status, r.read(), r.headers.get("Content-Range")
        except HTTPError as e:
            return e.code, b"", e.headers.get("Content-Range")

    base = f"{fake_hub.url}/{REPO}/resolve/{sha}"
    assert get(f"{base}/config.json", "bytes=2-5") == (206, CONFIG_V1[2:6], "bytes 2-5/31")
    n = len(WEIGHTS)
    assert get(f"{base}/model.safetensors", "bytes=100-") == (
        206,
        WEIGHTS[100:],
        f"bytes 100-{n - 1}/{n}",
    )
    assert get(f"{base}/config.json", "bytes=99-") == (416, b"", "bytes */31")


def test_the_tree_listing_pages_and_nests(fake_hub: FakeHub):
    files = {f"f{i}.txt": b"x" for i in range(3)} | {"sub/dir/deep.json": b"{}"}
    fake_hub.add_repo(REPO, files)
    fake_hub.page_size = 2
    api = HfApi()
    listed = [(e.path, type(e).__name__) for e in api.list_repo_tree(REPO, recursive=True)]
    assert sorted(listed) == sorted(
        [(p, "RepoFile") for p in files] + [("sub", "RepoFolder"), ("sub/dir", "RepoFolder")]
    )
    assert sum("/tree/" in r.path for r in fake_hub.requests) == 3  # 6 entries, 2 a page
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {"f0.txt", "f1.txt", "f2.txt", "sub"}
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))


# --- Secret Manager ------------------------------------------------------------------------


def access(sm: FakeSecretManager, name: str, token: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{sm.url}/v1/{name}:access", headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except HTTPError as e:
        return e.code, json.loads(e.read())


def test_secret_access_latest_and_numbered_with_the_right_token(fake_secrets: FakeSecretManager):
    number = fake_secrets.add_project("proj-a", "123456789012")
    fake_secrets.add_secret("proj-a", "hf-token", "hf_one", accessors={"sa-token"})
    fake_secrets.add_secret("proj-a", "hf-token", "hf_two", accessors={"sa-token"})
    status, body = access(
        fake_secrets, "projects/proj-a/secrets/hf-token/versions/latest", "sa-token"
    )
    assert status == 200
    assert body["name"] == f"projects/{number}/secrets/hf-token/versions/2"  # the number
    data = base64.b64decode(body["payload"]["data"])
    assert data == b"hf_two"
    assert body["payload"]["dataCrc32c"] == str(google_crc32c.value(data))
    status, body = access(
        fake_secrets, f"projects/{number}/secrets/hf-token/versions/1", "sa-token"
    )
    assert (status, base64.b64decode(body["payload"]["data"])) == (200, b"hf_one")
    assert [c.token for c in fake_secrets.calls] == ["sa-token", "sa-token"]


def test_secret_access_refused_without_the_right_token(fake_secrets: FakeSecretManager):
    fake_secrets.add_secret("proj-a", "hf-token", "hf_one", accessors={"sa-token"})
    name = "projects/proj-a/secrets/hf-token/versions/latest"
    status, body = access(fake_secrets, name, "other-token")
    assert (status, body["error"]["status"]) == (403, "PERMISSION_DENIED")
    assert body["error"]["code"] == 403 and name in body["error"]["message"]
    status, body = access(fake_secrets, name, None)
    assert (status, body["error"]["status"]) == (401, "UNAUTHENTICATED")
    assert [(c.token, c.status) for c in fake_secrets.calls] == [("other-token", 403), (None, 401)]


def test_secret_not_found_needs_project_access_to_be_told(fake_secrets: FakeSecretManager):
    number = fake_secrets.add_project("proj-a")
    fake_secrets.add_secret("proj-a", "hf-token", "hf_one")  # any caller
    missing = "projects/proj-a/secrets/nope/versions/latest"
    assert access(fake_secrets, missing, "sa-token")[0] == 403  # IAM first: it may not exist
    fake_secrets.grant_project("proj-a", "sa-token")
    status, body = access(fake_secrets, missing, "sa-token")
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND")
    assert body["error"]["message"] == (
        f"Secret [projects/{number}/secrets/nope] not found or has no versions."
    )
    status, body = access(fake_secrets, "projects/proj-a/secrets/hf-token/versions/7", "anyone")
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND")


def test_latest_is_the_newest_version_even_when_disabled(fake_secrets: FakeSecretManager):
    number = fake_secrets.add_project("proj-a")
    fake_secrets.add_secret("proj-a", "hf-token", "hf_one")
    fake_secrets.add_secret("proj-a", "hf-token", "hf_two")
    fake_secrets.set_state("proj-a", "hf-token", 2, "DISABLED")
    status, body = access(fake_secrets, "projects/proj-a/secrets/hf-token/versions/latest", "t")
    assert (status, body["error"]["status"]) == (400, "FAILED_PRECONDITION")
    assert body["error"]["message"] == (
        f"Secret Version [projects/{number}/secrets/hf-token/versions/2] is in DISABLED state."
    )
    status, body = access(fake_secrets, "projects/proj-a/secrets/hf-token/versions/1", "t")
    assert status == 200 and base64.b64decode(body["payload"]["data"]) == b"hf_one"
