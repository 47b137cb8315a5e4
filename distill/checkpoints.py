"""Where a teacher's weights live: ``hf:ORG/NAME[@REVISION]`` and ``gs://BUCKET/PATH``.

(``builtin:`` models and local Hugging Face directories are :mod:`distill.models`' own.)

Planning (the cost estimate, the fit on the L4, the tokenizer and vocab checks, the job
fingerprint) needs only a checkpoint's small files: its config, its tokenizer and the weights'
index. :func:`planning_dir` fetches just those (kilobytes) into the cache, beside
``distill-source.json``: the **pinned** source and the size of every file the teacher loads.
A pin is what every reader of the run reads:

- ``hf:ORG/NAME@<40-hex commit sha>``: a branch or tag is resolved to its commit once;
- ``gs://BUCKET/PATH@<digest>``: sha256 over the listing's names, sizes and content hashes, so
  a checkpoint rewritten under the same path is refused, not half-mixed.

:func:`fetch_weights` fetches the whole checkpoint for a run on this machine. The cloud path
never brings weights to the user's machine: the VMs copy them
(:mod:`distill.cloud.checkpoint_copy`). Nothing here imports torch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import DistillError

SOURCE_FILE = "distill-source.json"  # in a fetched checkpoint: its pinned source and files
# the files planning reads (top level only): config, tokenizer, chat template, weights' index
PLANNING_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "chat_template.jinja",
        "chat_template.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    }
)
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
COPY_STREAMS = 8  # files fetched at once (Hub, bucket)


@dataclass(frozen=True)
class Source:
    """A checkpoint somewhere else: ``kind`` "hf" (``where`` = ORG/NAME) or "gs" (``where`` =
    gs://BUCKET/PATH); ``revision``: as written (hf: a branch, tag or sha; "" = main) or the
    pin."""

    kind: str
    where: str
    revision: str = ""

    @property
    def ref(self) -> str:
        base = f"hf:{self.where}" if self.kind == "hf" else self.where
        return f"{base}@{self.revision}" if self.revision else base

    @property
    def pinned(self) -> bool:
        return bool(_SHA.match(self.revision)) if self.kind == "hf" else bool(self.revision)


def parse_source(ref: str) -> Source | None:
    """``hf:ORG/NAME[@REV]`` or ``gs://BUCKET/PATH[@DIGEST]``; None for anything else (a
    ``builtin:`` name, a local directory). A malformed reference is refused, naming the form."""
    if ref.startswith("hf:"):
        body = ref[3:]
        repo, _, rev = body.partition("@")
        if not _REPO.match(repo) or "@" in rev or (body.endswith("@") and not rev):
            raise DistillError(
                f"teacher.model = {ref!r}: a Hub model is hf:ORG/NAME or hf:ORG/NAME@REVISION "
                "(a branch, tag or commit sha), e.g. hf:Qwen/Qwen2.5-7B-Instruct"
            )
        return Source("hf", repo, rev)
    if ref.startswith("gs://"):
        pinned = re.search(r"@([0-9a-f]{16})$", ref)
        path, digest = (ref[: pinned.start()], pinned.group(1)) if pinned else (ref, "")
        bucket, _, prefix = path[len("gs://") :].partition("/")
        if not bucket or not prefix.strip("/"):
            raise DistillError(
                f"teacher.model = {ref!r}: a bucket checkpoint is gs://BUCKET/PATH, the folder "
                "that holds config.json and the *.safetensors files"
            )
        return Source("gs", f"gs://{bucket}/{prefix.strip('/')}", digest)
    return None


def is_pinned_ref(ref: str) -> bool:
    """A pinned checkpoint reference (``hf:ORG/NAME@SHA``, ``gs://...@DIGEST``): what a VM's
    inputs name as the source of its ``model``."""
    try:
        source = parse_source(ref)
    except DistillError:
        return False
    return source is not None and source.pinned


@dataclass(frozen=True)
class Pinned:
    """A source at one revision and the files the teacher loads from it (path -> bytes)."""

    source: Source
    files: dict[str, int]
    restricted: bool = False  # hf: gated or private: the VMs need a Hub token

    @property
    def ref(self) -> str:
        return self.source.ref

    @property
    def weights_bytes(self) -> int:
        return sum(self.files.values())

    def record(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "files": dict(sorted(self.files.items())),
            "restricted": self.restricted,
        }

    @staticmethod
    def from_record(data: dict[str, Any]) -> Pinned:
        src = parse_source(str(data["ref"]))
        if src is None:
            raise DistillError(f"{SOURCE_FILE}: {data['ref']!r} is not an hf: or gs:// source")
        files = {str(k): int(v) for k, v in data["files"].items()}
        return Pinned(src, files, bool(data.get("restricted", False)))


def checkpoint_files(files: dict[str, int], where: str) -> dict[str, int]:
    """Of a repository's (or a bucket folder's) files, those a transformers checkpoint loads:
    the top-level config, tokenizer and index files, and the weights (``*.safetensors``; else
    ``pytorch_model*.bin``). Subfolders (``original/``, ``onnx/``, GGUF copies) are left out:
    they are often as big as the weights."""
    top = {n: s for n, s in files.items() if "/" not in n}
    if "config.json" not in top:
        raise DistillError(
            f"{where} has no config.json at its top level: not a Hugging Face checkpoint "
            f"(files: {', '.join(sorted(files)[:8]) or 'none'})"
        )
    weights = {n: s for n, s in top.items() if n.endswith(".safetensors")}
    if not weights:
        weights = {n: s for n, s in top.items() if re.fullmatch(r"pytorch_model.*\.bin", n)}
    if not weights:
        raise DistillError(
            f"{where} has no *.safetensors (or pytorch_model*.bin) weights at its top level"
        )
    small = {n: s for n, s in top.items() if n in PLANNING_FILES}
    return {**small, **weights}


# --- pinning ----------------------------------------------------------------------------------


def pin(source: Source, token: str | None = None) -> Pinned:
    """Resolve ``source`` to one revision and list its checkpoint files (no weights read)."""
    if source.kind == "hf":
        return _pin_hub(source, token)
    return _pin_bucket(source)


def hub_error(e: Exception, repo: str, revision: str) -> DistillError:
    """huggingface_hub's typed errors as what the user does next."""
    from huggingface_hub import errors

    at = f"hf:{repo}" + (f"@{revision}" if revision else "")
    if isinstance(e, errors.GatedRepoError):
        return DistillError(
            f"{at} is gated: accept its license on the Hub page of {repo}, then log in "
            "(`hf auth login`, or HF_TOKEN) with an account that has access; teacher-cloud's VMs "
            "read the token from Secret Manager: set cloud.hf_token_secret (docs/CLOUD.md)"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return DistillError(f"{at}: the Hub has no revision {revision!r} (a branch, tag or sha)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return DistillError(
            f"{at}: no such model on the Hub, or it is private and this machine's Hub login "
            "(`hf auth login`, or HF_TOKEN) cannot see it"
        )
    if isinstance(e, errors.EntryNotFoundError):
        return DistillError(f"{at}: a file is missing at that revision: {e}")
    if isinstance(e, errors.LocalEntryNotFoundError | OSError):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return DistillError(f"{at}: cannot reach the Hub at {endpoint}: {e}")
    return DistillError(f"{at}: the Hub refused the request: {e}")


def _pin_hub(source: Source, token: str | None) -> Pinned:
    from huggingface_hub import HfApi, errors

    try:
        info = HfApi().model_info(
            source.where, revision=source.revision or None, files_metadata=True, token=token
        )
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError) as e:
        raise hub_error(e, source.where, source.revision) from None
    files = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    if not info.sha:
        raise DistillError(f"hf:{source.where}: the Hub gave no commit sha for the revision")
    pinned = Source("hf", source.where, info.sha)
    restricted = bool(info.gated) or bool(info.private)
    return Pinned(pinned, checkpoint_files(files, pinned.ref), restricted)


def listing_digest(infos: list[tuple[str, int, str]]) -> str:
    """sha256 (16 hex) over a bucket folder's ``(name, size, content hash)`` listing."""
    h = hashlib.sha256()
    for name, size, content in sorted(infos):
        h.update(f"{name}\0{size}\0{content}\n".encode())
    return h.hexdigest()[:16]


def bucket_listing(where: str) -> tuple[dict[str, int], str]:
    """The checkpoint files under ``where`` (gs://...) and the digest of their listing."""
    from distill.store.storage import open_store

    infos = open_store(where).list_info()
    files = checkpoint_files({i.name: i.size for i in infos}, where)
    digest = listing_digest([(i.name, i.size, i.content_hash) for i in infos if i.name in files])
    return files, digest


def _pin_bucket(source: Source) -> Pinned:
    files, digest = bucket_listing(source.where)
    if source.revision and source.revision != digest:
        raise DistillError(
            f"{source.where} changed since this run was planned (listing digest {digest}, "
            f"pinned {source.revision}): its files were rewritten; plan the run again"
        )
    return Pinned(Source("gs", source.where, digest), files)


# --- fetching ---------------------------------------------------------------------------------


def cache_root() -> Path:
    """distill's cache: ``DISTILL_CACHE``, else ~/.cache/distill."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")).expanduser()


def cache_dir(pinned: Pinned, part: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", pinned.ref.split(":", 1)[-1].lstrip("/"))
    return cache_root() / "sources" / slug / part


def source_record(teacher_dir: Path) -> Pinned | None:
    """The pinned source of a fetched (or staged) checkpoint; None for any other directory."""
    path = Path(teacher_dir) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        return Pinned.from_record(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise DistillError(f"{path} is damaged ({e}): delete the folder to fetch it again") from e


def source_id(teacher_dir: Path) -> str | None:
    """The pinned reference the job fingerprint names, for a fetched or staged checkpoint."""
    rec = source_record(teacher_dir)
    return rec.ref if rec else None


def checkpoint_bytes(teacher_dir: Path) -> int:
    """The bytes of the checkpoint the teacher loads: the source's file sizes for a planning
    folder, else the folder's files."""
    rec = source_record(teacher_dir)
    if rec is not None:
        return rec.weights_bytes
    return sum(p.stat().st_size for p in Path(teacher_dir).rglob("*") if p.is_file())


def planning_dir(ref: str, token: str | None = None) -> Path:
    """The small files of ``ref`` (config, tokenizer, index) and its pin, cached; no weights."""
    return _fetched(
        ref, lambda p: {n: s for n, s in p.files.items() if n in PLANNING_FILES}, "plan", token
    )


def fetch_weights(ref: str, token: str | None = None) -> Path:
    """The whole checkpoint of ``ref`` on this machine (a local run), cached by its pin."""
    return _fetched(ref, lambda p: p.files, "full", token)


def _fetched(
    ref: str, which: Callable[[Pinned], dict[str, int]], part: str, token: str | None
) -> Path:
    source = parse_source(ref)
    if source is None:
        raise DistillError(f"{ref!r} is not an hf: or gs:// reference")
    if source.kind == "hf" and source.pinned:  # a commit never changes: no need to ask the Hub
        for p in (part, "full"):
            d = cache_dir(Pinned(source, {}), p)
            if (d / SOURCE_FILE).is_file():
                return d
    pinned = pin(source, token)
    dest = cache_dir(pinned, part)
    if (dest / SOURCE_FILE).is_file():
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        download(pinned, which(pinned), tmp, token)
        (tmp / SOURCE_FILE).write_text(json.dumps(pinned.record(), indent=1) + "\n")
        with contextlib.suppress(OSError):  # another process fetched it first
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download(pinned: Pinned, files: dict[str, int], dest: Path, token: str | None = None) -> None:
    """``files`` of ``pinned`` into ``dest``, :data:`COPY_STREAMS` at once; every size checked."""
    dest.mkdir(parents=True, exist_ok=True)
    src = pinned.source
    if src.kind == "hf":
        from huggingface_hub import errors, snapshot_download

        try:
            snapshot_download(
                src.where,
                revision=src.revision,
                allow_patterns=sorted(files),
                local_dir=dest,
                token=token,
                max_workers=COPY_STREAMS,
            )
        except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError) as e:
            raise hub_error(e, src.where, src.revision) from None
        with contextlib.suppress(OSError):  # huggingface_hub's own bookkeeping
            shutil.rmtree(dest / ".cache")
    else:
        from distill.store.storage import open_store

        store = open_store(src.where)
        with concurrent.futures.ThreadPoolExecutor(COPY_STREAMS) as pool:
            list(pool.map(lambda n: store.download(n, dest / n), sorted(files)))
    check_sizes(dest, files, src.ref)


def check_sizes(dest: Path, files: dict[str, int], where: str) -> None:
    """Every file there at its listed size: a cut-short copy is refused, naming the file."""
    for name, size in files.items():
        p = dest / name
        got = p.stat().st_size if p.is_file() else None
        if got != size:
            raise DistillError(
                f"{where}: {name} is {'missing' if got is None else f'{got:,} bytes'} after the "
                f"copy, expected {size:,} bytes"
            )
