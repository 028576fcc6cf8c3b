"""The Dataflow job, built offline (`--dry_run True --no_auth`): what would be submitted."""

from __future__ import annotations

import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.runners.dataflow.internal import apiclient

from captionflow.cli import prepare
from captionflow.pipelines import build_caption_pipeline

IMAGE = "us-docker.pkg.dev/p/captionflow/worker:1.0"
ACCELERATOR = "type:nvidia-l4;count:2;install-nvidia-driver"
DATAFLOW = [
    "--runner",
    "DataflowRunner",
    "--dry_run",
    "True",
    "--no_auth",
    "--project",
    "test-project",
    "--region",
    "us-central1",
    "--temp_location",
    "gs://captionflow-temp/tmp",
    "--sdk_location",
    "container",
    "--sdk_container_image",
    IMAGE,
    "--machine_type",
    "g2-standard-24",
    f"--dataflow_service_options=worker_accelerator={ACCELERATOR}",
]
JOB = [
    "run",
    "--input",
    "gs://captionflow-data/dataset.txt",
    "--output",
    "gs://captionflow-data/out",
    "--model-copies",
    "2",
]
GROUP_BY_KEY = "beam:transform:group_by_key:v1"


@pytest.fixture(scope="module")
def submitted() -> tuple[object, object]:
    """`(runner, job environment proto)` of the job as it would be submitted."""
    config, options = prepare([*JOB, *DATAFLOW])
    pipeline = beam.Pipeline(options=options)
    build_caption_pipeline(pipeline, config)
    result = pipeline.run()
    assert result.state == "DONE"
    runner = pipeline.runner
    environment = apiclient.Environment(
        packages=[],
        options=runner.job.options,
        environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url="gs://captionflow-temp/pipeline.pb",
        proto_pipeline=runner.proto_pipeline,
    ).proto
    return runner, environment


def test_the_captionflow_command_builds_the_dataflow_job_offline() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionflow", *JOB, *DATAFLOW],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_workers_run_the_custom_container(submitted: tuple) -> None:
    runner, _ = submitted
    images = {
        beam.portability.api.beam_runner_api_pb2.DockerPayload.FromString(
            env.payload
        ).container_image
        for env in runner.proto_pipeline.components.environments.values()
    }
    assert images == {IMAGE}


def test_workers_get_the_gpus_and_machine_type(submitted: tuple) -> None:
    _, environment = submitted
    assert f"worker_accelerator={ACCELERATOR}" in environment.service_options
    assert environment.worker_pools[0].machine_type == "g2-standard-24"


def test_caption_and_rank_steps_are_there_without_shuffling_decoded_images(
    submitted: tuple,
) -> None:
    runner, _ = submitted
    transforms = runner.proto_pipeline.components.transforms
    names = [t.unique_name for t in transforms.values()]
    assert any(n.startswith("CaptionImages/CaptionAndRank/CaptionAndRank") for n in names)
    assert any(n.startswith("CaptionImages/Load/Decode") for n in names)
    shuffles = [
        t.unique_name
        for t in transforms.values()
        if t.spec.urn == GROUP_BY_KEY and t.unique_name.startswith("CaptionImages/")
    ]
    assert shuffles == []
    assert any(t.spec.urn == GROUP_BY_KEY for t in transforms.values())  # paths are shuffled


def test_an_accelerator_hint_applies_to_the_inference_steps_only() -> None:
    hint = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    config, options = prepare([*JOB, "--accelerator-hint", hint, *DATAFLOW])
    pipeline = beam.Pipeline(options=options)
    build_caption_pipeline(pipeline, config)
    pipeline.run()
    components = pipeline.runner.proto_pipeline.components

    def accelerator(name_prefix: str) -> set[bytes]:
        return {
            components.environments[t.environment_id].resource_hints.get(
                "beam:resources:accelerator:v1", b""
            )
            for t in components.transforms.values()
            if t.unique_name.startswith(name_prefix) and t.environment_id
        }

    assert accelerator("CaptionImages/") == {hint.encode()}
    assert accelerator("ReadImagePaths/") == {b""}
