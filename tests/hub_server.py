"""A small Hub-compatible HTTP server on 127.0.0.1, for round trips through huggingface_hub's real client.

No server on the package registries accepts uploads offline, so this implements only the endpoints that
huggingface_hub 2.x, transformers 5.x and datasets 5.x call to push and pull a model or dataset repo (dataset repos
answer under /api/datasets/... and /datasets/...); point the client at it with
`HF_ENDPOINT` (set before huggingface_hub is imported). Files travel inline (preupload answers "regular"), so no LFS
or Xet storage is involved. Repos are kept in memory, each commit a full snapshot.

Endpoints:
    POST /api/repos/create                          create a repo (409 if it exists); an initial commit on main
    POST /api/validate-yaml                         model card metadata check (always valid)
    POST /api/models/{repo}/preupload/{rev}         upload mode per file: always "regular"
    POST /api/models/{repo}/commit/{rev}            NDJSON commit: header, then files (base64) / deletions
    GET  /api/models/{repo}[/revision/{rev}]        model info: sha, siblings, private
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (?recursive=true: the whole subtree)
    POST /api/models/{repo}/paths-info/{rev}        entries for the given paths
    GET  /api/models/{repo}/refs                    branches
    HEAD|GET /{repo}/resolve/{rev}/{path}           file download, with X-Repo-Commit, ETag, Content-Length;
                                                    404 + X-Error-Code: EntryNotFound / RevisionNotFound / RepoNotFound

Private repos answer 401 (RepoNotFound) unless the request carries `Authorization: Bearer {token}`.
`fail_next_download(path, after_bytes)` cuts the next download of `path` short, to test interrupted transfers.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path): which endpoints the client called
        self.all_requests: list[tuple[str, str]] = []  # the same, never cleared
        self.broken_downloads: dict[str, int] = {}
        self.lock = threading.Lock()

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], deleted: set[str], summary: str) -> str:
        parent = repo.commits.get(repo.branches.get(branch, ""), {})
        snapshot = {path: content for path, content in parent.items() if path not in deleted} | files
        digest = hashlib.sha1(f"{summary}{len(repo.commits)}".encode() + b"".join(sorted(snapshot.values())))
        sha = digest.hexdigest()
        repo.commits[sha] = snapshot
        repo.branches[branch] = sha
        return sha


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    # --- helpers -------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        return self.request_body

    def _authorized(self, repo: Repo) -> bool:
        return not repo.private or self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(self._key(repo_id))
        if repo is None or not self._authorized(repo):
            self._error(401, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        return repo

    def _key(self, repo_id: str) -> str:
        """Model repos are kept under their id, dataset repos under datasets/{id}."""
        return f"datasets/{repo_id}" if self.kind == "datasets" else repo_id

    # --- routing -------------------------------------------------------------------------------------------------
    def do_HEAD(self):  # noqa: N802
        self._route()

    def do_GET(self):  # noqa: N802
        self._route()

    def do_POST(self):  # noqa: N802
        self._route()

    def _route(self):
        # Read the whole body first, even where unused: the connection is kept alive for the next request.
        self.request_body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        url = urlparse(self.path)
        path, self.query = unquote(url.path), parse_qs(url.query)
        self.kind = "models"
        with self.state.lock:
            self.state.requests.append((self.command, path))
            self.state.all_requests.append((self.command, path))
        api = r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda: self._json(200, {"errors": [], "warnings": []})),
            ("POST", api + r"/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", api + r"/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", api + r"/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("GET", api + r"/refs", self._refs),
            ("GET", api + r"/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("GET", api + r"(?:/revision/(?P<rev>[^/]+))?", self._model_info),
            (
                "HEAD|GET",
                r"/(?P<kind>datasets)/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)",
                self._resolve,
            ),
            ("HEAD|GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if self.command in methods.split("|") and match:
                arguments = {k: v for k, v in match.groupdict().items() if v is not None}
                self.kind = arguments.pop("kind", "models")
                return handler(**arguments)
        self._error(404, "NotFound", f"No route for {self.command} {path}")

    # --- endpoints -----------------------------------------------------------------------------------------------
    def _create_repo(self):
        request = json.loads(self._body() or b"{}")
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        self.kind = "datasets" if request.get("type") == "dataset" else "models"
        url = f"http://{self.headers['Host']}/{self._key(repo_id)}"
        if self._key(repo_id) in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(private=request.get("visibility") == "private" or bool(request.get("private")))
        self.state.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, set(), "initial commit")
        self.state.repos[self._key(repo_id)] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, repo: str, rev: str):
        if self._repo(repo) is None:
            return
        files = json.loads(self._body())["files"]
        self._json(
            200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        )

    def _commit(self, repo: str, rev: str):
        target = self._repo(repo)
        if target is None:
            return
        files, deleted, summary = {}, set(), ""
        for line in self._body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.add(item["value"]["path"])
            else:
                return self._error(400, "BadRequest", f"Unsupported commit operation {item['key']}")
        sha = self.state.commit(target, rev, files, deleted, summary)
        url = f"http://{self.headers['Host']}/{repo}/commit/{sha}"
        self._json(200, {"commitUrl": url, "commitOid": sha, "commitMessage": summary, "pullRequestUrl": None})

    def _snapshot(self, repo: str, rev: str) -> tuple[Repo, str] | tuple[None, None]:
        """The repo and the commit `rev` names, or (None, None) once the error is sent."""
        target = self._repo(repo)
        sha = target.resolve(rev) if target is not None else None
        if target is not None and sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return (target, sha) if sha is not None else (None, None)

    def _model_info(self, repo: str, rev: str = "main"):
        target, sha = self._snapshot(repo, rev)
        if target is None:
            return
        siblings = [{"rfilename": path} for path in sorted(target.commits[sha])]
        self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": target.private, "siblings": siblings,
                         "tags": [], "downloads": 0, "likes": 0})  # fmt: skip

    def _tree(self, repo: str, rev: str, sub: str = ""):
        target, sha = self._snapshot(repo, rev)
        if target is None:
            return
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        self._json(200, self._entries(target.commits[sha], sub.strip("/"), recursive))

    @staticmethod
    def _entries(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
        """The files and folders under `folder`: its direct children, or (`recursive`) the whole subtree."""
        prefix = f"{folder}/" if folder else ""
        entries = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    name = prefix + "/".join(parts[:depth])
                    entries.setdefault(name, {"type": "directory", "path": name, "oid": _git_blob_id(name.encode())})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": _git_blob_id(content)}
        return list(entries.values())

    def _paths_info(self, repo: str, rev: str):
        target, sha = self._snapshot(repo, rev)
        if target is None:
            return
        body = self._body().decode()
        wanted = json.loads(body)["paths"] if body.startswith("{") else parse_qs(body).get("paths", [])
        files = target.commits[sha]
        entries = []
        for path in wanted:
            path = path.strip("/")
            if path in files:
                entries.append(
                    {"type": "file", "path": path, "size": len(files[path]), "oid": _git_blob_id(files[path])}
                )
            elif any(name.startswith(f"{path}/") for name in files):
                entries.append({"type": "directory", "path": path, "oid": _git_blob_id(path.encode())})
        self._json(200, entries)

    def _refs(self, repo: str):
        target = self._repo(repo)
        if target is None:
            return
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in target.branches.items()
        ]
        self._json(200, {"branches": branches, "tags": [], "converts": []})

    def _resolve(self, repo: str, rev: str, file: str):
        target, sha = self._snapshot(repo, rev)
        if target is None:
            return
        content = target.commits[sha].get(file)
        if content is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist at {rev}")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_id(content)}"'}
        cut = self.state.broken_downloads.pop(file, None) if self.command == "GET" else None
        if cut is None:
            return self._send(200, content, headers, content_type="application/octet-stream")
        # An interrupted transfer: announce the full length, send part of it, drop the connection.
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(content[:cut])
        self.wfile.flush()
        self.close_connection = True


class LocalHub:
    """Run the server in a background thread: `with LocalHub() as hub: ... hub.endpoint ...`."""

    def __init__(self, token: str = "hf_local_test_token"):
        self.state = HubState(token)
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.token = token
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", private: bool = False) -> str:
        """Create a repo holding `files` in one commit on main, as an upload would; returns the commit sha."""
        repo = Repo(private=private)
        key = f"datasets/{repo_id}" if repo_type == "dataset" else repo_id
        self.state.repos[key] = repo
        return self.state.commit(repo, "main", {".gitattributes": b"", **files}, set(), "upload")

    def fail_next_download(self, path: str, after_bytes: int) -> None:
        self.state.broken_downloads[path] = after_bytes

    def called(self, since_start: bool = False) -> set[tuple[str, str]]:
        """(method, route) pairs the client used (since the last clear, or since the start), generalised."""
        routes = set()
        for method, path in self.state.all_requests if since_start else self.state.requests:
            path = re.sub(r"^/api/(models|datasets)/[^/]+/[^/]+", r"/api/\1/{repo}", path)
            path = re.sub(r"^(/datasets)?/[^/]+/[^/]+/resolve/[^/]+/.+", r"\1/{repo}/resolve/{revision}/{file}", path)
            path = re.sub(r"/(preupload|commit|tree|revision)/[^/]+.*", r"/\1/{revision}", path)
            routes.add((method, path))
        return routes
