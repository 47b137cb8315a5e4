"""The GPU check (issue #23): everything a first GPU should tell us, in one call.

On a lent GPU machine, from a bare Python with torch (README "GPU check")::

    bash bench/gpu/run.sh       # installs build/gpu-wheels, then runs this with --out $OUT

Here, the CPU dry run the test suite runs (tests/test_gpu_check.py)::

    python bench/gpu/check.py --device cpu --tiny --inline --out /tmp/gpu-check

Steps, in order, each in its own process under a time limit cut from one global budget
(``--budget``), so that a step that fails, hangs or runs out of memory loses nothing of the
others: ``env`` (versions, the GPU and its peak FLOP/s), ``tests`` (``pytest -m cuda
tests/test_cuda.py``), ``student``, ``teacher``, ``layered`` and ``calibration`` (see
bench/gpu/steps.py). After every step ``gpu_check.json`` and ``SUMMARY.md`` are rewritten in
``--out``, so a run cut short still leaves the numbers of the steps that ran.

Written to ``--out`` (at most 8 files): gpu_check.json, SUMMARY.md, calibration.json (and
calibration-1b.json) for ``distill-ctl cost-estimate --calibration``, pytest-cuda.txt and
check.log (every step's own output).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import summary  # noqa: E402

STEPS = ("env", "tests", "student", "teacher", "layered", "calibration")
# most seconds a step may take, and the least worth starting it with; a step's limit is
# min(its cap, what the budget leaves after the later steps' floors)
CAPS = {"env": 60, "tests": 150, "student": 110, "teacher": 130, "layered": 110, "calibration": 60}
FLOORS = {"env": 10, "tests": 30, "student": 25, "teacher": 40, "layered": 35, "calibration": 15}
NEEDS = {"calibration": ("env", "teacher"), "teacher": ("env",)}  # results a step reads
DEFAULT_TOKENIZER = ROOT / "build" / "gpu-wheels" / "tokenizer"
FAULT_ENV = "DISTILL_GPU_CHECK_FAULT"  # test hook: "STEP:error" or "STEP:hang" (comma list)
RECORD_ENV = "DISTILL_GPU_CHECK_RECORD"  # tests/test_cuda.py appends its measurements there


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Check:
    """The run: its results, the files in ``--out``, the budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="distill-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.log: TextIO = open(self.out / "check.log", "a", buffering=1)  # noqa: SIM115
        tok = args.tokenizer or os.environ.get("DISTILL_GPU_TOKENIZER") or DEFAULT_TOKENIZER
        self.tokenizer = str(tok) if Path(tok).is_dir() else None
        self.caps = {**CAPS, **dict(parse_kv(args.cap))}
        self.results: dict[str, Any] = {
            "check": "distill GPU check (bench/gpu/check.py, issue #23)",
            "schema": 1,
            "started": now(),
            "finished": None,
            "device": args.device,
            "dry_run": args.tiny,
            "budget_s": args.budget,
            "isolated": not args.inline,
            "tokenizer": self.tokenizer,
            "argv": sys.argv[1:],
            "code": code_version(),
            "steps": {name: {"status": "pending"} for name in args.steps},
        }

    def say(self, text: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write(self) -> None:
        """gpu_check.json and SUMMARY.md, as they stand (after every step)."""
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")
        try:
            text = summary.render(self.results)
        except Exception:  # the JSON has the numbers; a summary bug must not stop the run
            text = "# GPU check\n\nSUMMARY.md failed:\n\n```\n" + traceback.format_exc() + "```\n"
        (self.out / "SUMMARY.md").write_text(text)

    def left(self, name: str) -> float:
        """Seconds the budget leaves this step after the later steps' floors."""
        later = self.args.steps[self.args.steps.index(name) + 1 :]
        return self.deadline - time.time() - sum(FLOORS.get(s, 10) for s in later)

    def run(self) -> int:
        self.say(
            f"GPU check: steps {', '.join(self.args.steps)}, device {self.args.device}, "
            f"budget {self.args.budget:.0f} s, work {self.work}, out {self.out}"
        )
        self.write()
        for name in self.args.steps:
            left = self.left(name)
            limit = min(self.caps.get(name, 120), left)
            entry = self.results["steps"][name]
            if left < FLOORS.get(name, 10):
                entry.update(status="skipped", why=f"no time left ({left:.0f} s)")
                self.say(f"{name}: skipped, {entry['why']}")
                self.write()
                continue
            self.say(f"{name}: starting (limit {limit:.0f} s)")
            t = time.time()
            entry.update(status="running", limit_s=round(limit))
            self.write()
            if name == "tests":
                status, result, error = self.run_tests(limit)
            elif self.args.inline:
                status, result, error = self.run_inline(name, limit)
            else:
                status, result, error = self.run_isolated(name, limit)
            entry.update(status=status, seconds=round(time.time() - t, 1), result=result)
            if error:
                entry["error"] = error
            self.say(
                f"{name}: {status} in {entry['seconds']} s" + (f": {last(error)}" if error else "")
            )
            self.write()
        self.results["finished"] = now()
        self.results["seconds"] = round(time.time() - self.t0, 1)
        self.write()
        text = (self.out / "SUMMARY.md").read_text()
        print("\n" + text, flush=True)
        self.log.close()
        if not self.args.keep_work and not self.args.work:
            shutil.rmtree(self.work, ignore_errors=True)
        bad = [n for n, e in self.results["steps"].items() if e["status"] in ("failed", "timeout")]
        return 1 if bad else 0

    # --- the ways to run a step ----------------------------------------------------------------

    def params(self, name: str, limit: float) -> dict[str, Any]:
        inputs = {
            need: (self.results["steps"].get(need) or {}).get("result") or {}
            for need in NEEDS.get(name, ())
        }
        return {
            "device": self.args.device,
            "tiny": self.args.tiny,
            "work": str(self.work),
            "out": str(self.out),
            "tokenizer": self.tokenizer,
            "deadline": time.time() + limit,
            "inputs": inputs,
        }

    def run_isolated(self, name: str, limit: float) -> tuple[str, dict[str, Any], str | None]:
        """The step in a child process (its output into check.log), killed at ``limit``."""
        params = self.work / f"params-{name}.json"
        params.write_text(json.dumps(self.params(name, limit)))
        result = self.work / f"result-{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", name]
        cmd += ["--params", str(params), "--result", str(result)]
        self.log.write(f"\n===== step {name}: {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
        data = read_json(result)
        error = data.pop("error", None) if isinstance(data, dict) else None
        if status == "timeout":
            error = f"stopped after {limit:.0f} s (the results so far are kept)"
        elif status == "failed" and not error:
            error = f"exit {rc}" + (f" (signal {-rc})" if rc is not None and rc < 0 else "")
        return status, data or {}, error

    def run_inline(self, name: str, limit: float) -> tuple[str, dict[str, Any], str | None]:
        """The step in this process (the dry run: one import of torch for all steps); the
        limit is only the step's own deadline."""
        import steps

        p = steps.Params(**self.params(name, limit))
        r = steps.Result(self.work / f"result-{name}.json")
        try:
            inject_fault(name, r)
            steps.STEPS[name](p, r)
        except Exception:
            return "failed", r.data, traceback.format_exc(limit=8)[-3000:]
        return "ok", r.data, None

    def run_tests(self, limit: float) -> tuple[str, dict[str, Any], str | None]:
        """``pytest -m cuda tests/test_cuda.py`` (its output: pytest-cuda.txt); the outcome of
        every test from its junit XML, or from the -v lines if it was stopped."""
        junit = self.work / "junit.xml"
        record = self.work / "records.jsonl"
        for f in (junit, record):
            f.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-v", "-rA"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
        env = {**os.environ, RECORD_ENV: str(record)}
        if self.tokenizer:
            env["DISTILL_GPU_TOKENIZER"] = self.tokenizer
        out_txt = self.out / "pytest-cuda.txt"
        with open(out_txt, "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        tests = parse_junit(junit) if junit.is_file() else parse_verbose(out_txt.read_text())
        records = []
        for line in read_lines(record):
            with contextlib.suppress(ValueError):  # a line cut short by a kill
                records.append(json.loads(line))
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        result = {"command": " ".join(cmd[1:]), "counts": counts, "tests": tests}
        result["records"] = records
        if rc is None:
            return "timeout", result, f"pytest stopped after {limit:.0f} s"
        # 0: all passed or skipped; 5: nothing collected
        if rc in (0, 5):
            return "ok", result, None
        failed = [t["name"] for t in tests if t["outcome"] in ("failed", "error")]
        return (
            "failed",
            result,
            f"pytest exit {rc}: " + (", ".join(failed) or tail(out_txt.read_text())),
        )


# --- helpers -----------------------------------------------------------------------------------


def code_version() -> dict[str, str | None]:
    """The commit (where the checkout has its .git) and a hash of the code that ran
    (distill/, bench/, tests/: recompute it on a commit to match a result to it)."""
    h = hashlib.sha256()
    for f in sorted(p for d in ("distill", "bench", "tests") for p in (ROOT / d).rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    try:
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        commit = git.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"commit": commit, "py_sha256": h.hexdigest()[:16]}


def parse_kv(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for item in items or []:
        k, _, v = item.partition("=")
        out.append((k, float(v)))
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_lines(path: Path) -> list[str]:
    try:
        return [x for x in path.read_text().splitlines() if x.strip()]
    except OSError:
        return []


def tail(text: str | None, n: int = 300) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def last(text: str | None) -> str:
    """The last line of an error (a traceback's exception)."""
    lines = (text or "").strip().splitlines()
    return lines[-1][:300] if lines else ""


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Each test case of a junit XML: name, outcome, seconds, and a skip/failure message."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                outcome = {"skipped": "skipped", "failure": "failed", "error": "error"}[child.tag]
                message = child.get("message") or (child.text or "")[:500]
        out.append(
            {
                "name": case.get("name", "?"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message.strip()[:500],
            }
        )
    return out


VERBOSE = re.compile(r"^\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)


def parse_verbose(text: str) -> list[dict[str, Any]]:
    """Outcomes from pytest -v lines (a run stopped before it wrote its junit XML)."""
    return [
        {"name": n, "outcome": o.lower(), "seconds": None, "message": ""}
        for n, o in VERBOSE.findall(text)
    ]


def inject_fault(name: str, r: Any) -> None:
    """Test hook (FAULT_ENV="STEP:error,STEP:hang"): fail or hang this step after it has
    recorded something, to check that the others' results survive."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        step, _, kind = item.partition(":")
        if step != name:
            continue
        r["fault_injected"] = kind
        if kind == "hang":
            time.sleep(3600)
        raise RuntimeError(f"fault injected into step {name} ({FAULT_ENV})")


def run_step(name: str, params: Path, result: Path) -> int:
    """A child process: one step, its result (and any error) in ``result``."""
    import steps

    r = steps.Result(result)
    try:
        inject_fault(name, r)
        steps.STEPS[name](steps.Params.load(params), r)
    except BaseException:
        r["error"] = traceback.format_exc(limit=8)[-3000:]
        traceback.print_exc()
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="where the results go ($OUT on the device machine)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="the dry run's sizes (seconds on a CPU)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all the steps")
    p.add_argument(
        "--steps",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(STEPS),
        help=f"comma list, in order (default: {','.join(STEPS)})",
    )
    p.add_argument("--inline", action="store_true", help="run the steps in this process")
    p.add_argument(
        "--tokenizer",
        default=None,
        help=f"SmolLM2's tokenizer files (default: $DISTILL_GPU_TOKENIZER or {DEFAULT_TOKENIZER}"
        " if there; else a synthetic byte-level tokenizer)",
    )
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--cap", action="append", default=[], help="STEP=SECONDS: another step cap")
    p.add_argument("--run-step", help=argparse.SUPPRESS)
    p.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.run_step:
        if not args.out:
            p.error("--out is required")
        unknown = [s for s in args.steps if s not in STEPS]
        if unknown:
            p.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
        if "env" not in args.steps and any("env" in NEEDS.get(s, ()) for s in args.steps):
            args.steps.insert(0, "env")  # the GPU's peak FLOP/s: the MFU's denominator
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.run_step:
        return run_step(args.run_step, args.params, args.result)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
