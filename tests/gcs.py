"""A local GCS emulator on loopback, so that gs:// paths are tested for real, offline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from google.cloud import storage

BUCKET = "captionflow-test"

# The emulator as `python -m gcp_storage_emulator`, but with each object's `mediaLink`
# percent-encoded as GCS's own is: the emulator puts the raw name in it, and the client
# downloads a loaded object from that link, so `q?.jpg`, `a#b.jpg` or `50%.jpg` were "not
# found" in the emulator only.
EMULATOR = """
import runpy, sys
from urllib.parse import quote
from gcp_storage_emulator.handlers import objects

make = objects._make_object_resource

def quoted(base_url, bucket_name, object_name, *args, **kwargs):
    resource = make(base_url, bucket_name, object_name, *args, **kwargs)
    link = "{}/download/storage/v1/b/{}/o/{}?generation={}&alt=media"
    name = quote(object_name, safe="")
    resource["mediaLink"] = link.format(base_url, bucket_name, name, resource["generation"])
    return resource

objects._make_object_resource = quoted
sys.argv[0] = "gcp_storage_emulator"
runpy.run_module("gcp_storage_emulator", run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """Start the emulator with one bucket; yields its `http://127.0.0.1:PORT` address."""
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            EMULATOR,
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            BUCKET,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def storage_client() -> storage.Client:
    from google.auth.credentials import AnonymousCredentials

    return storage.Client(project="test", credentials=AnonymousCredentials())


def use_emulator(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Point Beam's GCS client at the emulator, anonymously, with no metadata-server probe."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", address)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "test"))
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
