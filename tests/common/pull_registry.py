#!/usr/bin/env python3
"""A tiny plain-HTTP registry for tests/pull.rs, on 127.0.0.1 (the Engine
pulls from 127.0.0.0/8 over HTTP). It serves one image, read from a
`docker save` tar, as `REPO:TAG` for every TAG given (manifest v2 schema 2,
gzipped layers). Layer blobs are sent in small slices with short pauses, so
a pull lasts a couple of seconds and its progress can be seen. It prints its
port on the first line of stdout and runs until killed.

usage: pull_registry.py SAVED.tar REPO TAG...
"""
import gzip
import hashlib
import http.server
import json
import sys
import tarfile
import time

saved, repo, tags = sys.argv[1], sys.argv[2], set(sys.argv[3:])
blobs = {}


def add(data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


with tarfile.open(saved) as t:
    entry = json.load(t.extractfile("manifest.json"))[0]
    config = t.extractfile(entry["Config"]).read()
    layers = []
    for path in entry["Layers"]:
        raw = t.extractfile(path).read()
        gz = gzip.compress(raw, mtime=0)
        layers.append({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": len(gz),
            "digest": add(gz),
        })
config_digest = add(config)
LAYER_DIGESTS = {l["digest"] for l in layers}
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": MANIFEST_TYPE,
    "config": {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "size": len(config),
        "digest": config_digest,
    },
    "layers": layers,
}).encode()
manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", ctype="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        slow = self.path.rsplit("/", 1)[-1] in LAYER_DIGESTS
        step = 16 * 1024 if slow else len(body) or 1
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            self.wfile.flush()
            if slow:
                time.sleep(0.02)

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["v2"]:
            return self.answer(200, b"{}")
        prefix = ["v2"] + repo.split("/")
        if parts[:len(prefix)] != prefix or len(parts) != len(prefix) + 2:
            return self.answer(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
        kind, ref = parts[-2], parts[-1]
        if kind == "manifests" and (ref in tags or ref == manifest_digest):
            return self.answer(200, manifest, MANIFEST_TYPE,
                               [("Docker-Content-Digest", manifest_digest)])
        if kind == "blobs" and ref in blobs:
            return self.answer(200, blobs[ref], "application/octet-stream",
                               [("Docker-Content-Digest", ref)])
        return self.answer(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

    do_HEAD = do_GET


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
