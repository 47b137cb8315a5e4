"""The cloud doubles are at least as strict as the services they stand for.

Nothing of distill has run on a real Google Cloud project, so a double that accepts what the
service refuses hides a failure every user would meet. These tests hold the stubs to Google's
own descriptions: the APIs' discovery documents (field names, types, enum values) and what
task.proto states for Batch (``maxRetryCount`` in [0, 10], one lifecycle policy, and how that
policy decides between a retry and a failure).
"""

from __future__ import annotations

import json

import pytest
from fakes.batch import FakeBatch, FakeJob, FakeTask
from fakes.compute import FakeCompute
from fakes.discovery import problems

from distill.cloud.batch import MAX_RETRY_COUNT, RETRY_CODES, BatchApi, BatchSpec
from distill.cloud.errors import CloudError
from distill.cloud.gce import GceBackend
from distill.cloud.spec import VmSpec
from distill.config import load_job
from distill.errors import DistillError

PROJECT = "distill-test"


def batch_spec(**kw) -> BatchSpec:
    fields = dict(
        project=PROJECT,
        job_name="job",
        job_toml='[job]\nname = "job"\n',
        inputs=(("gs://b/run/inputs/x-train.jsonl", "data/train/train.jsonl"),),
        image="us-central1-docker.pkg.dev/p/distill/teacher:t",
        service_account_email="sa@p.iam.gserviceaccount.com",
        zones=("us-central1-a",),
        tasks=2,
        max_retries=3,
        max_run_duration_s=3600,
    )
    return BatchSpec(**{**fields, **kw})


def test_discovery_checks_catch_what_the_apis_refuse():
    good = batch_spec().body()
    assert problems("batch.v1", "Job", good) == []
    bad = json.loads(json.dumps(good))
    bad["taskGroups"][0]["taskSpec"]["maxRetries"] = 3  # no such field
    bad["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] = "SPOTTY"
    bad["taskGroups"][0]["taskSpec"]["maxRunDuration"] = "1h"
    bad["taskGroups"][0]["taskCount"] = "two"
    found = "\n".join(problems("batch.v1", "Job", bad))
    assert "unknown field 'maxRetries'" in found
    assert "'SPOTTY' is not one of" in found
    assert "expected a duration like '3600s', got '1h'" in found
    assert "expected an int64 (decimal string), got 'two'" in found
    # the REST clients send enums by number: in range is fine, out of range is not
    numbered = json.loads(json.dumps(good))
    numbered["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] = 2
    assert problems("batch.v1", "Job", numbered) == []
    numbered["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] = 99
    assert problems("batch.v1", "Job", numbered)


@pytest.fixture
def batch_stub():
    with FakeBatch(project=PROJECT, guest=lambda r, e: (["true"], e), step_s=0.05) as stub:
        yield stub


def _create_raw(stub: FakeBatch, body: dict) -> None:
    """POST a body through the real client, as BatchApi.create does."""
    from google.cloud import batch_v1

    api = BatchApi(PROJECT, endpoint=stub.url)
    job = batch_v1.Job.from_json(json.dumps(body))
    with api._errors():
        api.client.create_job(
            parent=f"projects/{PROJECT}/locations/us-central1", job=job, job_id="job-x"
        )


def test_the_batch_stub_refuses_what_task_proto_refuses(batch_stub):
    body = batch_spec().body()
    spec = body["taskGroups"][0]["taskSpec"]
    spec["maxRetryCount"] = MAX_RETRY_COUNT + 1
    with pytest.raises(CloudError, match=r"valid value range is \[0, 10\]"):
        _create_raw(batch_stub, body)
    spec["maxRetryCount"] = 3
    # the previous body: a RETRY_TASK and a FAIL_TASK policy; Batch supports one
    spec["lifecyclePolicies"] = [
        {"action": "RETRY_TASK", "actionCondition": {"exitCodes": [50001, 75]}},
        {"action": "FAIL_TASK", "actionCondition": {"exitCodes": [3, 50005]}},
    ]
    with pytest.raises(CloudError, match="only one lifecycle policy is supported"):
        _create_raw(batch_stub, body)
    assert not batch_stub.created
    # and ours is taken
    BatchApi(PROJECT, endpoint=batch_stub.url).create(batch_spec())
    assert len(batch_stub.created) == 1


def test_one_lifecycle_policy_decides_retry_or_fail():
    """task.proto: RETRY_TASK retries on a listed code and fails on any other; FAIL_TASK is
    the reverse; with no policy every non-zero code is retried."""
    stub = FakeBatch(project=PROJECT)

    def job(policies: list[dict]) -> FakeJob:
        body = {"taskGroups": [{"taskSpec": {"lifecyclePolicies": policies}}]}
        return FakeJob("j", body, "uid", [FakeTask(0)])

    ours = job(batch_spec().body()["taskGroups"][0]["taskSpec"]["lifecyclePolicies"])
    for code in RETRY_CODES:
        assert stub._action(ours, code) == "RETRY_TASK", code
    for code in (1, 2, 3, 125, 50000, 50004, 50005):  # the teacher's error, a hung task ...
        assert stub._action(ours, code) == "FAIL_TASK", code
    fail = job([{"action": "FAIL_TASK", "actionCondition": {"exitCodes": [3]}}])
    assert stub._action(fail, 3) == "FAIL_TASK" and stub._action(fail, 50001) == "RETRY_TASK"
    assert stub._action(job([]), 3) == "RETRY_TASK"


def test_max_preemptions_over_batchs_limit_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\nname = "j"\n[cloud]\nengine = "batch"\nvms = 2\nmax_preemptions = 11\n')
    with pytest.raises(DistillError, match="cloud.max_preemptions = 11: the Batch engine"):
        load_job(path)
    path.write_text('[job]\nname = "j"\n[cloud]\nmax_preemptions = 11\n')  # one VM: no limit
    assert load_job(path).cloud.max_preemptions == 11
    with pytest.raises(DistillError, match="at most 10 times"):
        batch_spec(max_retries=11)


def test_the_compute_stub_refuses_a_value_outside_the_apis_enum(tmp_path):
    with FakeCompute(project=PROJECT, step_s=0.05) as stub:
        backend = GceBackend(PROJECT, endpoint=stub.url)
        spec = VmSpec(
            project=PROJECT,
            name="distill-teacher-x",
            job_name="x",
            job_toml='[job]\nname = "x"\n',
            image="img",
            service_account_email="sa@p.iam.gserviceaccount.com",
            zones=("us-central1-a",),
        )
        request = spec.insert_request("us-central1-a")
        # compute_v1 holds enums as plain strings: nothing on the client side checks them
        request.instance_resource.scheduling.provisioning_model = "SPOTTY"
        with pytest.raises(CloudError, match="'SPOTTY' is not one of"), backend._errors():
            backend.instances.insert(request)
        assert not stub.inserted
        backend.create(spec, "us-central1-a")  # the request as the tool sends it is taken
        assert len(stub.inserted) == 1
