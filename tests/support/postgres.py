"""Find or start the PostgreSQL server the store tests use; print its SQLAlchemy URL on stdout.

`start`: the server on 127.0.0.1:5432 (trust auth, database `test`) when it answers; otherwise a throwaway
cluster in a temporary folder on a free loopback port when Debian's postgresql is installed or installable;
otherwise an empty line (tests skip, saying why) or, under CI=true, a loud failure.
`stop`: stops a throwaway cluster started by `start` and deletes its folder.
Standard library only (plus psycopg when installed), so it runs before anything else.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STATE = Path(tempfile.gettempdir()) / "mmcore-test-postgres.json"


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def can_query(url: str) -> bool:
    try:
        import psycopg
    except ImportError:
        return True  # the port answers; the tests will report a driver problem themselves
    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        print(f"postgres: 127.0.0.1:5432 answers but {url} is not usable: {exc}", file=sys.stderr)
        return False


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def install_postgresql() -> Path | None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            return None
    return pg_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_throwaway(bindir: Path) -> str:
    folder = Path(tempfile.mkdtemp(prefix="mmcore-pg-"))
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder}", "start")
    run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "test")
    STATE.write_text(json.dumps({"folder": str(folder), "bindir": str(bindir), "as_user": as_user}))
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"


def start() -> int:
    if answers("127.0.0.1", 5432) and can_query(DEFAULT_URL):
        print(DEFAULT_URL)
        return 0
    bindir = pg_bin() or install_postgresql()
    if bindir is not None:
        try:
            url = start_throwaway(bindir)
            print(f"postgres: started a throwaway cluster for the tests at {url}", file=sys.stderr)
            print(url)
            return 0
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"postgres: could not start a throwaway cluster: {exc}", file=sys.stderr)
    if os.environ.get("CI", "").lower() == "true":
        print("postgres: ERROR: no PostgreSQL server answers on 127.0.0.1:5432 and none could be started; "
              "CI requires one for the store tests", file=sys.stderr)
        return 1
    print("postgres: no PostgreSQL server; the PostgreSQL store tests will be skipped", file=sys.stderr)
    print("")
    return 0


def stop() -> int:
    if not STATE.exists():
        return 0
    state = json.loads(STATE.read_text())
    folder = Path(state["folder"])
    subprocess.run([*state["as_user"], str(Path(state["bindir"]) / "pg_ctl"), "-D", str(folder / "data"),
                    "-m", "fast", "stop"], capture_output=True)
    time.sleep(0.2)
    shutil.rmtree(folder, ignore_errors=True)
    STATE.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(start() if sys.argv[1:] == ["start"] else stop() if sys.argv[1:] == ["stop"] else 2)
