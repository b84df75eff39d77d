"""A small Hugging Face Hub on localhost, for testing the real huggingface_hub client against it.

It speaks the part of the Hub's HTTP API that FrankenMoE uses: model search (with ``expand``
fields and Link-header paging), model info (with file metadata), file trees, whoami, and file
HEAD/GET under ``/{repo}/resolve/{revision}/{path}`` with the headers the client relies on
(``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size``) and Range requests. Errors carry
the Hub's ``X-Error-Code`` headers, so the client raises the same exceptions as against the Hub.
It also speaks the Hub's write API, so that huggingface_hub's uploads work against it unmodified:
repo creation, branch creation, README metadata validation, preupload, the LFS batch API with its
upload and verify actions, and NDJSON commits; committed files are served back like any other.
Tokens carry a role (read, write, or fine-grained scopes) that every write checks.
It can also misbehave on purpose: drop a connection in the middle of a file, close connections
before answering, hold requests without answering, or fail an LFS upload as storage does when the
client's connection stalls. Two more fixtures stand for a Hub that does
not answer at all, on loopback only: a port where nothing listens, and one whose queue is full, so
that a connection to it never opens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

from app.core.hub import HubConfig

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".gguf", ".png")
# Above this size the Hub stores any file in LFS, whatever its name.
LFS_MIN_SIZE = 10 * 2**20


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def safetensors_parameters(content: bytes) -> dict[str, int]:
    """Parameter counts per dtype from a safetensors header, as the Hub reports them."""
    (header_size,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8 : 8 + header_size])
    counts: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= dim
        counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + count
    return counts


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: str | bool = False
    private: bool = False
    granted_tokens: set[str] = field(default_factory=set)
    downloads: int = 0
    likes: int = 0
    trending: int = 0
    license: str | None = "apache-2.0"
    pipeline_tag: str | None = "text-generation"
    # "peft" for LoRA adapters; the Hub lists the library among the tags, so `filter=peft` finds it.
    library_name: str = "transformers"
    extra_tags: tuple[str, ...] = ()
    last_modified: datetime = field(default_factory=lambda: datetime(2024, 1, 1, tzinfo=UTC))

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)

    @property
    def tags(self) -> list[str]:
        tags = [self.library_name, "safetensors", *self.extra_tags]
        if self.pipeline_tag:
            tags.append(self.pipeline_tag)
        if self.license:
            tags.append(f"license:{self.license}")
        return tags


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def file_etag(path: str, content: bytes) -> str:
    # As on the Hub: LFS files are named by their sha256, regular files by their git blob id.
    return hashlib.sha256(content).hexdigest() if is_lfs(path) else git_blob_id(content)


class HubServer:
    """The server and its state; tests add repos, tokens and misbehaviour, and read ``requests``."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.tokens: dict[str, str] = {}  # token -> user name
        self.token_roles: dict[str, str] = {}  # token -> "read", "write" or "fineGrained"
        self.token_scopes: dict[str, list[dict[str, Any]]] = {}  # fine-grained token -> its scoped permissions
        self.orgs: dict[str, dict[str, str]] = {}  # user -> {organisation: role in it}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded through the LFS API
        self.accepted_uploads: list[str] = []  # sha256 of each LFS upload the server took in, in order
        self._upload_faults: dict[str, int] = {}  # sha256 -> how many more uploads of it fail
        self._upload_drops: dict[str, int] = {}  # sha256 -> how many more uploads of it lose their connection
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        self._drops: dict[str, list[int]] = {}  # file path -> [bytes to send before dropping, times]
        self._connections_to_refuse = 0
        self._throttles: dict[str, tuple[int, float]] = {}  # file path -> (piece size, pause per piece)
        self._holds: dict[str, threading.Event] = {}  # path prefix -> set to let its requests be answered
        self.request_held = threading.Event()  # set once a held request has arrived
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        for release in self._holds.values():
            release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------ content

    def add_model(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main", **settings: Any) -> str:
        """Add a repo (or a commit to it) whose ``ref`` points at ``files``; returns the commit sha."""
        repo = self.repos.get(repo_id) or HubRepo(repo_id)
        for key, value in settings.items():
            setattr(repo, key, value)
        sha = hashlib.sha1(f"{repo_id}:{len(repo.commits)}:{sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        self.repos[repo_id] = repo
        return sha

    def add_token(
        self,
        token: str,
        user: str,
        role: str = "read",
        *,
        orgs: dict[str, str] | None = None,
        scoped: list[dict[str, Any]] | None = None,
    ) -> None:
        """A token of ``user`` with a role: "read", "write", or "fineGrained" with ``scoped`` permissions
        (the Hub's layout: ``[{"entity": {"type": "user", "name": ...}, "permissions": ["repo.write"]}]``);
        ``orgs`` names the user's organisations and the user's role in each."""
        self.tokens[token] = user
        self.token_roles[token] = role
        if scoped is not None:
            self.token_scopes[token] = scoped
        if orgs is not None:
            self.orgs[user] = dict(orgs)

    def can_write(self, token: str | None, namespace: str) -> bool:
        """Whether ``token`` may create and change repos under ``namespace``, as the Hub decides it."""
        if token not in self.tokens:
            return False
        user = self.tokens[token]
        member = namespace == user or self.orgs.get(user, {}).get(namespace) in ("write", "admin", "contributor")
        role = self.token_roles.get(token, "read")
        if role == "fineGrained":
            return member and any(
                scope.get("entity", {}).get("name") == namespace and "repo.write" in scope.get("permissions", [])
                for scope in self.token_scopes.get(token, [])
            )
        return member and role in ("write", "admin")

    def lfs_uploads(self) -> list[str]:
        """The sha256 of every LFS object whose upload the server took in (failed ones left out), in order."""
        return list(self.accepted_uploads)

    # ------------------------------------------------------------------ misbehaviour

    def drop_connection(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` downloads of ``path`` send ``after_bytes`` bytes and hang up."""
        self._drops[path] = [after_bytes, times]

    def fail_upload(self, sha256: str, times: int = 1) -> None:
        """The next ``times`` LFS uploads of the object ``sha256`` fail as cloud storage fails them when the
        client's connection stalls mid-upload: a 400 ``RequestTimeout``, which clients do not retry."""
        self._upload_faults[sha256] = times

    def drop_upload(self, sha256: str, times: int = 1) -> None:
        """The next ``times`` LFS uploads of the object ``sha256`` lose their connection: the server takes
        the bytes in and hangs up without an answer, as when a network drops mid-upload."""
        self._upload_drops[sha256] = times

    def take_upload_fault(self, sha256: str, faults: dict[str, int] | None = None) -> bool:
        faults = self._upload_faults if faults is None else faults
        with self.lock:
            left = faults.get(sha256, 0)
            if left <= 0:
                return False
            faults[sha256] = left - 1
            return True

    def take_upload_drop(self, sha256: str) -> bool:
        return self.take_upload_fault(sha256, self._upload_drops)

    def throttle(self, path: str, piece: int, pause_s: float) -> None:
        """Serve ``path`` slowly, ``piece`` bytes at a time, so that a test can act mid-file."""
        self._throttles[path] = (piece, pause_s)

    def refuse_connections(self, count: int) -> None:
        """Close the next ``count`` connections without answering."""
        self._connections_to_refuse = count

    def hold(self, path_prefix: str) -> threading.Event:
        """Requests whose path starts with ``path_prefix`` get no answer; their connections close,
        still unanswered, when the returned event is set (or the server stops)."""
        release = threading.Event()
        self._holds[path_prefix] = release
        return release

    @property
    def refusals_left(self) -> int:
        with self.lock:
            return self._connections_to_refuse

    def take_hold(self, path: str) -> threading.Event | None:
        return next((release for prefix, release in self._holds.items() if path.startswith(prefix)), None)

    def take_drop(self, path: str) -> int | None:
        with self.lock:
            drop = self._drops.get(path)
            if not drop or drop[1] <= 0:
                return None
            drop[1] -= 1
            return drop[0]

    def take_refusal(self) -> bool:
        with self.lock:
            if self._connections_to_refuse <= 0:
                return False
            self._connections_to_refuse -= 1
            return True

    def file_requests(self, path: str, method: str = "GET") -> list[str | None]:
        """The Range headers of every ``method`` request for a repo file ending in ``path``."""
        return [rng for m, p, rng in self.requests if m == method and "/resolve/" in p and p.endswith("/" + path)]


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra = extra or {}
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: test output is for failures

        # -------------------------------------------------------------- plumbing

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_POST(self) -> None:
            self._write_request()

        def do_PUT(self) -> None:
            self._write_request()

        def _write_request(self) -> None:
            """The write API: every answer is JSON except an LFS upload's, which has no body."""
            split = urlsplit(self.path)
            path = unquote(split.path)
            hub.requests.append((self.command, path, None))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "PUT" and hub.take_upload_drop(path.rsplit("/", 1)[-1]):
                self.close_connection = True
                return
            release = hub.take_hold(path)
            if release is not None:  # held as reads are: no answer, the connection closed when released
                hub.request_held.set()
                release.wait()
                self.close_connection = True
                return
            try:
                self._send_json(*self._write(split.path, body))
            except _HubError as error:
                self._send_error(error)

        def _write(self, raw_path: str, body: bytes) -> tuple[Any, dict[str, str]]:
            parts = [unquote(p) for p in raw_path.split("/")[1:]]
            if self.command == "PUT" and parts[:1] == ["lfs-upload"] and len(parts) == 2:
                return self._lfs_upload(parts[1], body), {}
            if self.command != "POST":
                raise _HubError(405, None, "Method Not Allowed")
            if parts[:1] == ["lfs-verify"] and len(parts) == 2:
                if parts[1] not in hub.lfs_objects:
                    raise _HubError(404, None, f"LFS object {parts[1]} was not uploaded")
                return {"ok": True}, {}
            if parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body)), {}
            if parts == ["api", "validate-yaml"]:
                return {"errors": [], "warnings": []}, {}
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "branch":
                return self._create_branch(f"{parts[2]}/{parts[3]}", parts[5], json.loads(body or b"{}")), {}
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                repo = self._writable_repo(f"{parts[2]}/{parts[3]}")
                if parts[4] == "preupload":
                    return self._preupload(repo, parts[5], json.loads(body)), {}
                return self._commit_files(repo, parts[5], body), {}
            if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                repo = self._writable_repo(f"{parts[0]}/{parts[1].removesuffix('.git')}")
                return self._lfs_batch(repo, json.loads(body)), {}
            raise _HubError(404, None, "Not Found")

        def _writable_repo(self, repo_id: str) -> HubRepo:
            repo = self._repo(repo_id)
            if not hub.can_write(self._token(), repo_id.split("/")[0]):
                raise _HubError(403, None, f"You don't have the rights to write to {repo_id}")
            return repo

        def _create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
            token = self._token()
            if token not in hub.tokens:
                raise _HubError(401, None, "Invalid credentials in Authorization header")
            namespace = payload.get("organization") or hub.tokens[token]
            repo_id = f"{namespace}/{payload['name']}"
            if not hub.can_write(token, namespace):
                raise _HubError(403, None, f"You don't have the rights to create a model under {namespace}")
            if repo_id in hub.repos:
                # As on the Hub, the conflict names the existing repo's address.
                raise _HubError(409, None, "You already created this model repo", extra={"url": f"{hub.url}/{repo_id}"})
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            # As on the Hub, a new repo starts with one commit holding .gitattributes.
            hub.add_model(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            repo = hub.repos[repo_id]
            repo.private, repo.license, repo.pipeline_tag = private, None, None
            repo.granted_tokens.add(token)
            return {"url": f"{hub.url}/{repo_id}", "name": repo_id}

        def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> dict[str, Any]:
            repo = self._writable_repo(repo_id)
            if branch in repo.refs:
                raise _HubError(409, None, f"Branch {branch} already exists")
            repo.refs[branch] = self._commit(repo, payload.get("startingPoint") or "main")
            return {}

        def _preupload(self, repo: HubRepo, revision: str, payload: dict[str, Any]) -> dict[str, Any]:
            sha = repo.resolve(revision)
            existing = repo.commits[sha] if sha is not None else {}
            files = []
            for entry in payload["files"]:
                name = entry["path"]
                lfs = is_lfs(name) or int(entry["size"]) > LFS_MIN_SIZE
                found = existing.get(name)
                oid = None if found is None else (hashlib.sha256(found).hexdigest() if lfs else git_blob_id(found))
                mode = "lfs" if lfs else "regular"
                files.append({"path": name, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return {"files": files, "commitOid": sha}

        def _lfs_batch(self, repo: HubRepo, payload: dict[str, Any]) -> dict[str, Any]:
            objects = []
            for entry in payload["objects"]:
                oid, size = entry["oid"], int(entry["size"])
                answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub.lfs_objects:  # an object the server has needs no upload: this makes resuming work
                    answer["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-upload/{oid}", "header": {}},
                        "verify": {"href": f"{hub.url}/lfs-verify/{oid}", "header": {}},
                    }
                objects.append(answer)
            return {"transfer": "basic", "objects": objects}

        def _lfs_upload(self, oid: str, body: bytes) -> dict[str, Any]:
            if hub.take_upload_fault(oid):
                raise _HubError(
                    400,
                    "RequestTimeout",
                    "Your socket connection to the server was not read from or written to within the timeout period.",
                )
            if hashlib.sha256(body).hexdigest() != oid:
                raise _HubError(400, None, f"the uploaded content does not hash to {oid}")
            hub.lfs_objects[oid] = body
            hub.accepted_uploads.append(oid)
            return {}

        def _commit_files(self, repo: HubRepo, revision: str, body: bytes) -> dict[str, Any]:
            parent = self._commit(repo, revision)
            files = dict(repo.commits[parent])
            summary = ""
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    summary = value.get("summary", "")
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    content = hub.lfs_objects.get(value["oid"])
                    if content is None:
                        raise _HubError(400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = content
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            sha = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{summary}:{sorted(files)}".encode()).hexdigest()
            repo.commits[sha] = files
            repo.refs[revision] = sha
            return {"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

        def _serve(self, head: bool) -> None:
            if hub.take_refusal():
                self.close_connection = True
                return
            split = urlsplit(self.path)
            hub.requests.append((self.command, unquote(split.path), self.headers.get("Range")))
            release = hub.take_hold(unquote(split.path))
            if release is not None:
                hub.request_held.set()
                release.wait()
                self.close_connection = True  # the client has long given up: nothing to answer
                return
            query = parse_qs(split.query)
            try:
                if split.path.startswith("/api/"):
                    self._send_json(*self._api(split.path, query))
                else:
                    self._resolve(split.path, head)
            except _HubError as error:
                self._send_error(error)

        def _send_json(self, data: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _send_error(self, error: _HubError) -> None:
            body = json.dumps({"error": error.message, **error.extra}).encode()
            self.send_response(error.status)
            self.send_header("Content-Type", "application/json")
            if error.code:
                self.send_header("X-Error-Code", error.code)
            self.send_header("X-Error-Message", error.message)
            for key, value in error.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None

        # -------------------------------------------------------------- API

        def _repo(self, repo_id: str) -> HubRepo:
            repo = hub.repos.get(repo_id)
            token = self._token()
            if repo is None or (
                repo.private and token not in repo.granted_tokens and not hub.can_write(token, repo_id.split("/")[0])
            ):
                raise _HubError(401, "RepoNotFound", "Repository not found")
            return repo

        def _commit(self, repo: HubRepo, revision: str) -> str:
            sha = repo.resolve(revision)
            if sha is None:
                raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return sha

        def _api(self, path: str, query: dict[str, list[str]]) -> tuple[Any, dict[str, str]]:
            """The JSON answer and extra headers (the Link to the next page of a listing)."""
            parts = [unquote(p) for p in path.split("/")[2:]]
            if parts == ["whoami-v2"]:
                return self._whoami(), {}
            if parts == ["models"]:
                return self._list(query)
            if len(parts) >= 3 and parts[0] == "models":
                repo = self._repo(f"{parts[1]}/{parts[2]}")
                rest = parts[3:]
                if not rest:
                    return self._info(repo, "main", query), {}
                if rest[0] == "revision" and len(rest) == 2:
                    return self._info(repo, rest[1], query), {}
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo, rest[1]), {}
            raise _HubError(404, None, "Not Found")

        def _whoami(self) -> dict[str, Any]:
            token = self._token()
            if token not in hub.tokens:
                raise _HubError(401, None, "Invalid credentials in Authorization header")
            user = hub.tokens[token]
            access: dict[str, Any] = {"displayName": "test token", "role": hub.token_roles.get(token, "read")}
            if token in hub.token_scopes:
                access["fineGrained"] = {"global": [], "scoped": hub.token_scopes[token], "canReadGatedRepos": False}
            return {
                "type": "user",
                "name": user,
                "orgs": [{"name": org, "roleInOrg": role} for org, role in hub.orgs.get(user, {}).items()],
                "auth": {"type": "access_token", "accessToken": access},
            }

        def _fields(self, repo: HubRepo, sha: str, blobs: bool) -> dict[str, Any]:
            files = repo.commits[sha]
            parameters: dict[str, int] = {}
            index = files.get("model.safetensors.index.json")
            # Like the Hub, count the weights once: the indexed shards when there is an index.
            # Top-level files only: checkpoints in subfolders are not the model's weights.
            counted = set(json.loads(index)["weight_map"].values()) if index else {n for n in files if "/" not in n}
            for name, content in files.items():
                if name.endswith(".safetensors") and name in counted:
                    for dtype, count in safetensors_parameters(content).items():
                        parameters[dtype] = parameters.get(dtype, 0) + count
            siblings = []
            for name, content in sorted(files.items()):
                sibling: dict[str, Any] = {"rfilename": name}
                if blobs:
                    sibling.update(size=len(content), blobId=git_blob_id(content))
                    if is_lfs(name):
                        sibling["lfs"] = {
                            "size": len(content),
                            "sha256": file_etag(name, content),
                            "pointerSize": 134,
                        }
                siblings.append(sibling)
            return {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": sha,
                "lastModified": repo.last_modified.isoformat().replace("+00:00", "Z"),
                "createdAt": "2023-06-01T00:00:00.000Z",
                "private": repo.private,
                "gated": repo.gated,
                "disabled": False,
                "downloads": repo.downloads,
                "likes": repo.likes,
                "trendingScore": repo.trending,
                "tags": repo.tags,
                "pipeline_tag": repo.pipeline_tag,
                "library_name": repo.library_name,
                "cardData": {"license": repo.license} if repo.license else {},
                "siblings": siblings,
                "safetensors": {"parameters": parameters, "total": sum(parameters.values())} if parameters else None,
                "usedStorage": sum(len(c) for c in files.values()),
            }

        def _info(self, repo: HubRepo, revision: str, query: dict[str, list[str]]) -> dict[str, Any]:
            sha = self._commit(repo, revision)
            data = self._fields(repo, sha, blobs=query.get("blobs", ["False"])[0].lower() == "true")
            expand = query.get("expand")
            return {k: v for k, v in data.items() if k in {"_id", "id", *expand}} if expand else data

        def _tree(self, repo: HubRepo, revision: str) -> list[dict[str, Any]]:
            files = repo.commits[self._commit(repo, revision)]
            entries = []
            for name, content in sorted(files.items()):
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": git_blob_id(content),
                    "size": len(content),
                    "path": name,
                }
                if is_lfs(name):
                    entry["lfs"] = {"oid": file_etag(name, content), "size": len(content), "pointerSize": 134}
                entries.append(entry)
            return entries

        def _list(self, query: dict[str, list[str]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
            words = " ".join(query.get("search", [])).lower().split()
            filters = query.get("filter", [])
            libraries = query.get("library", [])
            found = [
                repo
                for repo in hub.repos.values()
                if not repo.private
                and all(w in repo.repo_id.lower() for w in words)
                and all(f in repo.tags or f == repo.pipeline_tag for f in filters)
                and all(library == repo.library_name for library in libraries)
            ]
            sort = query.get("sort", [None])[0]
            keys = {"downloads": "downloads", "likes": "likes", "trendingScore": "trending"}
            if sort == "lastModified":
                found.sort(key=lambda r: r.last_modified, reverse=True)
            elif sort in keys:
                found.sort(key=lambda r: getattr(r, keys[sort]), reverse=True)
            offset = int(query.get("cursor", ["0"])[0])
            limit = int(query.get("limit", ["1000"])[0])
            page = found[offset : offset + limit]
            expand = query.get("expand")
            items = []
            for repo in page:
                data = self._fields(repo, repo.refs["main"], blobs=False)
                keep = {"_id", "id", *expand} if expand else {"_id", "id", "likes", "downloads", "tags", "pipeline_tag"}
                items.append({k: v for k, v in data.items() if k in keep})
            headers = {}
            if offset + limit < len(found):
                next_query = {k: v for k, v in query.items() if k != "cursor"} | {"cursor": [str(offset + limit)]}
                headers["Link"] = f'<{hub.url}/api/models?{urlencode(next_query, doseq=True)}>; rel="next"'
            return items, headers

        # -------------------------------------------------------------- files

        def _resolve(self, path: str, head: bool) -> None:
            parts = path.split("/")
            # /{org}/{name}/resolve/{revision}/{file path...}
            if len(parts) < 6 or parts[3] != "resolve":
                raise _HubError(404, None, "Not Found")
            repo = self._repo(f"{unquote(parts[1])}/{unquote(parts[2])}")
            if repo.gated:
                token = self._token()
                if token is None or token not in hub.tokens:
                    raise _HubError(
                        401,
                        "GatedRepo",
                        f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in.",
                    )
                if token not in repo.granted_tokens:
                    raise _HubError(
                        403,
                        "GatedRepo",
                        f"Access to model {repo.repo_id} is restricted and you are not in the authorized "
                        f"list. Visit {hub.url}/{repo.repo_id} to ask for access.",
                    )
            sha = self._commit(repo, unquote(parts[4]))
            name = unquote("/".join(parts[5:]))
            content = repo.commits[sha].get(name)
            if content is None:
                raise _HubError(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": sha})
            etag = file_etag(name, content)
            start = 0
            range_header = self.headers.get("Range")
            if range_header and not head:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
            body = content[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{etag}"')
            if is_lfs(name):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            cut = hub.take_drop(name)
            if cut is not None and cut < len(body):
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            piece, pause_s = hub._throttles.get(name, (len(body) or 1, 0.0))
            for start in range(0, len(body), piece):
                self.wfile.write(body[start : start + piece])
                self.wfile.flush()
                time.sleep(pause_s)

    return Handler


# ---------------------------------------------------------------------- pytest fixtures
# Test modules load these with `pytest_plugins = ["tests.hubserver"]`.

REPO_EXTRAS = {"README.md": b"# A tiny test model\n", ".gitattributes": b"*.safetensors filter=lfs\n"}


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_hub_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The files of the tiny models the Hub serves, generated once per session by the engine's fixture."""
    from tests.models import make_tiny_model

    root = tmp_path_factory.mktemp("hub-models")
    return {
        "llama-a": _folder_files(make_tiny_model(root / "a", "llama", seed=0)),
        "llama-b": _folder_files(make_tiny_model(root / "b", "llama", seed=1)),
        "llama-wide": _folder_files(make_tiny_model(root / "wide", "llama", seed=2, hidden_size=48)),
        "llama-sharded": _folder_files(make_tiny_model(root / "sharded", "llama", seed=3, max_shard_size="40KB")),
    }


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home for this test: cache and token files, no HF_TOKEN, not offline,
    no proxy, and no answer of the reachability probe remembered from an earlier test (ports get reused).

    huggingface_hub reads these settings into ``constants`` at import time, so both the
    environment (for subprocesses) and ``constants`` (for this process) are pointed here.
    """
    from huggingface_hub import constants

    from app.core.hub import forget_reachability

    forget_reachability()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf-home"
    cache = home / "hub"
    token_path = home / "token"
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_path))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home


@pytest.fixture
def hub(tiny_hub_files: dict[str, dict[str, bytes]]) -> Iterator[HubServer]:
    """A running local Hub with a handful of tiny models, a gated one and a pickle-only one."""
    server = HubServer()
    files = tiny_hub_files
    server.add_model(
        "acme/tiny-llama-instruct",
        files["llama-a"] | REPO_EXTRAS,
        downloads=500,
        likes=3,
        last_modified=datetime(2024, 3, 1, tzinfo=UTC),
    )
    server.add_model("acme/tiny-llama-instruct", files["llama-b"] | REPO_EXTRAS, ref="v1")
    server.add_model(
        "acme/tiny-llama-chat",
        files["llama-b"] | REPO_EXTRAS,
        downloads=200,
        likes=40,
        license="llama3",
        last_modified=datetime(2024, 6, 1, tzinfo=UTC),
    )
    sharded = files["llama-sharded"] | REPO_EXTRAS
    # A second copy of the weights under another name, as many repos carry: a merge needs only one.
    sharded["consolidated.safetensors"] = files["llama-a"]["model.safetensors"]
    server.add_model("acme/tiny-llama-sharded", sharded, downloads=100, likes=1)
    server.add_model("acme/tiny-llama-wide", files["llama-wide"] | REPO_EXTRAS, downloads=50)
    server.add_model("acme/gated-llama", files["llama-a"] | REPO_EXTRAS, gated="manual", downloads=10)
    server.add_model("acme/secret-llama", files["llama-a"], private=True)
    server.add_model(
        "acme/pickle-llama",
        {"config.json": files["llama-a"]["config.json"], "pytorch_model.bin": b"\x80\x04pickle"},
        downloads=5,
    )
    server.add_model("acme/llama-embeddings", files["llama-a"], pipeline_tag="feature-extraction", downloads=900)
    server.start()
    yield server
    server.stop()


ADAPTER_BASE = "acme/tiny-llama-instruct"
# What else adapter repos often carry: a pickle copy of the weights, training state and checkpoints.
ADAPTER_EXTRAS = {
    "adapter_model.bin": b"\x80\x04pickle",
    "training_args.bin": b"\x80\x04pickle",
    "optimizer.pt": b"\x80\x04pickle",
}


@pytest.fixture(scope="session")
def tiny_hub_adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_hub_files: dict[str, dict[str, bytes]]
) -> dict[str, dict[str, bytes]]:
    """The files of LoRA adapters of the Hub's ``acme/tiny-llama-instruct``, made once with peft."""
    from tests.lora_adapters import make_adapter

    root = tmp_path_factory.mktemp("hub-adapters")
    base = root / "base"
    base.mkdir()
    for name, content in tiny_hub_files["llama-a"].items():
        (base / name).write_bytes(content)
    target_modules = ["gate_proj", "up_proj", "down_proj", "q_proj"]
    adapter = make_adapter(root / "lora", base, r=8, lora_alpha=16, target_modules=target_modules).folder
    files = _folder_files(adapter)
    # As published: the adapter names its base by Hub id, not by the folder it was trained from.
    settings = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps(settings | {"base_model_name_or_path": ADAPTER_BASE}).encode()
    return {"lora": files}


@pytest.fixture
def adapter_hub(hub: HubServer, tiny_hub_adapters: dict[str, dict[str, bytes]]) -> HubServer:
    """The local Hub with PEFT adapter repos added (library ``peft``, tagged with their base as the Hub does)."""
    lora = tiny_hub_adapters["lora"]
    peft_settings: dict[str, Any] = {
        "library_name": "peft",
        "extra_tags": ("lora", f"base_model:adapter:{ADAPTER_BASE}", f"base_model:{ADAPTER_BASE}"),
    }
    tokenizer = {name: content for name, content in hub_files_of(hub, ADAPTER_BASE).items() if "token" in name}
    checkpoint = {"checkpoint-10/adapter_model.safetensors": lora["adapter_model.safetensors"]}
    hub.add_model(
        "acme/tiny-adapter-chat",
        lora | tokenizer | ADAPTER_EXTRAS | checkpoint,
        downloads=70,
        **peft_settings,
    )
    hub.add_model("acme/tiny-adapter-plain", lora, downloads=60, **peft_settings)
    hub.add_model(
        "acme/tiny-adapter-pickle",
        {"adapter_config.json": lora["adapter_config.json"], "adapter_model.bin": b"\x80\x04pickle"},
        downloads=40,
        **peft_settings,
    )
    return hub


def hub_files_of(hub: HubServer, repo_id: str) -> dict[str, bytes]:
    repo = hub.repos[repo_id]
    return repo.commits[repo.refs["main"]]


@pytest.fixture
def hub_config(hub: HubServer, hub_home: Path) -> HubConfig:
    """Settings for the local Hub, with quick retries so failure tests stay fast."""
    return HubConfig(endpoint=hub.url, cache_dir=hub_home / "hub", max_retries=2, retry_delay_s=0.01, max_workers=2)


@pytest.fixture
def publish_config(hub, hub_home, hub_config, monkeypatch) -> HubConfig:
    """The local Hub with a write token for alice (also a writer in acme-org) and a read token for bob,
    as tests/publishing.py names them.

    The client uploads through LFS: the local Hub offers no Xet storage (huggingface_hub reads the
    setting at import, hence both the environment and ``constants``).
    """
    from huggingface_hub import constants

    from tests.publishing import READ_TOKEN, WRITE_TOKEN

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.add_token(WRITE_TOKEN, "alice", "write", orgs={"acme-org": "write"})
    hub.add_token(READ_TOKEN, "bob", "read")
    hub.repos["acme/gated-llama"].granted_tokens.add(WRITE_TOKEN)
    return hub_config


@pytest.fixture
def closed_endpoint() -> str:
    """A Hub address on loopback where nothing listens: every connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A Hub address on loopback where a connection never opens, as on a network that drops packets.

    The listener takes no connections off its queue, and one connection fills a queue of length 0:
    the kernel then ignores every new attempt, which waits until its own timeout.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    filler.close()
    listener.close()
