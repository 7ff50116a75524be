"""A local HTTP server that speaks the Hugging Face Hub protocol for the calls ``dq upload`` makes.

Endpoints (as huggingface_hub 2.x calls them; Xet disabled so LFS goes through the "basic" transfer):

- ``POST /api/repos/create``                               -> 200 {"url"}, 409 if it exists
- ``POST /api/validate-yaml``                               -> README.md front matter check (create_commit)
- ``POST /api/models/{ns}/{name}/preupload/{rev}``          -> per file uploadMode "lfs" or "regular"
- ``POST /{ns}/{name}.git/info/lfs/objects/batch``          -> upload action, or none if the object is stored
- ``PUT  /lfs-upload/{oid}``                                -> stores the object after checking its sha256
- ``POST /api/models/{ns}/{name}/commit/{rev}``             -> ndjson header/file/lfsFile lines; 422 if an
  lfsFile was never uploaded

Requests without ``Authorization: Bearer <token>`` matching the server's token get 401. The server keeps
every repo's files as bytes, so a test compares them with the local files byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


@dataclass
class HubState:
    token: str
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    puts: int = 0
    validated: list[dict] = field(default_factory=list)
    fail_next_commit: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {state.token}":
                return True
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False

        @property
        def base(self) -> str:
            return f"http://{self.headers['Host']}"

        def do_PUT(self):  # noqa: N802
            body = self._body()
            state.calls.append(("PUT", self.path))
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            if not m:
                return self._send(404, {"error": "not found"})
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return self._send(400, {"error": "sha256 mismatch"})
            with state.lock:
                state.lfs[m.group(1)] = body
                state.puts += 1
            self._send(200, {})

        def do_GET(self):  # noqa: N802
            state.calls.append(("GET", self.path))
            self._send(404, {"error": "not implemented in the fake hub"})

        def do_POST(self):  # noqa: N802
            body = self._body()
            path = self.path.split("?")[0]
            state.calls.append(("POST", path))
            if not self._authorized():
                return
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body)["content"])
            if path == "/api/repos/create":
                d = json.loads(body)
                repo = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
                with state.lock:
                    if repo in state.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo}"})
                    state.repos[repo] = {}
                return self._send(200, {"url": f"{self.base}/{repo}"})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
            if m:
                repo, what = m.group(1), m.group(2)
                if repo not in state.repos:
                    return self._send(404, {"error": "Repository not found"})
                if what == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "shouldIgnore": False, "oid": None,
                         "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 1_000_000 else "regular"}
                        for f in files]})
                return self._commit(repo, body)
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                objects = []
                for o in json.loads(body)["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in state.lfs:
                        entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}"}}
                    objects.append(entry)
                return self._send(200, {"transfer": "basic", "objects": objects})
            self._send(404, {"error": f"no route {path}"})

        def _validate_yaml(self, content: str):
            # The Hub's model-card metadata checks that matter for dq's cards.
            import yaml

            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if not m:
                return self._send(200, {"warnings": [{"message": "empty or missing yaml metadata"}]})
            try:
                meta = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError as exc:
                return self._send(400, {"errors": [{"message": f"invalid yaml: {exc}"}]})
            errors = []
            if "base_model" in meta and not isinstance(meta["base_model"], (str, list)):
                errors.append({"message": "base_model must be a string or a list"})
            if not isinstance(meta.get("tags", []), list) or not all(isinstance(t, str) for t in meta.get("tags", [])):
                errors.append({"message": "tags must be a list of strings"})
            if errors:
                return self._send(400, {"errors": errors})
            state.validated.append(meta)
            return self._send(200, {"warnings": []})

        def _commit(self, repo: str, body: bytes):
            if state.fail_next_commit:
                state.fail_next_commit = False
                return self._send(400, {"error": "simulated failure before the commit"})
            files: dict[str, bytes] = {}
            header = None
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                v = item["value"]
                if item["key"] == "header":
                    header = v
                elif item["key"] == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                elif item["key"] == "lfsFile":
                    if v["oid"] not in state.lfs:
                        return self._send(422, {"error": f"LFS object {v['oid']} of {v['path']} was never uploaded"})
                    files[v["path"]] = state.lfs[v["oid"]]
                else:
                    return self._send(400, {"error": f"unsupported commit op {item['key']}"})
            oid = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(state.commits)).encode()).hexdigest()
            with state.lock:
                state.repos[repo].update(files)
                state.commits.append({"repo": repo, "header": header, "files": sorted(files), "oid": oid})
            self._send(200, {"commitUrl": f"{self.base}/{repo}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

    return Handler


class FakeHub:
    """``with FakeHub(token) as hub: hub.endpoint, hub.state``."""

    def __init__(self, token: str = "hf_test_token"):
        self.state = HubState(token=token)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
