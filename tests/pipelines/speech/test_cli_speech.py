import json
import subprocess
import sys

import numpy as np
import pytest

from apps import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, timeout=300)


def test_transcribe_json(base_transcriber, dictate, audio_kit, tmp_path):
    note = tmp_path / "note.m4a"
    note.write_bytes(audio_kit.encode(dictate("There is no pericardial effusion.", "en-us", 150), 16000, "m4a"))
    result = run_cli("transcribe", str(note), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"text", "language", "segments", "engine", "model", "timing", "model_source", "audio"}
    assert out["engine"] == "faster-whisper" and out["model"] == "base" and out["language"] == "en"
    assert "pericardial effusion" in out["text"].lower()
    assert all(set(s) >= {"start", "end", "text"} and s["start"] < s["end"] for s in out["segments"])
    assert out["audio"]["codec"] == "aac" and out["timing"]["transcribe_s"] > 0


@pytest.mark.parametrize("case, message", [
    ("empty", "the file is empty"),
    ("text", "not a recording any decoder knows"),
    ("silence", "10.0 s of silence"),
])
def test_bad_audio_is_one_line_without_traceback(case, message, audio_kit, tmp_path):
    path = tmp_path / "note.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is a text file renamed to .wav\n")
    else:
        path.write_bytes(audio_kit.encode(np.zeros(160000, np.float32), 16000, "wav", channels=1))
    result = run_cli("transcribe", str(path), "--json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcore: error: ") and str(path) in lines[0]
    assert message in lines[0] and "Traceback" not in result.stderr and result.stdout == ""


def test_unknown_engine_is_refused_by_the_parser():
    result = run_cli("transcribe", "x.wav", "--engine", "whisper.cpp")
    assert result.returncode == 2 and "invalid choice: 'whisper.cpp'" in result.stderr


@pytest.mark.slow  # loads a second model and transcribes each dictation twice
def test_eval_speech_json(base_transcriber, espeak, capsys):
    assert cli.main(["eval", "speech", "--json", "--limit", "1", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_dictations"] == 1 and metrics["audio_s"] > 7
    for key in ("wer", "wer_unbiased", "term_recall", "term_recall_unbiased"):
        assert 0.0 <= metrics[key] <= 1.5, key
    assert metrics["wer"] <= 0.3 and metrics["term_recall"] >= 0.5
