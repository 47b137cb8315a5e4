"""The stop signal as the cloud code sees it.

The signal itself (SIGTERM, GCE's ``instance/preempted`` metadata, exit code 75) belongs to
the teacher, which must not import the cloud package: see :mod:`distill.teacher.stop`. The VM
agent and the controller use these names from here.
"""

from distill.teacher.stop import (
    EXIT_PREEMPTED,
    WATCH_ENV,
    in_main_thread,
    metadata_get,
    metadata_host,
)

__all__ = ["EXIT_PREEMPTED", "WATCH_ENV", "in_main_thread", "metadata_get", "metadata_host"]
