"""The worker image and the Dataflow target stay in step with the launcher."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pinned(package: str) -> str:
    text = (REPO / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE).group(1)


def test_worker_image_uses_the_launchers_beam_and_torch_and_beams_boot() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG BEAM_VERSION={pinned('apache-beam')}" in dockerfile
    assert "FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}" in dockerfile
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in dockerfile
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
    assert "-c constraints.txt" in dockerfile and "grep '^torch==' constraints.txt" in dockerfile


def test_make_run_dataflow_builds_the_job_offline() -> None:
    done = subprocess.run(
        [
            "make",
            "-s",
            "run-dataflow",
            "DRY_RUN=1",
            "PROJECT=test-project",
            "BUCKET=captionflow-ci",
            "GPU_COUNT=2",
            f"PY={sys.executable}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_make_run_dataflow_sets_threads_engines_and_mps_for_the_gpu() -> None:
    def command(*settings: str) -> str:
        return subprocess.run(
            ["make", "-n", "run-dataflow", "PROJECT=p", "BUCKET=b", *settings, "PY=python"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    default = command("GPU_COUNT=2")
    assert "--engine shared --model-copies 2" in default  # one engine per GPU
    assert "--number_of_worker_harness_threads 4" in default
    assert "--engine-batch-size 256" in default
    assert "use_nvidia_mps" not in default
    shared_gpu = command("GPU_COUNT=1", "ENGINES=2", "MPS=1")
    assert "--model-copies 2" in shared_gpu
    assert "count:1;install-nvidia-driver;use_nvidia_mps" in shared_gpu


def test_the_lavis_worker_image_uses_the_launchers_beam_and_the_lavis_environment() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile.lavis").read_text()
    requirements = (REPO / "requirements-lavis.txt").read_text()
    beam = pinned("apache-beam")
    assert f"ARG BEAM_VERSION={beam}" in dockerfile
    assert f"apache-beam[gcp]=={beam}" in requirements.splitlines()
    assert "salesforce-lavis==1.0.2" in requirements.splitlines()
    assert "pip install -r requirements-lavis.txt" in dockerfile
    assert "pip install --no-deps ." in dockerfile  # never captionflow's transformers>=4.45
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
    makefile = (REPO / "Makefile").read_text()
    assert "-r requirements-lavis.txt" in makefile
