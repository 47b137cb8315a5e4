"""Stand-ins for the services distill talks to, for tests only (none ships in the wheel).

- :mod:`fakes.compute`: the Compute Engine REST API (no emulator exists), with a metadata
  server per VM; its VMs run the real startup logic as local process groups.
- :mod:`fakes.batch`: the Google Cloud Batch REST API; its tasks run the real task entrypoint.
- :mod:`fakes.hub`: the Hugging Face Hub (model info, tree, resolve downloads via a "CDN",
  gated / private repos, tokens) for the real ``huggingface_hub`` client and transformers.
- :mod:`fakes.secrets`: Google Secret Manager's REST ``versions:access``.
- :mod:`fakes.http`: the JSON-over-HTTP plumbing the REST stubs share.
- :mod:`fakes.discovery`: request bodies checked against the APIs' discovery documents.
- :mod:`fakes.guest`: what a stub "machine" is: a process group, its console, its stop.
- :mod:`fakes.vm_tools`: the COS host commands (``docker``, ``cos-extensions``, ...) the real
  startup script calls.
- :mod:`fakes.memory`: in-memory :class:`~distill.cloud.backend.Backend` and Batch API doubles
  for the controllers' logic, without HTTP or subprocesses.

Every double is at least as strict as its service where Google documents a rule: a request
the service refuses is refused here too (tests/test_cloud_doubles.py).
"""
