"""A local stand-in for Google Secret Manager's REST API (v1): accessing a secret version.

Only ``GET /v1/projects/{project}/secrets/{secret}/versions/{version}:access`` (``version``: a
number or ``latest``, the most recently created version whatever its state), answering as the
real API does:

- ``{"name": "projects/{project NUMBER}/secrets/{secret}/versions/{n}", "payload": {"data":
  base64, "dataCrc32c": "<int64 as a string>"}}``: the name carries the project's number even
  when the request named its id, as Google answers;
- errors in Google's JSON shape ``{"error": {"code", "message", "status"}}``, with Google's
  messages: no ``Authorization`` header: 401 ``UNAUTHENTICATED``; a caller not granted
  ``secretmanager.versions.access`` on the secret (the secret's ``accessors``, or the project's:
  :meth:`FakeSecretManager.grant_project`): 403 ``PERMISSION_DENIED`` "... (or it may not exist)"
  -- IAM is checked first, so a caller with no project-level grant gets 403, not 404, for a
  secret that does not exist; an unknown secret, or one with no versions: 404 ``NOT_FOUND``
  "Secret [...] not found or has no versions."; an unknown version: 404 "Secret Version [...]
  not found."; a DISABLED or DESTROYED version (:meth:`FakeSecretManager.set_state`): 400
  ``FAILED_PRECONDITION`` "Secret Version [...] is in DISABLED state.".

Any bearer token is a valid identity (no OAuth check); ``accessors=None`` grants every caller.
Requests are recorded in ``requests`` (method, path) and ``calls`` (:class:`SecretCall`, with
the token).
"""

from __future__ import annotations

import base64
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import google_crc32c

from fakes.http import JsonApi, Served, StubError

STATUS = {
    400: "FAILED_PRECONDITION",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    503: "UNAVAILABLE",
}
UNAUTHENTICATED = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


class GoogleError(StubError):
    """An error in Google's JSON shape."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code or STATUS[status]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "status": self.code}}


@dataclass
class SecretVersion:
    data: bytes
    state: str = "ENABLED"  # or DISABLED, DESTROYED


@dataclass
class Secret:
    versions: list[SecretVersion] = field(default_factory=list)  # version n at index n - 1
    accessors: set[str] | None = None  # None: every caller


@dataclass(frozen=True)
class SecretCall:
    """One access request: the name as asked, the bearer token (None: no header)."""

    name: str
    token: str | None
    status: int


class FakeSecretManager(Served):
    """The fake: secrets described in Python, served on a free local port (``url``; a client
    calls ``{url}/v1/projects/...``). Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self) -> None:
        self.projects: dict[str, str] = {}  # project id -> its number
        self.project_accessors: dict[str, set[str]] = {}  # project number -> tokens
        self.secrets: dict[tuple[str, str], Secret] = {}  # (project number, secret) -> secret
        self.requests: list[tuple[str, str]] = []  # (method, path), by JsonApi
        self.calls: list[SecretCall] = []
        self.failures = 0  # the next N requests answer 503
        self.url = ""
        self.handler = _SecretsHandler
        self._lock = threading.Lock()

    # --- describing secrets -------------------------------------------------------------------

    def add_project(self, project_id: str, number: str | None = None) -> str:
        """A project (made on first use otherwise); returns its number."""
        with self._lock:
            if project_id not in self.projects:
                self.projects[project_id] = number or str(100000000000 + 7919 * len(self.projects))
            return self.projects[project_id]

    def add_secret(
        self, project: str, name: str, value: bytes | str, accessors: set[str] | None = None
    ) -> int:
        """A secret (or a new version of it, with these ``accessors``); returns the version."""
        number = self.add_project(project)
        data = value.encode() if isinstance(value, str) else value
        with self._lock:
            secret = self.secrets.setdefault((number, name), Secret())
            secret.accessors = set(accessors) if accessors is not None else None
            secret.versions.append(SecretVersion(data))
            return len(secret.versions)

    def set_state(self, project: str, name: str, version: int, state: str) -> None:
        """``ENABLED``, ``DISABLED`` or ``DESTROYED`` (which drops the data, as on Google)."""
        if state not in ("ENABLED", "DISABLED", "DESTROYED"):
            raise ValueError(state)
        v = self.secrets[(self.projects[project], name)].versions[version - 1]
        if v.state == "DESTROYED":
            raise ValueError("a destroyed version stays destroyed")
        v.state = state
        if state == "DESTROYED":
            v.data = b""

    def grant_project(self, project: str, token: str) -> None:
        """``token`` may access every secret of ``project`` (a project-level role binding)."""
        number = self.add_project(project)
        self.project_accessors.setdefault(number, set()).add(token)

    # --- the API's logic ----------------------------------------------------------------------

    def access(self, project: str, name: str, version: str, token: str | None) -> dict[str, Any]:
        asked = f"projects/{project}/secrets/{name}/versions/{version}"
        if token is None:
            raise GoogleError(401, UNAUTHENTICATED)
        with self._lock:
            number = self.projects.get(project) or (project if project.isdigit() else None)
            secret = self.secrets.get((number, name)) if number else None
            allowed = token in self.project_accessors.get(number or "", set()) or (
                secret is not None and (secret.accessors is None or token in secret.accessors)
            )
            if not allowed:
                msg = (
                    f"Permission 'secretmanager.versions.access' denied for resource '{asked}' "
                    "(or it may not exist)."
                )
                raise GoogleError(403, msg)
            base = f"projects/{number}/secrets/{name}"
            if secret is None or not secret.versions:
                raise GoogleError(404, f"Secret [{base}] not found or has no versions.")
            if version == "latest":
                n = len(secret.versions)
            elif re.fullmatch(r"[1-9][0-9]*", version):
                n = int(version)
            else:
                raise GoogleError(404, f"Secret Version [{base}/versions/{version}] not found.")
            if n > len(secret.versions):
                raise GoogleError(404, f"Secret Version [{base}/versions/{n}] not found.")
            v = secret.versions[n - 1]
            if v.state != "ENABLED":
                raise GoogleError(
                    400, f"Secret Version [{base}/versions/{n}] is in {v.state} state."
                )
            crc = google_crc32c.value(v.data)
            payload = {"data": base64.b64encode(v.data).decode(), "dataCrc32c": str(crc)}
            return {"name": f"{base}/versions/{n}", "payload": payload}


_ROUTES = [
    (
        "GET",
        re.compile(
            r"^/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/]+)"
            r"/versions/(?P<version>[^/:]+):access$"
        ),
        "access",
    )
]


class _SecretsHandler(JsonApi):
    stub: FakeSecretManager
    routes = _ROUTES

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        if status == 503:
            return GoogleError(503, "The service is currently unavailable.").body()
        return GoogleError(status, message).body()

    def h_access(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        name = f"projects/{p['project']}/secrets/{p['secret']}/versions/{p['version']}"
        try:
            if auth is not None and (not auth.startswith("Bearer ") or not token):
                raise GoogleError(401, INVALID_CREDENTIALS)
            out = self.stub.access(p["project"], p["secret"], p["version"], token)
        except GoogleError as e:
            self.stub.calls.append(SecretCall(name, token, e.status))
            raise
        self.stub.calls.append(SecretCall(name, token, 200))
        return 200, out
