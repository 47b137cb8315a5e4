"""The wheels the GPU check needs that a bare device image lacks, and their installer.

The device machine has Python 3.12 with torch, transformers, triton, accelerate, safetensors
and tokenizers (and what they depend on), nothing else, and cannot download. ``make
gpu-wheels`` (``download``) fetches the rest for CPython 3.12 manylinux x86-64 into
build/gpu-wheels (ignored by git: /build/), with SmolLM2's tokenizer files from the local
conversion cache (3.5 MB; the model's weights stay here), and checks the folder against the
size budget: the whole working tree travels with the call, 64 MiB at most.
bench/gpu/run.sh calls ``install`` on the device: ``pip install --no-index --no-deps --target``
(or, without pip, the wheels unzipped), and the project then runs from the checkout through
PYTHONPATH, without a virtual environment.

    python bench/gpu/wheels.py download [--dest build/gpu-wheels]
    python bench/gpu/wheels.py install --wheels build/gpu-wheels --target build/gpu-site

bitsandbytes ships one CUDA library per CUDA version (43 MB in all): only those of the CUDA
versions a torch 2.11 build may have (12.6, 12.8, 13.0, 13.2; ``--bnb-cuda``) are kept, which
halves it. Stdlib only but ``download``'s requirement check (packaging) and the tokenizer copy
(distill, transformers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MiB = 2**20
# The folder's budget: the working tree (~2.3 MB) travels with it, 64 MiB in all, so keep a
# margin for the tree growing and for untracked files.
MAX_BYTES = 48 * MiB
PYTHON, PLATFORMS = (
    "3.12",
    ("manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64"),
)
# distribution -> (version when constraints.txt does not pin it, why it is carried)
WHEELS: dict[str, tuple[str | None, str]] = {
    "pydantic": (None, "distill.config (the job file)"),
    "pydantic-core": (None, "pydantic"),
    "annotated-types": (None, "pydantic"),
    "typing-inspection": (None, "pydantic"),
    "typing-extensions": ("4.16.0", "pydantic needs >= 4.14; the image's (torch's) may be older"),
    "rich": (None, "distill.teacher.run, distill.student.train (progress, messages)"),
    "markdown-it-py": ("4.3.0", "rich"),
    "mdurl": ("0.1.2", "markdown-it-py"),
    "pygments": ("2.21.0", "rich, pytest"),
    "typer": (None, "distill.cli (distill-ctl cost-estimate)"),
    "click": ("8.5.1", "typer"),
    "shellingham": ("1.5.4", "typer"),
    "annotated-doc": ("0.0.7", "typer"),
    "zstandard": (None, "the default shard codec (packed v2 blocks, zstd)"),
    "pytest": (None, "the CUDA tests (pytest -m cuda)"),
    "pluggy": ("1.7.0", "pytest"),
    "iniconfig": ("2.3.1", "pytest"),
    "liger-kernel": ("0.8.5", "the student KD step's third side (LigerFusedLinearKLDivLoss)"),
    "bitsandbytes": ("0.50.2", "teacher.quantize = int8 / nf4 (tests/test_cuda.py)"),
}
# what the device image has (torch, transformers, triton, accelerate, safetensors, tokenizers
# and their own requirements): a carried wheel may require these without carrying them
IMAGE = {
    "torch",
    "transformers",
    "triton",
    "accelerate",
    "safetensors",
    "tokenizers",
    "numpy",
    "packaging",
    "pyyaml",
    "regex",
    "huggingface-hub",
    "tqdm",
    "filelock",
    "fsspec",
    "jinja2",
    "markupsafe",
    "sympy",
    "networkx",
    "psutil",
    "setuptools",
}
BNB_CUDA = ("126", "128", "130", "132")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """Each carried distribution's version: constraints.txt's pin, else WHEELS'."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pinned[norm(m.group(1))] = m.group(2)
    out = {}
    for dist, (version, _) in WHEELS.items():
        v = pinned.get(norm(dist)) or version
        if v is None:
            raise SystemExit(f"{dist}: no version in constraints.txt nor in WHEELS")
        out[dist] = v
    return out


def download(dest: Path, bnb_cuda: tuple[str, ...], tokenizer: bool = True) -> int:
    """The wheels (and the tokenizer) into ``dest``, slimmed and checked; 1 over the budget."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    specs = [f"{d}=={v}" for d, v in pins().items()]
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps"]
    cmd += ["--python-version", PYTHON, "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    print("$", " ".join(cmd + specs), flush=True)
    subprocess.run(cmd + specs, check=True)
    for whl in dest.glob("bitsandbytes-*.whl"):
        before = whl.stat().st_size
        slim_bitsandbytes(whl, bnb_cuda)
        print(
            f"bitsandbytes: kept CUDA {', '.join(bnb_cuda)}: {before / MiB:.1f} -> "
            f"{whl.stat().st_size / MiB:.1f} MiB"
        )
    check_requirements(dest)
    if tokenizer:
        copy_tokenizer(dest / "tokenizer")
    return report(dest)


def slim_bitsandbytes(whl: Path, keep: tuple[str, ...]) -> None:
    """Rewrite the wheel without the native libraries of other CUDA versions, ROCm and XPU
    (and their RECORD lines); the CPU library and the Python code stay."""
    pattern = re.compile(r"bitsandbytes/libbitsandbytes_(\w+?)\.(so|dll|dylib)$")
    wanted = {f"cuda{v}" for v in keep} | {"cpu"}
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = set()
        for info in src.infolist():
            m = pattern.search(info.filename)
            if m and m.group(1) not in wanted:
                dropped.add(info.filename)
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = (
                    "\n".join(x for x in lines if x.split(",")[0] not in dropped) + "\n"
                ).encode()
            dst.writestr(info, data)
    tmp.replace(whl)


def check_requirements(dest: Path) -> None:
    """Every requirement of a carried wheel (for CPython 3.12 on Linux) is carried too or in
    the device image; say which are not."""
    from packaging.requirements import Requirement

    env = {
        "python_version": PYTHON,
        "python_full_version": PYTHON + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }
    carried = {norm(d) for d in WHEELS}
    missing = []
    for whl in sorted(dest.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if not line.startswith("Requires-Dist:"):
                    continue
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                if norm(req.name) not in carried | IMAGE:
                    missing.append(f"{whl.name}: {req}")
    if missing:
        raise SystemExit(
            "requirements neither carried nor in the image:\n  " + "\n  ".join(missing)
        )
    print("requirements: every one is carried or in the device image")


def copy_tokenizer(dest: Path) -> None:
    """SmolLM2-135M-Instruct's tokenizer files (the conversion cache; converted if needed)."""
    sys.path.insert(0, str(ROOT))
    try:
        from distill.models import resolve_model

        src = resolve_model("builtin:smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001 - any failure: the check falls back to a synthetic one
        print(f"tokenizer: not copied ({e}); the check will use a synthetic byte-level one")
        shutil.rmtree(dest, ignore_errors=True)
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    print(f"tokenizer: SmolLM2's files from {src}")


def report(dest: Path) -> int:
    """WHEELS.txt (what is there, how big, why) and the verdict against MAX_BYTES."""
    why = {norm(d): w for d, (_, w) in WHEELS.items()}
    rows, total = [], 0
    for f in sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "WHEELS.txt"):
        size = f.stat().st_size
        total += size
        dist = norm(f.name.split("-")[0]) if f.suffix == ".whl" else ""
        rows.append(f"{size / MiB:8.2f} MiB  {f.relative_to(dest)}  {why.get(dist, '')}")
    text = "\n".join(rows) + f"\n{total / MiB:8.2f} MiB  total (budget {MAX_BYTES / MiB:.0f} MiB)\n"
    (dest / "WHEELS.txt").write_text(text)
    print(text, end="")
    if total > MAX_BYTES:
        print(
            f"over the budget: {total / MiB:.1f} MiB > {MAX_BYTES / MiB:.0f} MiB", file=sys.stderr
        )
        return 1
    return 0


# --- on the device -----------------------------------------------------------------------------


def install(wheels: Path, target: Path, use_pip: bool = True) -> str:
    """Install every wheel of ``wheels`` into ``target`` (no index, no dependencies); skipped
    when the same wheels are already there (a warm machine). Returns what was done."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels}"
    stamp = target / ".installed.json"
    want = [[f.name, f.stat().st_size] for f in files]
    try:
        if json.loads(stamp.read_text()) == want:
            return f"{len(files)} wheels already in {target}"
    except (OSError, ValueError):
        pass
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if use_pip and importlib.util.find_spec("pip") is not None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade"]
        cmd += ["--disable-pip-version-check", "--no-warn-script-location", "--no-compile", "-q"]
        subprocess.run([*cmd, "--target", str(target), *map(str, files)], check=True)
        how = "pip"
    else:
        for f in files:
            unzip_wheel(f, target)
        how = "unzip (no pip)"
    stamp.write_text(json.dumps(want))
    return f"{len(files)} wheels installed into {target} ({how})"


def unzip_wheel(whl: Path, target: Path) -> None:
    """A wheel's files into ``target`` as an install puts them on sys.path: the archive's
    top level, and ``*.data/purelib`` / ``platlib`` moved up (scripts and headers are left)."""
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            if not name or name.endswith("/"):
                continue
            out = target / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                out.chmod(mode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="make gpu-wheels")
    d.add_argument("--dest", type=Path, default=ROOT / "build" / "gpu-wheels")
    d.add_argument("--bnb-cuda", default=",".join(BNB_CUDA), help="CUDA versions to keep")
    d.add_argument("--no-tokenizer", action="store_true")
    i = sub.add_parser("install", help="bench/gpu/run.sh, on the device")
    i.add_argument("--wheels", type=Path, required=True)
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--no-pip", action="store_true", help="unzip the wheels instead")
    args = p.parse_args(argv)
    if args.cmd == "download":
        keep = tuple(x.strip() for x in args.bnb_cuda.split(",") if x.strip())
        return download(args.dest, keep, not args.no_tokenizer)
    print(install(args.wheels, args.target, not args.no_pip), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
