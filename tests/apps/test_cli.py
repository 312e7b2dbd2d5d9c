import subprocess
import sys

import pytest

from apps import cli
from mmcore.errors import InputError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_registered_group():
    result = run_cli("--help")
    assert result.returncode == 0
    parser = cli.build_parser()
    groups = next(a for a in parser._actions if a.dest == "command").choices
    assert set(groups) >= {"serve"}
    for name in groups:
        assert name in result.stdout


def test_help_imports_no_heavy_library():
    code = ("import sys, apps.cli; apps.cli.build_parser(); "
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'numpy', 'pydicom', 'sqlalchemy', 'gradio', 'fastapi', 'timm', 'scipy', 'ray', 'av'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_bad_argument_is_one_line_without_traceback():
    result = run_cli("--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unrecognized arguments: --no-such-flag" in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_command_is_one_line():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_input_error_from_a_handler_is_one_line_and_debug_shows_traceback(monkeypatch, capsys):
    def failing(args):
        raise InputError("scan.zip: expected a zip archive,\n  found a text file")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(handler=failing)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err == "mmcore: error: scan.zip: expected a zip archive, found a text file\n"
    with pytest.raises(InputError):
        cli.main(["--debug"])


def test_unexpected_exception_is_reported_as_internal_error(monkeypatch, capsys):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(handler=lambda args: {}["missing"])
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmcore: internal error: KeyError: 'missing'")
    assert "--debug" in err


def test_device_auto_resolves_to_an_available_device():
    import torch

    from mmcore.device import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
