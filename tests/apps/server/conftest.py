"""A live server on loopback (uvicorn in a thread) with its own data folder, users and tokens, shared by the tests
of this folder; helpers for phantom series, voice notes and wafer maps."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

ROOT = Path(__file__).resolve().parents[3]
SHIPPED_WAFER = ROOT / "data" / "checkpoints" / "wafer"
PASSWORD = "correct horse 1"


def wafer_checkpoint() -> Path | None:
    """The shipped wafer checkpoint, else $MMCORE_TEST_WAFER_CHECKPOINT; None when neither exists."""
    for candidate in (SHIPPED_WAFER, os.environ.get("MMCORE_TEST_WAFER_CHECKPOINT")):
        if candidate and (Path(candidate) / "model.safetensors").is_file():
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: object
    data_dir: Path
    tokens: dict  # username -> API token
    thread: threading.Thread
    server: object

    def get(self, path, user=None, **kw):
        return requests.get(self.url + path, headers=self._auth(user, kw.pop("headers", {})), timeout=120, **kw)

    def post(self, path, user=None, **kw):
        return requests.post(self.url + path, headers=self._auth(user, kw.pop("headers", {})), timeout=300, **kw)

    def patch(self, path, user=None, **kw):
        return requests.patch(self.url + path, headers=self._auth(user, kw.pop("headers", {})), timeout=120, **kw)

    def _auth(self, user, headers):
        return {**headers, **({"Authorization": f"Bearer {self.tokens[user]}"} if user else {})}

    @property
    def store(self):
        return self.app.state.ctx.store


def start_server(data_dir: Path, **settings) -> LiveServer:
    import uvicorn

    from apps.server import Settings, create_app
    from apps.store import Actor, create_api_token, create_user

    port = free_port()
    app = create_app(Settings(port=port, data_dir=data_dir, print_bootstrap=False,
                              wafer_checkpoint=wafer_checkpoint(), **settings))
    store = app.state.ctx.store
    tokens = {}
    for name, role, site in [("clin", "clinician", "main"), ("clin2", "clinician", "main"),
                             ("eng", "engineer", "main"), ("eng2", "engineer", "fab2"), ("boss", "admin", "main")]:
        create_user(store, Actor.system(), name, PASSWORD, role, site)
        tokens[name] = create_api_token(store, Actor.system(), name)[0]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        raise RuntimeError("server did not become healthy within 60 s")
    return LiveServer(url, app, data_dir, tokens, thread, server)


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=15)
    live.app.state.ctx.close()


@pytest.fixture(scope="session")
def live(tmp_path_factory):
    live = start_server(tmp_path_factory.mktemp("server-data"), max_request_bytes=32 * 2**20)
    yield live
    stop_server(live)


def make_phantom_zip(folder: Path, seed: int, size: int, slices: int, thickness_mm: float) -> Path:
    from pipelines.ct.phantom import PhantomConfig, make_phantom, write_phantom

    write_phantom(make_phantom(seed, ["nodule"], PhantomConfig(size=size, slices=slices, thickness_mm=thickness_mm)),
                  folder / "s")
    out = folder / "series.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted((folder / "s").glob("*.dcm")):
            z.write(f, f.name)
    return out


@pytest.fixture(scope="session")
def phantom_zip(tmp_path_factory) -> Path:
    """A small phantom chest CT (96 x 96, 40 slices of 6 mm) as a zip of DICOM files."""
    return make_phantom_zip(tmp_path_factory.mktemp("phantom"), 7, 96, 40, 6.0)


@pytest.fixture(scope="session")
def phantom_zip_browser(tmp_path_factory) -> Path:
    """Another patient (its own Study UID) for the browser test: 128 x 128, 48 slices of 5 mm, two nodules."""
    return make_phantom_zip(tmp_path_factory.mktemp("phantom-browser"), 11, 128, 48, 5.0)


@pytest.fixture(scope="session")
def voice_note(tmp_path_factory) -> Path | None:
    """A spoken indication synthesised with espeak-ng (None when it is not installed)."""
    import shutil
    import subprocess

    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    out = tmp_path_factory.mktemp("voice") / "note.wav"
    subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(out),
                    "Clinical question: follow up of a lung nodule. History of smoking."], check=True, timeout=60)
    return out


def wafer_npy(seed: int, n: int = 26) -> bytes:
    """A round wafer with random fails, as .npy bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    inside = (yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 <= (n / 2) ** 2
    grid = np.where(inside, np.where(rng.random((n, n)) < 0.1, 2, 1), 0).astype(np.uint8)
    buf = io.BytesIO()
    np.save(buf, grid)
    return buf.getvalue()


def wafer_zip(count: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(count):
            z.writestr(f"W{i + 1:02d}.npy", wafer_npy(seed + i))
    return buf.getvalue()


def synth_zip(count: int, seed: int = 0) -> bytes:
    """Synthetic wafer maps with the known failure patterns (pipelines.wafer.synth), W01.npy... in a zip."""
    from pipelines.wafer.synth import generate

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, m in enumerate(generate(count, seed, mixed_fraction=0.0)):
            npy = io.BytesIO()
            np.save(npy, m.grid)
            z.writestr(f"W{i + 1:02d}.npy", npy.getvalue())
    return buf.getvalue()


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# Test modules cannot import this file (pytest runs with --import-mode=importlib): helpers come as fixtures.

@pytest.fixture(scope="session")
def helpers():
    class Helpers:
        error_of = staticmethod(error_of)
        wafer_npy = staticmethod(wafer_npy)
        wafer_zip = staticmethod(wafer_zip)
        synth_zip = staticmethod(synth_zip)
    return Helpers


@pytest.fixture
def wafer_model():
    path = wafer_checkpoint()
    if path is None:
        pytest.skip("no wafer checkpoint: data/checkpoints/wafer is not shipped yet and "
                    "MMCORE_TEST_WAFER_CHECKPOINT is unset")
    return path
