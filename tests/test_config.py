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
        assert job.name
        assert job.resolve(job.data.train).is_file(), path


def test_defaults_and_overrides(tmp_path):
    job = load_job(
        write(tmp_path, "[train]\nlr = 1\n"), ["train.batch_size=3", "job.output=gs://b/x"]
    )
    assert job.train.lr == 1.0 and isinstance(job.train.lr, float)
    assert job.train.batch_size == 3
    assert job.output == "gs://b/x"
    assert job.targets.k == 16


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[train]\nlr = "fast"\n', "train.lr: expected float, got str"),
        ("[train]\nbatch_size = 2.5\n", "train.batch_size: expected int"),
        ("[train]\nbatch_size = true\n", "train.batch_size: expected int, got bool"),
        ("[targets]\nk = 0\n", "targets.k must be in [1, 65535], got 0"),
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


def test_sizes_take_bytes_or_units(tmp_path):
    assert load_job(write(tmp_path, "")).train.cache_max_bytes == 2 * 2**30
    path = write(tmp_path, '[train]\ncache_max_bytes = "20GB"\n')
    assert load_job(path).train.cache_max_bytes == 20 * 10**9
    assert load_job(path, ["train.cache_max_bytes=512MiB"]).train.cache_max_bytes == 512 * 2**20
    assert load_job(path, ["train.cache_max_bytes=4096"]).train.cache_max_bytes == 4096
    for bad, needle in (("lots", "must be a size"), ("0", "must be > 0, got 0")):
        with pytest.raises(DistillError, match=f"train.cache_max_bytes {needle}"):
            load_job(path, [f"train.cache_max_bytes={bad}"])


def test_overrides_are_coerced_like_toml_values(tmp_path):
    job = load_job(
        write(tmp_path, ""),
        [
            "train.lr=2",  # an int where a float goes: a float
            "train.packing=true",
            "job.name=bare-string",  # no quotes needed on the command line
            'cloud.zones=["europe-west4-b", "europe-west4-c"]',
            "loss.ce=0.5",
        ],
    )
    assert job.train.lr == 2.0 and isinstance(job.train.lr, float)
    assert job.train.packing is True and job.name == "bare-string"
    assert job.cloud.zones == ["europe-west4-b", "europe-west4-c"] and job.loss.ce == 0.5
    with pytest.raises(DistillError, match="train.batch_size: expected int, got str 'many'"):
        load_job(write(tmp_path, ""), ["train.batch_size=many"])
    with pytest.raises(DistillError, match=r"--set 'train=3': expected section.field=value"):
        load_job(write(tmp_path, ""), ["train=3"])


def test_every_problem_is_one_line_naming_the_file_and_the_field(tmp_path):
    path = write(
        tmp_path,
        '[train]\nlr = -1\noptimizer = "sgd"\n[job]\nseed = "x"\nnme = "a"\n'
        '[cloud]\nzones = ["us-central1-a", "bad"]\npoll_seconds = 0\n',
    )
    with pytest.raises(DistillError) as e:
        load_job(path)
    lines = str(e.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert sorted(line.removeprefix(f"{path}: ") for line in lines) == [
        "cloud.poll_seconds must be > 0, got 0",
        "cloud.zones[1] = 'bad': expected a zone such as us-central1-a",
        "job.seed: expected int, got str 'x'",
        "train.lr must be > 0, got -1",
        "train.optimizer = 'sgd' is not one of: adamw, adamw8bit",
        "unknown field job.nme (known: name, output, seed)",
    ]


def test_unknown_keys_name_the_key_and_the_section(tmp_path):
    for text, needle in (
        ("[cloud]\nzone = 'x'\n", "unknown field cloud.zone (known: budget_usd, engine, hf_token"),
        ("[loss]\nkl = 1\n", "unknown field loss.kl (known: alm, bild, bild_top, ce,"),
        ("name = 'x'\n", "unknown section [name] (known: cloud, data, job, loss,"),
    ):
        with pytest.raises(DistillError) as e:
            load_job(write(tmp_path, text))
        assert needle in str(e.value)


def test_fanout_fields(tmp_path):
    job = load_job(write(tmp_path, '[cloud]\nengine = "batch"\nvms = 100\n'))
    assert (job.cloud.engine, job.cloud.vms) == ("batch", 100)
    for text, needle in (
        ("[cloud]\nvms = 4\n", 'cloud.vms = 4 needs cloud.engine = "batch" (or pass --vms N)'),
        ('[cloud]\nengine = "gke"\n', "cloud.engine = 'gke' is not one of: vm, batch"),
        ('[cloud]\nengine = "batch"\nvms = 0\n', "cloud.vms must be in [1, 1000], got 0"),
    ):
        with pytest.raises(DistillError) as e:
            load_job(write(tmp_path, text))
        assert needle in str(e.value), str(e.value)


def test_choices_come_from_their_one_definition(tmp_path):
    from distill.format.codec import KNOWN, VALUE_MAPS
    from distill.format.spec import KINDS, SAMPLING

    for field, allowed in (
        ("kind", KINDS),
        ("sampling", SAMPLING),
        ("codec", tuple(KNOWN)),
        ("values", VALUE_MAPS),
    ):
        with pytest.raises(DistillError) as e:
            load_job(write(tmp_path, f'[targets]\n{field} = "nope"\n'))
        assert str(e.value).endswith(
            f"targets.{field} = 'nope' is not one of: {', '.join(allowed)}"
        )


def test_jobs_are_immutable_values_and_round_trip(tmp_path):
    from pydantic import ValidationError

    from distill.config import TrainSection, job_from_dict

    job = load_job(write(tmp_path, '[train]\nlr = 1e-3\ncache_max_bytes = "1GiB"\n'))
    with pytest.raises(ValidationError, match="frozen"):
        job.train.lr = 1.0  # type: ignore[misc]
    faster = job.model_copy(update={"train": job.train.model_copy(update={"lr": 0.1})})
    assert (faster.train.lr, job.train.lr, faster.path) == (0.1, 1e-3, job.path)
    assert job_from_dict(job.to_dict(), path=job.path) == job  # teacher-cloud writes this
    with pytest.raises(DistillError, match="train.lr must be > 0, got 0"):
        TrainSection(lr=0)  # a table built in code is checked the same way


def test_the_job_table_reads_as_attributes_of_the_job(tmp_path):
    job = load_job(write(tmp_path, '[job]\nname = "n"\noutput = "gs://b/o"\nseed = 3\n'))
    assert (job.name, job.output, job.seed) == ("n", "gs://b/o", 3)
    assert job.to_dict()["job"] == {"name": "n", "output": "gs://b/o", "seed": 3}
    with pytest.raises(DistillError, match=r"unknown section \[job_table\]"):
        load_job(write(tmp_path, '[job_table]\nname = "n"\n'))  # the file says [job]
