"""A local stand-in for the Hugging Face Hub HTTP API, just enough for ``HfApi`` to push a folder.

Tests point the real ``huggingface_hub`` client at it (``HfApi(endpoint=hub.endpoint)``), so a
push makes genuine HTTP round-trips on 127.0.0.1 and nothing ever reaches the internet.

Endpoints, as ``create_repo`` and ``upload_folder`` call them (read from huggingface_hub 2.4.0;
the same with or without ``hf_xet`` installed, i.e. its pipelined or its single-commit path):

- ``POST /api/repos/create``: creates the repo; 409 when it already exists (``exist_ok`` relies
  on that); 401 without an ``Authorization`` header, as the real Hub does.
- ``POST /api/validate-yaml``: the README.md front-matter check made before every upload.
- ``POST /api/{type}s/{owner}/{name}/preupload/{rev}``: answers ``uploadMode: "regular"`` for
  every file, so contents travel base64-encoded inside the commit and no LFS or Xet transfer
  (a second, storage-side protocol) is ever negotiated. ``oid`` is the git blob sha1 of the
  stored file, which lets the client skip unchanged files like it does against the real Hub.
- ``POST /api/{type}s/{owner}/{name}/commit/{rev}``: decodes the NDJSON commit payload
  (``header``, ``file`` with base64 content, ``deletedFile``, ``deletedFolder``) and stores files.
- ``GET /api/{type}s/{owner}/{name}[/revision/{rev}]``: repo info (the client asks for it when a
  push changes nothing, to report the current commit).

Any other request is answered 404 and listed in ``HubStandin.unhandled`` so a test can notice a
client that started calling something new. Nothing here prints or logs request headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

SENTINEL = "hf_SENTINELsecret0123456789abcdefghijklmnop"  # the HF_TOKEN of the `hub` fixture


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, what the Hub reports as a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandinError(Exception):
    """An HTTP error answered to the client: status, message and optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, **payload):
        super().__init__(message)
        self.status, self.code, self.payload = status, code, payload


class HubStandin:
    """A threaded local Hub: ``with HubStandin(tmp_path) as hub: HfApi(endpoint=hub.endpoint)``.

    Attributes:
        endpoint: base URL to give ``HfApi`` (set while the server runs).
        repos: ``"{type}s/{owner}/{name}" -> {"private": bool, "commits": [...]}``.
        auth_headers: every ``Authorization`` header value received, in order (never printed).
        requests: ``(method, path)`` of every request, in order.
        unhandled: ``(method, path)`` of requests the stand-in does not implement.
        yaml_checked: README.md contents received by ``/api/validate-yaml``.
        failures: exceptions raised inside the stand-in (answered 400), for debugging.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.endpoint = ""
        self.repos: dict[str, dict] = {}
        self.auth_headers: list[str | None] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.yaml_checked: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> HubStandin:
        hub = self

        class Handler(_Handler):
            standin = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ inspection

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        """Where the stand-in keeps the files of a repo."""
        return self.root / f"{repo_type}s" / repo_id

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """Every file committed to a repo: ``{path_in_repo: bytes}``."""
        base = self.repo_dir(repo_id, repo_type)
        if not base.is_dir():
            return {}
        return {
            p.relative_to(base).as_posix(): p.read_bytes()
            for p in sorted(base.rglob("*"))
            if p.is_file()
        }

    def repo(self, repo_id: str, repo_type: str = "model") -> dict:
        """The stored record of a repo (``private``, ``commits``); KeyError when never created."""
        return self.repos[f"{repo_type}s/{repo_id}"]

    # ------------------------------------------------------------------ API

    def handle(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.requests.append((method, path))
            self.auth_headers.append(headers.get("authorization"))
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create(headers, json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                self.yaml_checked.append(json.loads(body)["content"])
                return 200, {"errors": [], "warnings": []}
            if len(parts) >= 4 and parts[0] == "api" and parts[1].endswith("s"):
                key = "/".join(parts[1:4])
                rest = parts[4:]
                if method == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(key, json.loads(body))
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(key, body)
                if method == "GET" and (rest == [] or rest[:1] == ["revision"]):
                    return self._info(key)
            self.unhandled.append((method, path))
            raise StandinError(404, f"the Hub stand-in does not implement {method} {path}")

    def _repo(self, key: str) -> dict:
        if key not in self.repos:
            raise StandinError(404, f"Repository {key} not found", code="RepoNotFound")
        return self.repos[key]

    def _create(self, headers: dict, payload: dict) -> tuple[int, dict]:
        if not headers.get("authorization"):
            raise StandinError(401, "Invalid username or password.")
        repo_id = f"{payload['organization']}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        key = f"{repo_type}s/{repo_id}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        if key in self.repos:
            # The real Hub also returns the url here; create_repo(exist_ok=True) reads it.
            raise StandinError(409, "You already created this model repo", url=url)
        # huggingface_hub >= 1.x sends "visibility"; older versions sent "private".
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.repos[key] = {"private": private, "commits": [], "url": url}
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _preupload(self, key: str, payload: dict) -> tuple[int, dict]:
        self._repo(key)
        base = self.root / key
        answers = []
        for entry in payload["files"]:
            stored = base / entry["path"]
            oid = git_blob_sha1(stored.read_bytes()) if stored.is_file() else None
            answers.append(
                {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": answers, "commitOid": self._head(key)}

    def _commit(self, key: str, body: bytes) -> tuple[int, dict]:
        repo = self._repo(key)
        base = (self.root / key).resolve()
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        changed = []
        for item in lines:
            kind, value = item["key"], item["value"]
            if kind == "header":
                continue
            target = (base / value["path"]).resolve()
            if base != target and base not in target.parents:
                raise StandinError(400, f"path escapes the repo: {value['path']}")
            if kind == "file":
                if value.get("encoding") != "base64":
                    raise StandinError(400, f"unsupported encoding {value.get('encoding')}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
            elif kind == "deletedFile":
                target.unlink(missing_ok=True)
            elif kind == "deletedFolder":
                shutil.rmtree(target, ignore_errors=True)
            else:  # lfsFile / copies: never requested since preupload says "regular"
                raise StandinError(400, f"the Hub stand-in only accepts inline files, got {kind}")
            changed.append(value["path"])
        oid = hashlib.sha1(json.dumps([key, len(repo["commits"]), header]).encode()).hexdigest()
        repo["commits"].append({"oid": oid, **header, "paths": changed})
        return 200, {
            "commitUrl": f"{repo['url']}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }

    def _head(self, key: str) -> str | None:
        commits = self.repos[key]["commits"]
        return commits[-1]["oid"] if commits else None

    def _info(self, key: str) -> tuple[int, dict]:
        repo = self._repo(key)
        repo_id = key.split("/", 1)[1]
        siblings = [{"rfilename": path} for path in self.files(repo_id, key.split("/")[0][:-1])]
        return 200, {
            "id": repo_id,
            "sha": self._head(key),
            "private": repo["private"],
            "siblings": siblings,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: HubStandin

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        path = urlsplit(self.path).path
        extra = {}
        try:
            status, payload = self.standin.handle(method, path, headers, body)
        except StandinError as err:
            status, payload = err.status, {"error": str(err), **err.payload}
            extra = {"X-Error-Message": str(err)}
            if err.code:
                extra["X-Error-Code"] = err.code
        except Exception as err:  # a stand-in bug: 400, which the client does not retry (5xx is)
            self.standin.failures.append(f"{type(err).__name__}: {err}")
            status, payload = 400, {"error": f"stand-in failure: {type(err).__name__}: {err}"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass
