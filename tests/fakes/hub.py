"""A local stand-in for the Hugging Face Hub, strict enough for the real ``huggingface_hub``
client (2.x, httpx) and transformers to download from it unchanged.

Served (model repos only, ``org/name`` ids):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``model_info``,
  ``repo_info``, ``resolve_revision``): ``id``, ``sha`` (the revision's full commit),
  ``siblings`` (``rfilename``; with ``blobs=true``, as ``files_metadata=True`` sends, also
  ``size``, ``blobId`` and for LFS files ``lfs`` {sha256, size, pointerSize}); ``expand=...``
  answers the asked properties only (an unknown one: 400);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``, used by
  ``snapshot_download``), ``recursive`` or not, paginated with a ``Link: rel="next"`` header
  (:attr:`FakeHub.page_size`, the Hub's 1000 by default);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``hf_hub_download``, ``get_hf_file_metadata``):
  a regular file answers 200 with ``ETag`` (its git blob id), ``X-Repo-Commit``,
  ``Content-Length`` and Range support; an LFS file (weights: ``*.safetensors``, ``*.bin``, ...,
  or anything over 10 MiB) answers 302 to a signed URL on another host (the "CDN",
  ``http://localhost:PORT``: not a Hub origin, so the client drops its Authorization header, as
  it does for the real CDN) with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``. No Xet
  headers: the client downloads over plain HTTP.

Repos: :meth:`FakeHub.add_repo` (``gated=``, ``private=``) and :meth:`FakeHub.commit` (a new
commit on a branch: the branch moves, older shas keep serving their files); tokens:
:meth:`FakeHub.grant` (a known token with access to a gated or private repo) and
:meth:`FakeHub.add_token` (known, granted nothing). Revisions: a branch name, a full 40-hex
commit sha, or a unique prefix of one of at least 7 hex characters (the Hub has resolved short
shas since 2023, huggingface_hub#197; its minimum length is not documented: shorter prefixes
are refused here); anything else answers 404 ``X-Error-Code: RevisionNotFound``
(``Invalid rev id: ...``). The CDN serves only the URLs the Hub signed (else 403).

Errors, with the Hub's status, ``X-Error-Code``/``X-Error-Message`` headers and ``{"error": ..}``
body, so the client raises its own typed errors: a token the Hub does not know: 401
``Invalid credentials in Authorization header`` (even on a public repo, as on the Hub; the client
raises a plain ``HfHubHTTPError``); a repo that does not exist, or is private and not granted:
401 ``RepoNotFound`` without a token, 404 with one (``RepositoryNotFoundError``); a gated repo's
file without a token: 401 ``GatedRepo``, with a token not granted: 403 ``GatedRepo``
(``GatedRepoError``; its metadata and file list stay public, as on the Hub); an unknown
revision: 404 ``RevisionNotFound``; a missing file: 404 ``EntryNotFound`` (with ``X-Repo-Commit``).

Every request is recorded in :attr:`FakeHub.requests` (:class:`HubRequest`: method, path,
query, headers, the bearer ``token``, the answer's status); :attr:`FakeHub.bytes_served` and
:attr:`FakeHub.downloads` count, per ``(repo, path)``, the file bytes sent and the GETs that
sent them (the resolve endpoint's and the CDN's together). While :attr:`FakeHub.failures` is
above 0 every request answers 503 (an outage), counting down.

Pointing the client at it (``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import):

- in this process: :meth:`FakeHub.patch_client` (the ``fake_hub`` fixture in conftest.py
  starts a FakeHub and does it) patches ``huggingface_hub.constants.ENDPOINT`` and the other
  import-time copies (the URL template, the module-level ``HfApi`` behind
  ``huggingface_hub.model_info`` & co., the trusted Hub origins, transformers' cached
  ``HfApi``), drops any ``HF_TOKEN`` and points the token file and the cache into a temporary
  ``HF_HOME`` (all undone by the monkeypatch);
- in a subprocess: ``env={**os.environ, **hub.env(home)}`` (``HF_ENDPOINT``, ``HF_HOME``, ...;
  also drop ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN`` from ``os.environ``).

:func:`tiny_llama_repo_files` (the session fixture ``tiny_llama_files``) builds a real, tiny,
sharded Llama checkpoint with its tokenizer, for tests that ``from_pretrained`` what they
download.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import itertools
import json
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlparse

from fakes.http import JsonApi, Served

if TYPE_CHECKING:
    import pytest

LFS_PATTERNS = (  # the Hub's default .gitattributes, the part a model repo uses
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx",
    "*.gguf", "*.model", "*.npy", "*.npz", "*.pkl", "*.tflite", "*.zip", "*.tar", "*.gz",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub refuses a plain git file above 10 MiB
SHORT_SHA_MIN = 7
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(rf"[0-9a-f]{{{SHORT_SHA_MIN},39}}")
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")
BAD_TOKEN = "Invalid credentials in Authorization header"
_ACCESS_DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a file's ``oid``/``blobId``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that git stores for an LFS file."""
    sha = hashlib.sha256(data).hexdigest()
    spec = "https://git-lfs.github.com/spec/v1"
    return f"version {spec}\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass(frozen=True)
class Blob:
    """A file's content and the ids the Hub gives it."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:  # of the pointer for an LFS file, as git stores it
        return git_blob_oid(lfs_pointer(self.data) if self.lfs else self.data)

    def lfs_json(self, sha_key: str) -> dict[str, Any]:
        return {
            sha_key: self.sha256,
            "size": len(self.data),
            "pointerSize": len(lfs_pointer(self.data)),
        }


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    date: str


@dataclass
class FakeRepo:
    repo_id: str
    gated: bool = False
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)  # tokens with access (gated / private)
    created: str = ""


@dataclass
class HubRequest:
    """One request as the fake saw it."""

    method: str
    host: str
    path: str  # percent-decoded, without the query
    raw_path: str  # as sent (a revision or file name may hold an encoded '/')
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    token: str | None  # the bearer token sent, if any
    status: int = 0  # the answer's

    @property
    def authorized(self) -> bool:
        return "authorization" in self.headers


class HubError(Exception):
    """A Hub error answer: status, ``X-Error-Code`` (may be None), message."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class FakeHub(Served):
    """The fake Hub: repos described in Python, served on a free local port (see the module
    docstring). Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.tokens: set[str] = set()  # the tokens the Hub knows (valid user tokens)
        self.requests: list[HubRequest] = []
        self.bytes_served: Counter[tuple[str, str]] = Counter()  # (repo, path) -> bytes
        self.downloads: Counter[tuple[str, str]] = Counter()  # (repo, path) -> GETs with a body
        self.page_size = 1000  # tree entries per page
        self.failures = 0  # the next N requests answer 503 (an outage)
        self.url = ""
        self.handler = _HubHandler
        self.cdn_url = ""
        self._secret = os.urandom(16)
        self._lock = threading.RLock()
        self._seq = itertools.count(1)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        super().start()
        self.cdn_url = self.url.replace("127.0.0.1", "localhost")  # another origin, same server
        return self.url

    # --- describing repos -------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        gated: bool = False,
        private: bool = False,
        lfs: tuple[str, ...] = LFS_PATTERNS,
    ) -> str:
        """A new repo whose ``main`` holds ``files``; returns that first commit's sha."""
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise ValueError(f"a repo id is org/name: {repo_id!r}")
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"repo {repo_id} exists")
            self.repos[repo_id] = FakeRepo(repo_id, gated=gated, private=private, created=_now())
            return self.commit(repo_id, files, title="initial commit", lfs=lfs)

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        delete: tuple[str, ...] = (),
        branch: str = "main",
        title: str = "update",
        lfs: tuple[str, ...] = LFS_PATTERNS,
    ) -> str:
        """A new commit on ``branch`` (created from ``main`` if new): its parent's files, with
        ``files`` added or replaced and ``delete`` removed. Returns its sha; older shas keep
        serving their own files."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch) or repo.branches.get("main")
            tree = dict(repo.commits[parent].files) if parent else {}
            for path in delete:
                tree.pop(path)
            for path, data in files.items():
                is_lfs = len(data) > LFS_MIN_SIZE or any(fnmatch.fnmatch(path, p) for p in lfs)
                tree[path] = Blob(bytes(data), is_lfs)
            seed = f"{repo_id}\0{parent}\0{next(self._seq)}\0" + "".join(
                f"{p}\0{b.oid}\0" for p, b in sorted(tree.items())
            )
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = Commit(sha, parent, tree, title, _now())
            repo.branches[branch] = sha
            return sha

    def grant(self, repo_id: str, token: str) -> None:
        """``token`` (now a known user token) may read the gated or private ``repo_id``."""
        with self._lock:
            self.tokens.add(token)
            self.repos[repo_id].granted.add(token)

    def add_token(self, token: str) -> None:
        """A valid user token, granted nothing."""
        self.tokens.add(token)

    # --- pointing the client here ----------------------------------------------------------

    def env(self, home: Path) -> dict[str, str]:
        """The environment for a subprocess whose ``huggingface_hub`` should use this fake
        (``home``: its ``HF_HOME``, cache and token file). Drop ``HF_TOKEN`` and
        ``HUGGING_FACE_HUB_TOKEN`` from the inherited environment too."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }

    def patch_client(self, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
        """Point this process's already-imported ``huggingface_hub`` (and transformers) here,
        with no token and ``home`` as ``HF_HOME``; undone with ``monkeypatch``."""
        import huggingface_hub.constants as c
        from huggingface_hub import hf_api
        from huggingface_hub.utils import _http

        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        for k, v in self.env(home).items():  # for subprocesses of the code under test
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(c, "ENDPOINT", self.url)
        template = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(c, "HF_URL_HOSTS", c.HF_URL_HOSTS | {"127.0.0.1"})
        origins = _http._HUB_ORIGINS | {_http._url_origin(self.url)}
        monkeypatch.setattr(_http, "_HUB_ORIGINS", origins)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)  # behind huggingface_hub.model_info
        monkeypatch.setattr(c, "HF_HOME", str(home))
        monkeypatch.setattr(c, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(c, "HF_HUB_DISABLE_TELEMETRY", True)
        if "transformers.utils.hub" in sys.modules:  # its HfApi keeps the endpoint it was made with
            monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)

    # --- what tests assert on ---------------------------------------------------------------

    def requested_paths(self, repo_id: str) -> set[str]:
        """The files of ``repo_id`` that any resolve request (HEAD or GET) named."""
        out = set()
        for r in self.requests:
            m = _RESOLVE.match(r.raw_path)
            if m and unquote(m["repo"]) == repo_id:
                out.add(unquote(m["path"]))
        return out

    def tokens_used(self) -> list[str | None]:
        """The bearer token of every request, in order (None: none sent)."""
        return [r.token for r in self.requests]

    # --- the Hub's logic ----------------------------------------------------------------------

    def _repo(self, repo_id: str, token: str | None) -> FakeRepo:
        """The repo, as this caller may see it (the token is already known to be valid)."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in repo.granted):
            # anonymous: 401 (the Hub will not say whether it exists); a user: 404
            raise HubError(401 if token is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _gate(self, repo: FakeRepo, token: str | None) -> None:
        if not repo.gated or token in repo.granted:
            return
        rid = repo.repo_id
        if token is None:
            msg = (
                f"Access to model {rid} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
            )
            raise HubError(401, "GatedRepo", msg)
        msg = (
            f"Access to model {rid} is restricted and you are not in the authorized list. "
            f"Visit https://huggingface.co/{rid} to ask for access."
        )
        raise HubError(403, "GatedRepo", msg)

    def _resolve(self, repo: FakeRepo, rev: str) -> Commit:
        """A branch, a full sha, or a unique short sha (>= 7 hex) -> its commit."""
        if _HEX40.fullmatch(rev) and rev in repo.commits:
            return repo.commits[rev]
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if _HEX_PREFIX.fullmatch(rev):
            found = [c for sha, c in repo.commits.items() if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _expand_properties() -> frozenset[str]:
    """The ``expand`` values the Hub accepts for models (the client's own list of them)."""
    from typing import get_args

    from huggingface_hub.hf_api import ExpandModelProperty_T

    return frozenset(get_args(ExpandModelProperty_T))


class _HubHandler(JsonApi):
    """Routes on the raw (still percent-encoded) path: a revision or file name may hold '/'."""

    stub: FakeHub

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        host = self.headers.get("Host", "")
        rec = HubRequest(
            method,
            host,
            unquote(url.path),
            url.path,
            query,
            {k.lower(): v for k, v in self.headers.items()},
            token,
        )
        with self.stub._lock:
            self.stub.requests.append(rec)
        try:
            with self.stub._lock:
                outage, self.stub.failures = self.stub.failures > 0, max(self.stub.failures - 1, 0)
            if outage:
                raise HubError(503, None, "Service Unavailable")
            status, headers, body = self.route(method, host, url.path, query, auth, token)
        except HubError as e:
            headers = {"X-Error-Message": e.message, "Content-Type": "application/json"}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            status, body = e.status, json.dumps({"error": e.message}).encode()
        rec.status = status
        self.send(status, headers, body, head=method == "HEAD")

    def send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route(
        self,
        method: str,
        host: str,
        raw: str,
        query: dict[str, list[str]],
        auth: str | None,
        token: str | None,
    ) -> tuple[int, dict[str, str], bytes]:
        hub = self.stub
        on_cdn = host == urlparse(hub.cdn_url).netloc
        if on_cdn:
            m = _CDN.match(raw)
            if method in ("GET", "HEAD") and m:
                return self.cdn(m["sha256"], query, method)
            return 404, {"Content-Type": "text/plain"}, b"Not Found"
        if auth is not None and (not auth.startswith("Bearer ") or token not in hub.tokens):
            raise HubError(401, None, BAD_TOKEN)
        if method in ("GET", "HEAD") and (m := _RESOLVE.match(raw)):
            return self.resolve(
                method, unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]), token
            )
        if method == "GET" and (m := _TREE.match(raw)):
            path = unquote(m["path"]) if m["path"] else ""
            return self.tree(unquote(m["repo"]), unquote(m["rev"]), path, query, token)
        if method == "GET" and (m := _INFO.match(raw)):
            rev = unquote(m["rev"]) if m["rev"] else "main"
            return self.info(unquote(m["repo"]), rev, query, token)
        body = json.dumps({"error": "Sorry, we can't find the page you are looking for."})
        return 404, {"Content-Type": "application/json"}, body.encode()

    # --- endpoints ------------------------------------------------------------------------

    def info(self, repo_id: str, rev: str, query: dict, token: str | None) -> tuple:
        hub = self.stub
        with hub._lock:
            repo = hub._repo(repo_id, token)
            c = hub._resolve(repo, rev)
        blobs = query.get("blobs", ["false"])[-1].lower() in ("true", "1")
        siblings = []
        for path, b in sorted(c.files.items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=len(b.data), blobId=b.oid)
                if b.lfs:
                    s["lfs"] = b.lfs_json("sha256")
            siblings.append(s)
        full: dict[str, Any] = {
            "author": repo_id.split("/")[0],
            "sha": c.sha,
            "lastModified": c.date,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(b.data) for b in c.files.values()),
        }
        head = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id}
        expand = query.get("expand") or query.get("expand[]")
        if expand:
            bad = [e for e in expand if e not in _expand_properties()]
            if bad:
                msg = f'"expand" must be one of {sorted(_expand_properties())}, got {bad}'
                raise HubError(400, None, msg)
            body = {**head, **{k: full[k] for k in expand if k in full}}
        else:
            body = {**head, "modelId": repo_id, **full}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def tree(self, repo_id: str, rev: str, path: str, query: dict, token: str | None) -> tuple:
        hub = self.stub
        with hub._lock:
            repo = hub._repo(repo_id, token)
            c = hub._resolve(repo, rev)
        recursive = query.get("recursive", ["false"])[-1].lower() in ("true", "1")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        dirs = {"/".join(p.split("/")[:i]) for p in c.files for i in range(1, p.count("/") + 1)}
        if prefix and prefix[:-1] not in dirs:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", c.sha)
        entries: list[dict[str, Any]] = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                oid = hashlib.sha1(f"tree {c.sha} {d}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        for p, b in sorted(c.files.items()):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :]):
                e: dict[str, Any] = {"type": "file", "oid": b.oid, "size": len(b.data), "path": p}
                if b.lfs:
                    e["lfs"] = b.lfs_json("oid")
                entries.append(e)
        start = int(query.get("cursor", ["0"])[-1])
        page = entries[start : start + hub.page_size]
        headers = {"Content-Type": "application/json"}
        if start + hub.page_size < len(entries):
            q = {k: v[-1] for k, v in query.items()} | {"cursor": str(start + hub.page_size)}
            headers["Link"] = f'<{hub.url}{self.path.split("?")[0]}?{urlencode(q)}>; rel="next"'
        return 200, headers, json.dumps(page).encode()

    def resolve(self, method: str, repo_id: str, rev: str, path: str, token: str | None) -> tuple:
        hub = self.stub
        with hub._lock:
            repo = hub._repo(repo_id, token)
            hub._gate(repo, token)
            c = hub._resolve(repo, rev)
        blob = c.files.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", "Entry not found", c.sha)
        headers = {"X-Repo-Commit": c.sha, "Accept-Ranges": "bytes"}
        name = path.rsplit("/", 1)[-1]
        disposition = f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
        if blob.lfs:  # to the CDN, with a signature only this fake can make
            sig = self._sign(repo_id, path, blob.sha256)
            q = urlencode({"repo": repo_id, "path": path, "sig": sig})
            location = f"{hub.cdn_url}/lfs/{blob.sha256}?{q}"
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{blob.oid}"',
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(len(blob.data)),
                    "Content-Type": "text/plain; charset=utf-8",
                }
            )
            return 302, headers, f"Found. Redirecting to {location}".encode()
        headers.update(
            {
                "ETag": f'"{blob.oid}"',
                "Content-Type": "application/octet-stream",
                "Content-Disposition": disposition,
            }
        )
        return self.body(method, repo_id, path, blob.data, headers)

    def cdn(self, sha256: str, query: dict, method: str) -> tuple:
        repo_id, path = query.get("repo", [""])[-1], query.get("path", [""])[-1]
        if not hmac.compare_digest(query.get("sig", [""])[-1], self._sign(repo_id, path, sha256)):
            return 403, {"Content-Type": "application/xml"}, _ACCESS_DENIED
        with self.stub._lock:
            data = next(
                c.files[path].data
                for c in self.stub.repos[repo_id].commits.values()
                if path in c.files and c.files[path].sha256 == sha256
            )
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        return self.body(method, repo_id, path, data, headers)

    def body(self, method: str, repo_id: str, path: str, data: bytes, headers: dict) -> tuple:
        """The file, or the byte range asked (206; 416 for one past its end)."""
        status, out = 200, data
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (m[1] == "" and m[2] == ""):
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            if m[1] == "":  # the last N bytes
                start, end = max(len(data) - int(m[2]), 0), len(data) - 1
            else:
                start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data) or start > end:
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            status, out = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if method == "GET":
            with self.stub._lock:
                self.stub.bytes_served[(repo_id, path)] += len(out)
                self.stub.downloads[(repo_id, path)] += 1
        return status, headers | {"Content-Length": str(len(out))}, out

    def _sign(self, repo_id: str, path: str, sha256: str) -> str:
        msg = f"{repo_id}\0{path}\0{sha256}".encode()
        return hmac.new(self.stub._secret, msg, "sha256").hexdigest()


# --- a tiny real checkpoint ------------------------------------------------------------------

TINY_WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "teacher", "student", "learns")


def tiny_llama_repo_files(seed: int = 0) -> dict[str, bytes]:
    """A random 2-layer Llama (hidden 16) with a word-level tokenizer, as a repo's files:
    ``config.json``, ``model.safetensors.index.json`` and one shard per layer (as
    ``tests/random_checkpoint.py`` writes them), ``tokenizer.json``, ``tokenizer_config.json``.
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load it."""
    from random_checkpoint import write_random_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *TINY_WORDS]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    with tempfile.TemporaryDirectory() as d:
        dest = Path(d)
        tok.save_pretrained(dest)
        write_random_llama(
            dest,
            seed,
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        )
        return {p.name: p.read_bytes() for p in sorted(dest.iterdir()) if p.is_file()}
