"""`mmcore db` and `mmcore users`: once as a user runs them (a subprocess, the password piped on stdin), the rest
in-process through `apps.cli.main` (same parser and handlers, without paying the interpreter start-up each time)."""

import io
import os
import subprocess
import sys

import pytest

from apps import cli
from apps.store import Actor, AuthenticationError, authenticate, check_api_token, create_user, open_store


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr), with MMCORE_DATA_DIR in tmp_path."""
    monkeypatch.setenv("MMCORE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MMCORE_DB_URL", raising=False)

    def call(*argv: str, stdin: str | None = None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code = cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def test_db_upgrade_creates_the_database(run, tmp_path):
    code, out, err = run("db", "upgrade")
    db = tmp_path / "mmcore.db"
    assert code == 0, err
    assert db.is_file() and out.strip() == f"sqlite:///{db}: upgraded from empty to revision 0003 (newest)"
    assert run("db", "upgrade")[1].strip() == f"sqlite:///{db}: already at revision 0003 (newest)"


def test_users_add_reads_a_piped_password(tmp_path):
    """A real process with a real pipe on stdin, on an empty data folder (the first start creates the database)."""
    env = {**os.environ, "MMCORE_DATA_DIR": str(tmp_path / "empty")}
    env.pop("MMCORE_DB_URL", None)
    add = subprocess.run([sys.executable, "-m", "apps.cli", "users", "add", "alice", "--role", "engineer", "--site",
                          "fab2"], input="s3cret-passphrase\n", capture_output=True, text=True, env=env, timeout=120)
    assert add.returncode == 0, add.stderr
    assert add.stdout.strip() == "user alice created: role engineer, site fab2"
    with open_store(None, tmp_path / "empty") as store:
        assert authenticate(store, "alice", "s3cret-passphrase").site == "fab2"


def test_users_token_list_revoke(run, tmp_path):
    assert run("users", "add", "alice", "--role", "engineer", "--site", "fab2", stdin="s3cret-passphrase\n")[0] == 0
    code, out, _ = run("users", "token", "alice", "--days", "30", "--label", "line 3")
    assert code == 0
    token = out.rstrip("\n").splitlines()[-1]
    assert token.startswith("mmc_") and " " not in token and len(token) > 40
    code, out, _ = run("users", "list", "--tokens")
    assert "alice  engineer  fab2  active" in out and "live, expires" in out and "line 3" in out
    assert token not in out
    with open_store(None, tmp_path) as store:
        assert check_api_token(store, token) == Actor(1, "alice", "engineer", "fab2")
        create_user(store, Actor.system(), "admin", "printed once 1", "admin", must_change_password=True)
    assert "admin  admin     main  one-time password (change it at the first log-in)" in run("users", "list")[1]
    assert run("users", "revoke", "alice")[1].strip() == "revoked 1 live token(s) and session(s) of alice"
    with open_store(None, tmp_path) as store, pytest.raises(AuthenticationError, match="revoked"):
        check_api_token(store, token)
    assert run("users", "disable", "alice")[1].strip() == "user alice disabled"
    assert "alice  engineer  fab2  disabled" in run("users", "list")[1]
    code, out, _ = run("db", "current")
    assert code == 0 and "revision 0003 (newest)" in out


def test_cli_errors_are_one_line(run):
    code, _, err = run("users", "add", "bob", "--role", "clinician", stdin="short\n")
    assert (code, err.strip()) == (2, "mmcore: error: password: expected at least 8 characters, found 5")
    code, _, err = run("users", "add", "bob", "--role", "clinician", stdin="")
    assert (code, err.strip()) == (2, "mmcore: error: password: expected one line on stdin, found nothing")
    assert run("users", "add", "bob", "--role", "clinician", stdin="long enough\n")[0] == 0
    code, _, err = run("users", "add", "bob", "--role", "admin", stdin="long enough\n")
    assert (code, err.strip()) == (2, "mmcore: error: username 'bob': already taken")
    code, _, err = run("users", "token", "carol")
    assert (code, err.strip()) == (2, "mmcore: error: user 'carol': no such user")
    code, _, err = run("users", "revoke", "bob", "--token-id", "5")
    assert (code, err.strip()) == (2, "mmcore: error: --token-id 5: not a token of bob (their tokens: none)")
    code, _, err = run("db", "upgrade", "--db", "oracle://x")
    assert code == 2 and "expected sqlite:///PATH or postgresql+psycopg" in err and len(err.splitlines()) == 1
    code, _, err = run("db", "current", "--db", "postgresql+psycopg://nobody@127.0.0.1:9/x")
    assert code == 2 and err.startswith("mmcore: error: database postgresql+psycopg://nobody@127.0.0.1:9/x: "
                                        "cannot connect") and len(err.splitlines()) == 1


def test_db_current_on_the_test_postgres(request, run):
    url = request.getfixturevalue("pg_schema_url")
    code, out, err = run("db", "current", "--db", url)
    assert code == 0, err
    assert "revision 0003 (newest)" in out and "search_path" in out
