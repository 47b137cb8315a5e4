"""Helpers shared by the test modules (none imports another test module).

Jobs on the demo data (:func:`make_job`), the sample keys a shard set must hold
(:func:`dataset_keys`, :func:`stored_keys`), and the cloud tests' plumbing: the environment of
a stub VM's guest, a single-VM engine on the Compute stub, a run in a thread, the bucket's
shards and run records.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from fakes.compute import FakeCompute
from rich.console import Console

from distill.cloud.session import CloudOptions, Session
from distill.cloud.vm import VmEngine
from distill.config import load_job
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import read_shard
from distill.store.storage import open_store

REPO = Path(__file__).resolve().parents[1]
# The system's temp directory, read before conftest points TMPDIR at pytest's (0700) base temp.
SYSTEM_TMP = Path(tempfile.gettempdir())
PROJECT = "distill-test"
NAME = "distill-teacher-job"
SLOW = f"{sys.executable} {REPO / 'tests' / 'slow_teacher.py'} teacher"


def default_sigint() -> None:
    """``preexec_fn`` of a controller a test sends Ctrl-C to: a test run started as a
    background job of a non-interactive shell (``make test &``) passes SIGINT on ignored, and
    Python then installs no KeyboardInterrupt handler; a user's terminal delivers it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def guest_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "STORAGE_EMULATOR_HOST", "DISTILL_CACHE", "TMPDIR")
    }
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


class Guests:
    """What the stub's VMs run: the vm_agent, with a per-test entrypoint and environment."""

    def __init__(self) -> None:
        # the stub's VMs have their "L4" (the CPU stands in for it: tests/slow_teacher.py)
        self.env: dict[str, str] = {
            "DISTILL_ENTRYPOINT": SLOW,
            "SLOW_TEACHER_S": "0",
            "FAKE_GPU": "1",
        }

    def __call__(self, inst) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "distill.cloud.vm_agent"], guest_env(**self.env)


def controller(job: Path, compute: FakeCompute, tmp_path: Path, *sets: str) -> VmEngine:
    j = load_job(job, list(sets))
    opts = CloudOptions(
        backend="gce",
        endpoint=compute.url,
        project=PROJECT,
        yes=True,
        poll_seconds=0.1,
        state_dir=tmp_path / "cloud",
    )
    return VmEngine(Session(j, opts, Console(stderr=True, width=200)))


def assert_exact(job: Path, tmp_path: Path) -> None:
    """Every split's manifest lists exactly the dataset's samples, each once."""
    j = load_job(job)
    for split in ("train", "eval"):
        keys = stored_keys(f"{j.output}/{split}", tmp_path)
        assert keys == dataset_keys(tmp_path / f"{split}.jsonl"), split


def no_vm_left(compute: FakeCompute, timeout: float = 30.0) -> bool:
    return compute.wait_for(lambda: not compute.live(), timeout)


def run_in_thread(ctl: VmEngine | Any) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["run"] = ctl.run()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def shards_in(url: str) -> int:
    return sum(1 for n in open_store(url).list() if n.endswith(".tar"))


def run_records(job: Path) -> list[dict]:
    store = open_store(f"{load_job(job).output}/cloud")
    return [json.loads(store.read_bytes(n)) for n in store.list() if n.startswith("run-")]


def dataset(tmp_path: Path, name: str, src: str, n: int) -> Path:
    lines = (REPO / "data" / "demo" / src).read_text().splitlines()[:n]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def make_job(
    tmp_path: Path, model: Path, output: str, n_train: int = 96, n_eval: int = 24, **extra: str
) -> Path:
    train_p = dataset(tmp_path, "train.jsonl", "train.jsonl", n_train)
    eval_p = dataset(tmp_path, "eval.jsonl", "eval.jsonl", n_eval)
    sections = {
        "job": f'output = "{output}"\nseed = 1',
        "teacher": f'model = "{model}"\ndtype = "float32"\nbatch_tokens = 1024\n'
        "head_chunk = 64\nsamples_per_shard = 16",
        "data": f'train = "{train_p}"\neval = "{eval_p}"\nmax_length = 128\ntruncation = "right"',
        "targets": "k = 8",
        "student": 'init = "teacher-layers"\nlayers = 2',
        "train": f'run_dir = "{tmp_path / "run"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        "batch_size = 8\nlr = 1e-2\nwarmup_steps = 2\ncheckpoint_every = 4\nepochs = 2",
    }
    for key, value in extra.items():
        section, field = key.split("__")
        kept = [x for x in sections[section].splitlines() if not x.startswith(f"{field} =")]
        sections[section] = "\n".join([*kept, f"{field} = {value}"])
    path = tmp_path / "job.toml"
    path.write_text("".join(f"[{s}]\n{body}\n\n" for s, body in sections.items()))
    return path


def dataset_keys(path: Path) -> list[str]:
    return [f"{path.stem}-{i + 1:07d}" for i, line in enumerate(path.read_text().splitlines())]


def stored_keys(url: str, tmp_path: Path) -> list[str]:
    """Every sample key in the shard set that the manifest lists, read back from the bucket."""
    store = open_store(url)
    m = Manifest.from_json(store.read_bytes(MANIFEST), url)
    keys = []
    for s in m.shards:
        local = tmp_path / "check" / url.replace("/", "_") / s.name
        store.download(s.name, local)
        keys += [x.key for x in read_shard(local)]
    return keys


def wait_guest_running(compute: FakeCompute, timeout: float = 120) -> None:
    assert compute.wait_for(
        lambda: any(i.guest_attributes.get("distill/status") == "running" for i in compute.live()),
        timeout,
    ), "no VM reached the teacher"


STUDENT_TEMPLATE = (  # renders differently from SmolLM2's outside the content
    "{% for m in messages %}<s>[{{ m['role'] | upper }}]: {{ m['content'] | trim }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>[ASSISTANT]: {% endif %}"
)


def bpe_tokenizer(vocab_size: int = 2000) -> Any:
    """A byte-level BPE trained offline on pydoc's topics, with :data:`STUDENT_TEMPLATE`: a
    student tokenizer with another vocabulary than the tiny teacher's (SmolLM2's)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = STUDENT_TEMPLATE
    return fast
