"""bench/gpu (issue #23), on the CPU: the GPU check's dry run end to end (its JSON, summary and
calibration files, which `distill-ctl cost-estimate --calibration` accepts), a failing or hung
step that loses nothing of the others, and the wheels' installer and slimming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "bench" / "gpu"
sys.path.insert(0, str(GPU))

import wheels  # noqa: E402
from check import FAULT_ENV, STEPS  # noqa: E402


def check(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(GPU / "check.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    return subprocess.run(
        [*cmd, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_dry_run_writes_the_json_the_summary_and_a_calibration_cost_estimate_reads(
    tmp_path, tiny_teacher_dir
):
    out = tmp_path / "out"
    proc = check(out, "--inline", "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in data["steps"].items()} == dict.fromkeys(STEPS, "ok")
    assert data["dry_run"] is True and data["finished"]

    tests = data["steps"]["tests"]["result"]  # every CUDA test collected, and skipped
    assert set(tests["counts"]) == {"skipped"} and tests["counts"]["skipped"] >= 10
    assert all("needs a CUDA device" in t["message"] for t in tests["tests"])
    student = data["steps"]["student"]["result"]
    for hidden in (32, 64):
        row = student[f"hidden_{hidden}"]
        assert row["check"]["ok"] is True  # distill's loss = the seeds' on the same inputs
        assert row["sides"]["ours"]["tokens_per_s"] > 0
        assert "needs CUDA" in row["sides"]["liger"]["skipped"]
    teacher = data["steps"]["teacher"]["result"]
    for name in ("smollm2-135m", "llama-1b"):
        m = teacher[name]
        assert m["ours"]["tokens_per_s"] > 0 and m["naive"]["tokens_per_s"] > 0
        assert m["agreement"]["ok"] and m["flops_per_token"] > 0 and m["ours"]["mfu"] > 0
        assert m["ours_demo_targets"]["targets"]["kind"] == "sample"
    layered = data["steps"]["layered"]["result"]
    assert layered["agreement"]["ids_equal"] == 1.0
    assert layered["layered_256"]["chunks"] > layered["layered_1048576"]["chunks"] == 1

    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith("# GPU check") and "CPU dry run" in summary
    for part in ("## CUDA tests", "## Student KD step", "## Teacher pass", "## Layered pass"):
        assert part in summary
    assert "Same loss on the same inputs: yes" in summary
    names = {p.name for p in out.iterdir()}
    assert names == {
        "gpu_check.json",
        "SUMMARY.md",
        "calibration.json",
        "calibration-1b.json",
        "pytest-cuda.txt",
        "check.log",
    }

    cal = json.loads((out / "calibration.json").read_text())
    assert cal["gpu"] == "cpu (dry run)" and cal["dry_run"] is True
    assert cal["gpu_peak_flops"] > 0 and cal["tokens_per_s"] > 0 and cal["flops_per_token"] > 0
    est = data["steps"]["calibration"]["result"]["demo_job_estimate"]
    assert "scaled to the L4 by the FLOP ratio" in est["mfu_row"]

    # `distill-ctl cost-estimate --calibration` reads the file as written
    from test_cost import make_job
    from typer.testing import CliRunner

    from distill.cli import app

    job = make_job(tmp_path, tiny_teacher_dir)
    res = CliRunner().invoke(
        app,
        ["cost-estimate", "--job", str(job), "--calibration", str(out / "calibration.json")]
        + ["--json", str(tmp_path / "estimate.json")],
    )
    assert res.exit_code == 0, res.output
    e = json.loads((tmp_path / "estimate.json").read_text())
    assert e["calibrated"] and e["calibration_scaled"] and e["calibration_gpu"] == cal["gpu"]
    assert e["mfu"] == pytest.approx(cal["tokens_per_s"] * cal["flops_per_token"] / 1e12)


def test_a_failed_or_stopped_step_loses_nothing_of_the_others(tmp_path):
    """Each step in its own process: one hung (killed at its limit, its partial result kept),
    one failing, and the next still runs; the JSON and the summary say which."""
    out = tmp_path / "out"
    proc = check(
        out,
        "--steps",
        "student,teacher,env",
        "--cap",
        "student=3",
        env={FAULT_ENV: "student:hang,teacher:error"},
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["student"]["status"] == "timeout"
    assert steps["student"]["result"] == {"fault_injected": "hang"}  # written before the hang
    assert steps["teacher"]["status"] == "failed" and "fault injected" in steps["teacher"]["error"]
    assert steps["env"]["status"] == "ok" and steps["env"]["result"]["python"]
    summary = (out / "SUMMARY.md").read_text()
    assert "| student | timeout |" in summary and "| teacher | failed |" in summary
    assert "| env | ok |" in summary


def test_a_failed_measurement_fails_its_step_after_the_others(tmp_path):
    """A step records a failed measurement and goes on; check() then fails it, naming it."""
    import steps

    r = steps.Result(tmp_path / "r.json")
    for where in ("student ours 896", "student liger 896"):
        try:
            raise ValueError(f"boom in {where}")
        except ValueError:
            assert r.failed(where) == f"ValueError: boom in {where}"
    r["hidden_2048"] = {"sides": {"ours": {"tokens_per_s": 1.0}}}  # measured after them
    with pytest.raises(RuntimeError, match=r"2 measurement\(s\) failed \(student ours 896, "):
        r.check()
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["failures"]) == 2 and saved["hidden_2048"]["sides"]["ours"]
    steps.Result(None).check()  # nothing failed: nothing raised


def test_gpu_peaks_match_the_names_torch_reports():
    import steps

    assert steps.gpu_peak("NVIDIA H100 80GB HBM3")[1]["bfloat16"] == 989.4e12  # SXM
    assert steps.gpu_peak("NVIDIA H100 PCIe")[1]["bfloat16"] == 756e12
    assert steps.gpu_peak("NVIDIA H100 NVL")[1]["bfloat16"] == 835e12
    assert steps.gpu_peak("NVIDIA H200")[1]["float32"] == 66.9e12
    from distill.cloud.cost import L4_PEAK_FLOPS

    assert steps.gpu_peak("NVIDIA L4")[1] == L4_PEAK_FLOPS
    assert steps.gpu_peak("NVIDIA A10G") is None


# --- the wheels ---------------------------------------------------------------------------------


def fake_wheel(dest: Path, name: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel of ``files`` (plus its dist-info)."""
    whl = dest / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", record)
    return whl


@pytest.mark.parametrize("use_pip", [True, False])
def test_install_puts_the_wheels_on_a_path_and_skips_a_second_time(tmp_path, use_pip):
    src = tmp_path / "wheels"
    src.mkdir()
    fake_wheel(src, "gpuchk_a", {"gpuchk_a/__init__.py": b"X = 1\n"})
    fake_wheel(src, "gpuchk_b", {"gpuchk_b.data/purelib/gpuchk_b.py": b"Y = 2\n"})
    site = tmp_path / "site"
    assert "2 wheels installed" in wheels.install(src, site, use_pip)
    out = subprocess.run(
        [sys.executable, "-c", "import gpuchk_a, gpuchk_b; print(gpuchk_a.X + gpuchk_b.Y)"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "3"
    assert "already in" in wheels.install(src, site, use_pip)
    assert "no wheels" in wheels.install(tmp_path / "none", site, use_pip)


def test_bitsandbytes_keeps_only_the_wanted_cuda_libraries(tmp_path):
    libs = ["cpu", "cuda118", "cuda126", "cuda128", "cuda130", "rocm70", "xpu2025"]
    files = {f"bitsandbytes/libbitsandbytes_{x}.so": b"\0" * 10 for x in libs}
    whl = fake_wheel(tmp_path, "bitsandbytes", {**files, "bitsandbytes/__init__.py": b""})
    wheels.slim_bitsandbytes(whl, ("126", "130"))
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-1.0.dist-info/RECORD").decode()
    kept = {n.split("_", 1)[1].split(".")[0] for n in names if "libbitsandbytes_" in n}
    assert kept == {"cpu", "cuda126", "cuda130"} and "bitsandbytes/__init__.py" in names
    assert "cuda118" not in record and "rocm70" not in record and "cuda126" in record


def test_every_carried_wheel_has_a_pinned_version():
    pins = wheels.pins()
    assert set(pins) == set(wheels.WHEELS)
    assert pins["pydantic"] and pins["pytest"] and pins["bitsandbytes"]
