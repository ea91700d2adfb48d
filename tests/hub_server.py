"""A minimal Hugging Face Hub on 127.0.0.1: repo info, tree listing and file resolve for local model folders.

It answers the three requests huggingface_hub's `snapshot_download` makes (and its error headers), so
tests exercise the real client, cache layout, HF_ENDPOINT and HF_HUB_OFFLINE without the network.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class LocalHub:
    """Serves `repos` ({"org/name": folder}) at revision "main" (commit = hash of the files) until closed."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo: self._snapshot(Path(folder)) for repo, folder in repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    @staticmethod
    def _snapshot(folder: Path) -> dict:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = hashlib.sha1(b"".join(hashlib.sha1(data).digest() for data in files.values())).hexdigest()
        return {"sha": commit, "files": files}

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        for pattern, reply in ((_INFO, self._info), (_TREE, self._tree), (_RESOLVE, self._resolve)):
            match = pattern.match(path)
            if match:
                repo = self.repos.get(match.group(1))
                if repo is None:
                    return _send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
                if match.group(2) not in ("main", repo["sha"]):
                    return _send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
                return reply(handler, match.group(1), repo, *match.groups()[2:], body=body)
        _send(handler, 404, b"", {}, body)

    def _info(self, handler, repo_id: str, repo: dict, body: bool) -> None:
        info = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                "siblings": [{"rfilename": name} for name in repo["files"]]}
        _send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _tree(self, handler, repo_id: str, repo: dict, body: bool) -> None:
        tree = [{"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                for name, data in repo["files"].items()]
        _send(handler, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, handler, repo_id: str, repo: dict, name: str, body: bool) -> None:
        data = repo["files"].get(name)
        if data is None:
            return _send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{_git_oid(data)}"',
                   "Content-Type": "application/octet-stream"}
        _send(handler, 200, data, headers, body)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body:
        handler.wfile.write(data)
