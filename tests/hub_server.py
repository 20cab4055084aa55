"""A stdlib-only fake of the Hugging Face Hub HTTP API, for offline upload tests.

Uploads cannot be tested against the real Hub in CI (no network, no credentials), and mocking
``huggingface_hub`` internals would not prove that the real client, and the ``push_to_hub`` code paths of
``transformers`` built on it, speak the protocol correctly. This module instead serves the few HTTP routes an
upload touches, on ``127.0.0.1``, and records everything it receives so tests can assert on the exact files
committed and on where the token travelled.

The routes mirror what ``huggingface_hub`` 2.4 sends with ``HF_HUB_DISABLE_XET=1`` (plain git-LFS, no Xet):

* ``POST /api/repos/create`` and ``POST /api/{type}s/{repo}/branch/{branch}``
* ``POST /api/validate-yaml``
* ``POST /api/{type}s/{repo}/preupload/{rev}`` (decides ``regular`` vs ``lfs``)
* ``POST /{prefix}{repo}.git/info/lfs/objects/batch`` and ``PUT /__lfs__/{oid}`` (raw bytes)
* ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON, optionally ``?create_pr=1``)
* ``HEAD``/``GET /{prefix}{repo}/resolve/{rev}/{path}`` and ``GET /api/{type}s/{repo}[/revision/{rev}]``
* ``GET /api/whoami-v2``

Anything else is answered with a 404 JSON body and kept in :attr:`FakeHubServer.unhandled`, so a test can show
which call the fake is missing instead of failing with an opaque client error.

The environment variables that point ``huggingface_hub`` at the fake (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``,
``HF_HOME``) are read once at import time, and ``transformers`` builds its own ``HfApi``, so uploads are run in
a subprocess whose environment is set up front: see :func:`hub_env` and :func:`run_with_hub_env`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


__all__ = [
    "HUB_TOKEN",
    "FakeHubServer",
    "RecordedCommit",
    "RecordedRequest",
    "hub_env",
    "hub_server",
    "run_with_hub_env",
]

# The token the `hub_server` fixture demands on write routes. It looks like a real token so that any code
# validating the "hf_" prefix accepts it, and it is distinctive enough to grep for in recorded traffic.
HUB_TOKEN = "hf_secret"

# Files above this size are sent through git-LFS, like the real Hub's 10 MB rule but small enough that a test
# can cross it cheaply.
DEFAULT_LFS_THRESHOLD = 1_000_000

_REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")

_API_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_WEB_REPO = r"/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+?)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(rf"^{_API_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^{_API_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^{_API_REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("GET", re.compile(rf"^{_API_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(rf"^{_WEB_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/__lfs__/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("HEAD", re.compile(rf"^{_WEB_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^{_WEB_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]
# Routes that only carry a token when the client wants to write; the real Hub rejects them anonymously.
_WRITE_ROUTES = {"create_repo", "preupload", "commit", "create_branch", "lfs_batch", "whoami"}


@dataclass
class RecordedRequest:
    """One HTTP request as the fake received it, kept raw so tests can look for leaked secrets anywhere."""

    method: str
    path: str  # request target as sent, query string included and still percent-encoded
    headers: Message  # case-insensitive: `"authorization" in r.headers` and `r.headers["Authorization"]` both work
    body: bytes
    status: int = 0  # filled in once the fake has answered

    @property
    def route(self) -> str:
        """The decoded path without the query string, which is what assertions usually compare against."""
        return unquote(urlsplit(self.path).path)

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (last value wins), e.g. ``{"create_pr": "1"}``."""
        return {key: values[-1] for key, values in parse_qs(urlsplit(self.path).query).items()}

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


@dataclass
class RecordedCommit:
    """A commit the fake accepted; ``revision`` is the branch or ``refs/pr/N`` it landed on."""

    repo_type: str
    repo_id: str
    revision: str
    oid: str
    summary: str
    description: str
    added: dict[str, bytes]
    deleted: list[str]
    pr_num: int | None = None


@dataclass
class _Entry:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """The oid the preupload endpoint reports: sha256 for LFS files, git blob sha1 otherwise (as the client)."""
        if self.lfs:
            return hashlib.sha256(self.content).hexdigest()
        return _git_blob_sha1(self.content)


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, dict[str, _Entry]] = field(default_factory=dict)  # also holds refs/pr/N
    heads: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, dict[str, _Entry]] = field(default_factory=dict)  # commit oid -> files
    num_prs: int = 0


class _HubError(Exception):
    """Raised inside a handler to answer with the Hub's error shape (JSON body plus ``X-Error-Code``)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHubServer:
    """In-process fake Hub; start it, point a subprocess at :attr:`url`, then inspect what it recorded.

    Recorded state (read it after the upload subprocess exited; all of it is guarded by one lock):

    * :attr:`requests`: every :class:`RecordedRequest`, in arrival order.
    * :attr:`unhandled`: the requests no route matched (answered 404).
    * :attr:`commits`: every accepted :class:`RecordedCommit`.
    * :attr:`lfs_objects`: ``{sha256: bytes}`` received through LFS ``PUT`` and checked against their oid.
    * :attr:`errors`: protocol violations the fake detected (missing or wrong token, bad sha256, unknown LFS oid,
      malformed body, ...), each also answered with a 4xx (500 for a body it could not parse) so the client fails
      loudly. "Not found" answers are normal control flow for clients and are not listed.

    Repos start empty (no ``.gitattributes``) so that :meth:`files` holds exactly what the code under test sent.
    """

    def __init__(
        self,
        *,
        token: str | None = HUB_TOKEN,
        username: str = "user",
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        debug: bool | None = None,
    ):
        self.token = token
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.debug = bool(os.environ.get("FAKE_HUB_DEBUG")) if debug is None else debug
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.commits: list[RecordedCommit] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.errors: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHubServer:
        """Bind an ephemeral port on 127.0.0.1 and serve from a daemon thread, so a hung test cannot block exit."""
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeHubServer is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The value for ``HF_ENDPOINT``; it is also the prefix of every URL the fake hands out."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ inspection helpers

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def revisions(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Branches and ``refs/pr/N`` refs of a repo, sorted."""
        with self._lock:
            return sorted(self._get_repo(repo_type, repo_id).branches)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: bytes}`` at the tip of ``revision``; a copy, so tests may mutate it freely."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if revision not in repo.branches:
                raise KeyError(f"{repo_type} {repo_id} has no revision {revision!r} (has {sorted(repo.branches)})")
            return {path: entry.content for path, entry in repo.branches[revision].items()}

    def lfs_paths(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        """Paths committed as LFS pointers, to check the regular/LFS split the preupload answer asked for."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return {path for path, entry in repo.branches[revision].items() if entry.lfs}

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._get_repo(repo_type, repo_id).heads[revision]

    def request_log(self) -> list[str]:
        """``"METHOD path -> status"`` lines, handy in assertion messages."""
        with self._lock:
            return [str(request) for request in self.requests]

    def token_leaks(self, token: str) -> list[str]:
        """Every place the token shows up other than an ``Authorization: Bearer`` header.

        URLs end up in logs and proxies, and request bodies or committed files end up public, so the token may
        only ever travel in the Authorization header. Both raw and percent-decoded URLs are searched, and
        committed files are searched decoded (the commit body carries them base64-encoded).
        """
        leaks: list[str] = []
        raw = token.encode()
        with self._lock:
            for request in self.requests:
                if token in request.path or token in unquote(request.path):
                    leaks.append(f"URL of {request}")
                for name, value in request.headers.items():
                    if token in value and not (name.lower() == "authorization" and value == f"Bearer {token}"):
                        leaks.append(f"header {name} of {request}")
                if raw in request.body:
                    leaks.append(f"body of {request}")
            for repo in self._repos.values():
                for revision, files in repo.branches.items():
                    for path, entry in files.items():
                        if raw in entry.content:
                            leaks.append(f"file {path} of {repo.repo_id}@{revision}")
            for oid, content in self.lfs_objects.items():
                if raw in content:
                    leaks.append(f"LFS object {oid}")
        return leaks

    def seed_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        revision: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Create a repo (and commit ``files`` to ``revision``) without HTTP, for tests of downloads or updates.

        Returns the new head commit oid.
        """
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create_repo(repo_type, repo_id, private=False)
            if revision not in repo.branches:
                repo.branches[revision] = dict(repo.branches["main"])
            tree = repo.branches[revision]
            for path, content in (files or {}).items():
                tree[path] = _Entry(content, lfs=self._wants_lfs(path, len(content)))
            return self._record_snapshot(repo, revision, f"seed {sorted(files or {})}")

    # ------------------------------------------------------------------ state (call with the lock held)

    def _wants_lfs(self, path: str, size: int) -> bool:
        return size > self.lfs_threshold or path.lower().endswith(_LFS_SUFFIXES)

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _create_repo(self, repo_type: str, repo_id: str, *, private: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
        repo.branches["main"] = {}
        self._repos[(repo_type, repo_id)] = repo
        self._record_snapshot(repo, "main", "initial commit")
        return repo

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository Not Found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _resolve_revision(self, repo: _Repo, revision: str) -> tuple[str, dict[str, _Entry]]:
        """Map a branch, ``refs/pr/N`` or commit oid to ``(commit oid, files)``."""
        if revision in repo.branches:
            return repo.heads[revision], repo.branches[revision]
        if revision in repo.snapshots:
            return revision, repo.snapshots[revision]
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _record_snapshot(self, repo: _Repo, revision: str, salt: str) -> str:
        parent = repo.heads.get(revision, "")
        digest = hashlib.sha1(f"{parent}\n{revision}\n{salt}\n{len(repo.snapshots)}".encode())
        for path, entry in sorted(repo.branches[revision].items()):
            digest.update(f"{path}\0{entry.oid}\n".encode())
        oid = digest.hexdigest()
        repo.heads[revision] = oid
        repo.snapshots[oid] = dict(repo.branches[revision])
        return oid


def _match_route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """Find the handler name and decoded URL parameters; ``type`` is singular (``model``) and always present."""
    for route_method, pattern, name in _ROUTES:
        match = pattern.match(path)
        if route_method == method and match:
            params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            params["type"] = params.get("type", "models").removesuffix("s")
            return name, params
    return None


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to ``_do_<name>`` methods; the bound subclass made in ``start`` sets ``hub``."""

    hub: FakeHubServer
    # HTTP/1.1 so the client's pooled keep-alive connections work; every answer therefore sets Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent so test output stays clean, unless debugging was asked for (then stderr, never stdout)."""
        if self.hub.debug:
            sys.stderr.write(f"[fake-hub] {format % args}\n")

    # ------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        """Read the whole body, chunked or not: httpx streams file uploads with chunked encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        # Always drain the body first: leaving bytes unread would corrupt the next request on this connection.
        body = self._read_body()
        request = RecordedRequest(self.command, self.path, self.headers, body)
        hub = self.hub
        with hub._lock:
            hub.requests.append(request)
        path = urlsplit(self.path).path
        route = _match_route(self.command, path)
        if route is None:
            with hub._lock:
                hub.unhandled.append(request)
            self._send_json(request, 404, {"error": f"fake hub has no route for {self.command} {path}"})
            return
        name, params = route
        try:
            self._check_auth(name)
            with hub._lock:
                getattr(self, f"_do_{name}")(request, params)
        except _HubError as err:
            if err.status >= 400 and err.code not in ("EntryNotFound", "RevisionNotFound", "RepoNotFound"):
                with hub._lock:
                    hub.errors.append(f"{request.method} {request.route}: {err.message}")
            self._send_json(request, err.status, {"error": err.message}, error_code=err.code)
        except OSError:
            raise  # the client went away; there is nobody left to answer
        except Exception as err:  # a malformed request must fail the client, not kill the connection silently
            message = f"{type(err).__name__}: {err}"
            with hub._lock:
                hub.errors.append(f"{request.method} {request.route}: fake hub crashed: {message}")
            self._send_json(request, 500, {"error": message})

    def _check_auth(self, route: str) -> None:
        expected = self.hub.token
        if expected is None:
            return
        header = self.headers.get("Authorization")
        if header is not None and header != f"Bearer {expected}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        if header is None and route in _WRITE_ROUTES:
            raise _HubError(401, "Invalid username or password.")

    def _send(
        self,
        request: RecordedRequest,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        request.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self,
        request: RecordedRequest,
        status: int,
        payload: Any,
        *,
        error_code: str | None = None,
    ) -> None:
        headers = {}
        if error_code is not None:
            headers["X-Error-Code"] = error_code
        if status >= 400 and isinstance(payload, dict) and "error" in payload:
            headers["X-Error-Message"] = str(payload["error"]).encode("ascii", "replace").decode()
        self._send(request, status, json.dumps(payload).encode(), "application/json", headers)

    @staticmethod
    def _json(request: RecordedRequest) -> Any:
        try:
            return json.loads(request.body or b"{}")
        except ValueError as err:
            raise _HubError(400, f"body is not JSON: {err}") from err

    # ------------------------------------------------------------------ routes (hub lock held)

    def _do_create_repo(self, request: RecordedRequest, params: dict[str, str]) -> None:
        payload = self._json(request)
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise _HubError(400, f"invalid repo type {repo_type!r}")
        namespace = payload.get("organization") or self.hub.username
        repo_id = f"{namespace}/{payload['name']}"
        url = self.hub._repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.hub._repos:
            # The real Hub answers 409 with the URL in the body; `exist_ok=True` clients rely on the status only.
            self._send_json(request, 409, {"error": f"You already created this {repo_type} repo", "url": url})
            return
        private = payload.get("private") or payload.get("visibility") in ("private", "protected")
        self.hub._create_repo(repo_type, repo_id, private=bool(private))
        self._send_json(request, 200, {"url": url, "name": repo_id, "id": repo_id})

    def _do_validate_yaml(self, request: RecordedRequest, params: dict[str, str]) -> None:
        self._send_json(request, 200, {})

    def _do_whoami(self, request: RecordedRequest, params: dict[str, str]) -> None:
        name = self.hub.username
        self._send_json(
            request,
            200,
            {
                "type": "user",
                "name": name,
                "fullname": name,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            },
        )

    def _do_create_branch(self, request: RecordedRequest, params: dict[str, str]) -> None:
        repo = self.hub._get_repo(params["type"], params["repo"])
        branch = params["rev"]
        if branch in repo.branches:
            self._send_json(request, 409, {"error": f"Reference already exists: refs/heads/{branch}"})
            return
        start = self._json(request).get("startingPoint") or "main"
        oid, files = self.hub._resolve_revision(repo, start)
        repo.branches[branch] = dict(files)
        repo.heads[branch] = oid
        self._send_json(request, 200, {})

    def _do_repo_info(self, request: RecordedRequest, params: dict[str, str]) -> None:
        repo = self.hub._get_repo(params["type"], params["repo"])
        oid, files = self.hub._resolve_revision(repo, params.get("rev", "main"))
        siblings = [{"rfilename": path, "size": len(entry.content)} for path, entry in sorted(files.items())]
        info = {"id": repo.repo_id, "sha": oid, "private": repo.private, "siblings": siblings}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._send_json(request, 200, info)

    def _do_preupload(self, request: RecordedRequest, params: dict[str, str]) -> None:
        repo = self.hub._get_repo(params["type"], params["repo"])
        _, existing = self.hub._resolve_revision(repo, params["rev"])
        answer = []
        for item in self._json(request).get("files", []):
            path, size = item["path"], int(item["size"])
            mode = "lfs" if self.hub._wants_lfs(path, size) else "regular"
            entry: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in existing:
                # Lets the client skip files that did not change, as against the real Hub.
                entry["oid"] = existing[path].oid
            answer.append(entry)
        self._send_json(request, 200, {"files": answer})

    def _do_lfs_batch(self, request: RecordedRequest, params: dict[str, str]) -> None:
        self.hub._get_repo(params["type"], params["repo"])
        payload = self._json(request)
        if payload.get("operation") != "upload":
            raise _HubError(422, f"unsupported LFS operation {payload.get('operation')!r}")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                # No Authorization header is expected on the PUT, as with the presigned S3 URLs of the real Hub.
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/__lfs__/{oid}"}}
            objects.append(answer)
        self._send(
            request,
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            "application/vnd.git-lfs+json",
        )

    def _do_lfs_put(self, request: RecordedRequest, params: dict[str, str]) -> None:
        actual = hashlib.sha256(request.body).hexdigest()
        if actual != params["oid"]:
            raise _HubError(400, f"LFS upload sha256 {actual} does not match oid {params['oid']}")
        self.hub.lfs_objects[actual] = request.body
        self._send(request, 200, b"", "text/plain")

    def _do_commit(self, request: RecordedRequest, params: dict[str, str]) -> None:
        hub = self.hub
        repo = hub._get_repo(params["type"], params["repo"])
        base_oid, base_files = hub._resolve_revision(repo, params["rev"])
        if params["rev"] not in repo.branches:
            raise _HubError(400, f"cannot commit on a commit oid: {params['rev']}")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != base_oid:
            raise _HubError(412, f"parentCommit {parent} is not the head {base_oid} of {params['rev']}")
        tree = dict(base_files)
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                content = base64.b64decode(value["content"])
                tree[path] = _Entry(content, lfs=False)
                added[path] = content
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in hub.lfs_objects:
                    raise _HubError(422, f"LFS object {oid} for {path} was never uploaded")
                content = hub.lfs_objects[oid]
                if "size" in value and int(value["size"]) != len(content):
                    raise _HubError(422, f"LFS size mismatch for {path}: {value['size']} != {len(content)}")
                tree[path] = _Entry(content, lfs=True)
                added[path] = content
            elif key == "deletedFile":
                if path not in tree:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [name for name in tree if name.startswith(prefix)]
                for name in gone:
                    del tree[name]
                deleted.extend(gone)
            else:
                raise _HubError(400, f"unsupported commit operation {key!r}")
        pr_num = None
        if request.query.get("create_pr") in ("1", "true", "True"):
            repo.num_prs += 1
            pr_num = repo.num_prs
            target = f"refs/pr/{pr_num}"
            repo.heads[target] = base_oid
        else:
            target = params["rev"]
        repo.branches[target] = tree
        oid = hub._record_snapshot(repo, target, header.get("summary", ""))
        hub.commits.append(
            RecordedCommit(
                repo_type=repo.repo_type,
                repo_id=repo.repo_id,
                revision=target,
                oid=oid,
                summary=header.get("summary", ""),
                description=header.get("description", ""),
                added=added,
                deleted=deleted,
                pr_num=pr_num,
            )
        )
        repo_url = hub._repo_url(repo.repo_type, repo.repo_id)
        answer: dict[str, Any] = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{repo_url}/commit/{oid}",
            "hookOutput": "",
        }
        if pr_num is not None:
            answer["pullRequestUrl"] = f"{repo_url}/discussions/{pr_num}"
        self._send_json(request, 200, answer)

    def _do_resolve(self, request: RecordedRequest, params: dict[str, str]) -> None:
        repo = self.hub._get_repo(params["type"], params["repo"])
        oid, files = self.hub._resolve_revision(repo, params["rev"])
        entry = files.get(params["path"])
        if entry is None:
            raise _HubError(404, f"Entry not found: {params['path']}", "EntryNotFound")
        headers = {"ETag": f'"{entry.oid}"', "X-Repo-Commit": oid}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.oid}"'
            headers["X-Linked-Size"] = str(len(entry.content))
        self._send(request, 200, entry.content, "application/octet-stream", headers)


# ---------------------------------------------------------------------- subprocess helpers

_REPO_ROOT = Path(__file__).resolve().parent.parent


def hub_env(server: FakeHubServer, tmp_path: Path | str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process whose ``huggingface_hub``/``transformers`` must talk only to ``server``.

    Every inherited ``HF_*``/``HUGGINGFACE_*``/``TRANSFORMERS_*`` variable is dropped first, because a developer's
    ``HF_TOKEN``, ``HF_HUB_CACHE`` or ``HF_HUB_OFFLINE=1`` (often set for the rest of the test suite) would
    otherwise leak into, or silently short-circuit, the upload under test.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
    }
    hf_home = Path(tmp_path) / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost"]))
    python_path = [str(_REPO_ROOT)]
    if (_REPO_ROOT / "src").is_dir():
        python_path.insert(0, str(_REPO_ROOT / "src"))
    if env.get("PYTHONPATH"):
        python_path.append(env["PYTHONPATH"])
    env.update(
        {
            "HF_ENDPOINT": server.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "PYTHONPATH": os.pathsep.join(python_path),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    return env


def run_with_hub_env(
    server: FakeHubServer,
    code: str,
    tmp_path: Path | str,
    *,
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` (dedented) in ``tmp_path`` with :func:`hub_env`; never raises on a non-zero exit.

    A subprocess is needed because ``huggingface_hub`` reads its endpoint and offline mode at import time, which
    the test process has usually done already. Callers assert on ``returncode`` and show ``stderr`` on failure.
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=str(tmp_path),
        env=hub_env(server, tmp_path, extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def hub_server():
    """A started :class:`FakeHubServer` that requires :data:`HUB_TOKEN` on write routes; stopped afterwards."""
    server = FakeHubServer(token=HUB_TOKEN)
    server.start()
    try:
        yield server
    finally:
        server.stop()
