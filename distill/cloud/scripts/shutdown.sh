#!/bin/bash
# distill teacher VM: on ACPI soft-off (a Spot preemption leaves ~30 s), stop the teacher with
# SIGTERM and 25 s of grace; it abandons the shard in flight and exits 75 (see startup.py).
docker stop --time 25 distill-teacher >/dev/null 2>&1 || true
