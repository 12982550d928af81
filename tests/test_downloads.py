"""Model downloads against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from functools import partial

import pytest

from napari_tinysam import CheckpointError, load_model, weights
from napari_tinysam.model import save_checkpoint


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/truncated"):
            body = (self.server.root / "model.pt").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, tiny_model):
    root = tmp_path / "srv"
    root.mkdir()
    save_checkpoint(tiny_model, root / "model.pt")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    httpd.root = root
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


def _register(monkeypatch, url, hash_=None):
    info = dataclasses.replace(weights.REGISTRY["mobilesam"], url=url, hash=hash_)
    monkeypatch.setitem(weights.REGISTRY, "mobilesam", info)


def test_download_with_known_hash(server, monkeypatch):
    base, root = server
    _register(monkeypatch, f"{base}/model.pt", weights.file_hash(root / "model.pt"))
    path = weights.download_model("mobilesam", progress=False)
    assert path == weights.model_path("mobilesam") and path.is_file()
    assert load_model("mobilesam").img_size == 256


def test_wrong_hash_is_rejected_and_deleted(server, monkeypatch):
    base, _ = server
    _register(monkeypatch, f"{base}/model.pt", "xxh128:" + "0" * 32)
    with pytest.raises(CheckpointError, match="verification"):
        weights.download_model("mobilesam", progress=False)
    assert not any(weights.cache_dir().iterdir()) if weights.cache_dir().exists() else True


def test_unpublished_hash_is_recorded_on_first_download(server, monkeypatch):
    base, root = server
    _register(monkeypatch, f"{base}/model.pt", None)
    path = weights.download_model("mobilesam", progress=False)
    recorded = path.with_name(path.name + ".xxh128").read_text().strip()
    assert recorded == weights.file_hash(root / "model.pt")


def test_interrupted_transfer_leaves_no_file(server, monkeypatch):
    base, _ = server
    _register(monkeypatch, f"{base}/truncated/model.pt", None)
    with pytest.raises(CheckpointError):
        weights.download_model("mobilesam", progress=False)
    folder = weights.cache_dir()
    assert not folder.exists() or not [p for p in folder.iterdir() if p.suffix != ".xxh128"]


def test_offline_message_names_file_and_folder(monkeypatch):
    _register(monkeypatch, "http://127.0.0.1:9/mobile_sam.pt", None)
    with pytest.raises(CheckpointError, match=r"mobile_sam\.pt.*folder"):
        weights.download_model("mobilesam", progress=False)
