"""`python -m benchmarks serve`: the REST API under load. Starts `mmcore serve` on a free loopback port with its own
data folder and an engineer account, runs 20 concurrent clients posting small wafer batches (JSON maps) for 30 s,
then checks every scored row reached the database and stops the server.

Metrics: requests, errors, p50_ms / p95_ms / max_ms latency, throughput_rps, wafers_per_s, lost_rows, and the
micro-batcher's mean maps and requests per model call (read from the server's /metrics). The peer is the same load
with the batching window set to zero (`--compare-unbatched`, off by default: it doubles the run time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GOALS = {"p95_ms": ("<=", 2000.0), "errors": ("<=", 0), "lost_rows": ("<=", 0)}
LIBRARIES = ("torch", "fastapi", "uvicorn", "gradio", "sqlalchemy")
ROOT = Path(__file__).resolve().parent.parent


def add_arguments(parser) -> None:
    parser.add_argument("--clients", type=int, default=20, help="concurrent API clients (default 20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load duration (default 30 s)")
    parser.add_argument("--maps", type=int, default=4, help="wafer maps per request (default 4)")
    parser.add_argument("--checkpoint", default=None,
                        help="wafer checkpoint folder (default: $MMCORE_WAFER_CHECKPOINT or the shipped demo)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mmcore(*args, data_dir: Path, env: dict, stdin: str | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "apps.cli", *args, "--data-dir", str(data_dir)], input=stdin,
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"mmcore {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def wafer_grid(seed: int, n: int = 30) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    inside = (yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 <= (n / 2) ** 2
    return np.where(inside, np.where(rng.random((n, n)) < 0.08, 2, 1), 0).tolist()


class Server:
    def __init__(self, data_dir: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "serve", "--port", str(self.port),
                                      "--data-dir", str(data_dir)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def load(url: str, token: str, clients: int, seconds: float, maps: int, prefix: str = "BENCH") -> dict:
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    sent: dict[str, int] = {}  # lot -> wafers scored ok
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    grids = [wafer_grid(i) for i in range(16)]  # the server sees new wafer ids; grids repeat to spare the client

    def client(k: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        lot, i, ok = f"{prefix}-{k:02d}", 0, 0
        while time.monotonic() < stop_at:
            body = {"lot": lot, "product": "bench", "maps": [
                {"wafer_id": f"c{k}-r{i}-w{j}", "grid": grids[(i + j) % len(grids)]} for j in range(maps)]}
            t0 = time.perf_counter()
            try:
                r = session.post(url + "/api/v1/wafers/score", json=body, timeout=60)
                elapsed = time.perf_counter() - t0
                good = r.status_code == 200 and len(r.json()["results"]) == maps and \
                    all(x["status"] == "ok" for x in r.json()["results"])
                with lock:
                    latencies.append(elapsed)
                    if good:
                        ok += maps
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
            except requests.RequestException as exc:
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    errors.append(f"{type(exc).__name__}: {exc}")
            i += 1
        with lock:
            sent[lot] = ok

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "sent": sent, "wall_s": wall}


def stored_rows(url: str, token: str, lots: dict[str, int]) -> int:
    import requests

    total = 0
    for lot in lots:
        r = requests.get(f"{url}/api/v1/lots/{lot}", headers={"Authorization": f"Bearer {token}"}, timeout=120)
        if r.status_code == 200:
            total += r.json()["lot"]["scored"]
    return total


def batch_stats(url: str) -> tuple[float | None, float | None]:
    import requests

    text = requests.get(url + "/metrics", timeout=10).text

    def mean(name):
        s = re.search(rf"^{name}_sum (\S+)$", text, re.M)
        c = re.search(rf"^{name}_count (\S+)$", text, re.M)
        return round(float(s.group(1)) / float(c.group(1)), 2) if s and c and float(c.group(1)) else None
    model = re.search(r'^mmcore_model_seconds_sum\{model="wafer",stage="model"\} (\S+)$', text, re.M)
    calls = re.search(r'^mmcore_model_seconds_count\{model="wafer",stage="model"\} (\S+)$', text, re.M)
    store = re.search(r'^mmcore_model_seconds_sum\{model="wafer",stage="store"\} (\S+)$', text, re.M)
    stores = re.search(r'^mmcore_model_seconds_count\{model="wafer",stage="store"\} (\S+)$', text, re.M)
    per = (lambda a, b: round(1000 * float(a.group(1)) / float(b.group(1)), 1) if a and b and float(b.group(1))
           else None)
    return (mean("mmcore_wafer_batch_maps"), mean("mmcore_wafer_batch_requests"), per(model, calls),
            per(store, stores))


def run(args) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="mmcore-bench-serve-"))
    env = {**os.environ, "MMCORE_OFFLINE": "1"}
    env.pop("MMCORE_DB_URL", None)
    if args.checkpoint:
        env["MMCORE_WAFER_CHECKPOINT"] = str(Path(args.checkpoint).resolve())
    server = None
    try:
        mmcore("users", "add", "bench", "--role", "engineer", data_dir=data_dir, env=env, stdin="bench-password-1\n")
        token = mmcore("users", "token", "bench", data_dir=data_dir, env=env).strip().splitlines()[-1]
        server = Server(data_dir, env)
        server.wait_ready()
        health = json.loads(__import__("requests").get(server.url + "/healthz", timeout=5).text)
        if not health.get("wafer_model"):
            raise RuntimeError("the server has no wafer checkpoint; pass --checkpoint DIR or ship "
                               "data/checkpoints/wafer")
        load(server.url, token, 2, 2.0, args.maps, prefix="WARMUP")  # warm-up: model load, first batches (not counted)
        result = load(server.url, token, args.clients, args.seconds, args.maps)
        stored = stored_rows(server.url, token, result["sent"])
        mean_maps, mean_requests, model_ms, store_ms = batch_stats(server.url)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    lat = sorted(result["latencies"])
    n = len(lat)
    sent_ok = sum(result["sent"].values())
    return {
        "clients": args.clients, "seconds": args.seconds, "maps_per_request": args.maps,
        "requests": n, "errors": len(result["errors"]),
        "first_error": result["errors"][0] if result["errors"] else None,
        "p50_ms": round(1000 * statistics.median(lat), 1) if n else None,
        "p95_ms": round(1000 * lat[min(n - 1, int(0.95 * n))], 1) if n else None,
        "max_ms": round(1000 * lat[-1], 1) if n else None,
        "throughput_rps": round(n / result["wall_s"], 2),
        "wafers_per_s": round(sent_ok / result["wall_s"], 1),
        "lost_rows": max(0, sent_ok - stored),
        "mean_maps_per_model_call": mean_maps, "mean_requests_per_model_call": mean_requests,
        "model_ms_per_call": model_ms, "store_ms_per_request": store_ms,
    }
