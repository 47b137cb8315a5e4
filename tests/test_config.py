"""Job files: validation names the field; overrides apply; sizes parse."""

from pathlib import Path

import pytest

from distill.config import load_job, parse_bytes
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_shipped_jobs_load():
    for path in (REPO / "jobs").glob("*.toml"):
        job = load_job(path)
        assert job.job.name
        assert job.resolve(job.data.train).is_file(), path


def test_defaults_and_overrides(tmp_path):
    job = load_job(
        write(tmp_path, "[train]\nlr = 1\n"), ["train.batch_size=3", "job.output=gs://b/x"]
    )
    assert job.train.lr == 1.0 and isinstance(job.train.lr, float)
    assert job.train.batch_size == 3
    assert job.job.output == "gs://b/x"
    assert job.targets.k == 16


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[train]\nlr = "fast"\n', "train.lr: expected float, got str"),
        ("[train]\nbatch_size = 2.5\n", "train.batch_size: expected int"),
        ("[train]\nbatch_size = true\n", "train.batch_size: expected int, got bool"),
        ("[targets]\nk = 0\n", "targets.k must be > 0"),
        ('[targets]\nkind = "bogus"\n', "targets.kind = 'bogus' is not one of"),
        ("[train]\nlearning_rate = 1\n", "unknown field train.learning_rate"),
        ("[trainer]\nlr = 1\n", "unknown section [trainer]"),
        ("train = 3\n", "[train] must be a table"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_job_files_name_the_field(tmp_path, text, needle):
    with pytest.raises(DistillError) as e:
        load_job(write(tmp_path, text))
    assert needle in str(e.value)
    assert "job.toml" in str(e.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(DistillError, match="section.field=value"):
        load_job(write(tmp_path, ""), ["lr=3"])
    with pytest.raises(DistillError, match="not found"):
        load_job(tmp_path / "nope.toml")


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes(7) == 7
    with pytest.raises(DistillError):
        parse_bytes("lots")


def test_student_layer_selection():
    from distill.student.init import select_layers

    assert select_layers(30, 12, "ends") == [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29]
    assert select_layers(30, 8, "spaced") == [0, 4, 8, 12, 17, 21, 25, 29]
    assert select_layers(4, 9) == [0, 1, 2, 3]
    assert select_layers(5, 1, "spaced") == [0] and select_layers(5, 1, "ends") == [4]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[loss]\ntemperature = 0\n", "loss.temperature must be > 0"),
        ("[loss]\nforward_kl = 0\nce = 0\n", "at least one of"),
        ("[loss]\njsd_beta = 1.5\njsd = 1\n", "loss.jsd_beta must be in (0, 1)"),
        (
            '[targets]\nkind = "topk"\n[loss]\nbild = 1\nbild_top = 32\n',
            "loss.bild_top = 32 > targets.k = 16",
        ),
        ("[loss]\nbild = 1\n", 'loss.bild needs targets.kind = "topk"'),
    ],
)
def test_bad_loss_section(tmp_path, text, needle):
    with pytest.raises(DistillError) as e:
        load_job(write(tmp_path, text))
    assert needle in str(e.value)
