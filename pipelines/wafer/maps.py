"""Wafer maps and the file formats they arrive in.

A `WaferMap` is a die-level grid of uint8: 0 = no die, 1 = pass, 2 = fail (the WM-811K / MixedWM38 convention).
Orientation is normalised so the notch (or flat) is at the bottom (6 o'clock); row 0 is the top of the wafer.

Readers: WM-811K `LSWMD.pkl` (pandas DataFrame pickled by an old pandas), MixedWM38 `.npz` (`arr_0` maps,
`arr_1` 8-way multi-hot), SEMI G85 XML (bin codes kept with their pass/fail mapping), `.npy` (one 2-D grid per
file, its stem the wafer id) and PNG renderings. Writers: G85 and PNG.

`iter_wafers(paths)` walks files, folders, zips and multi-wafer files lazily and yields a `WaferMap` or a
`WaferReadError` per wafer, so one bad wafer never stops a batch.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mmcore.errors import InputError

NO_DIE, PASS, FAIL = 0, 1, 2
# WM-811K failure types, in the order every score and report uses.
CLASSES = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Random", "Scratch", "none")
PATTERNS = CLASSES[:-1]
# MixedWM38 `arr_1` column order (Wang et al., IEEE TSM 2020): C, D, EL, ER, L, NF, S, R.
MIXEDWM38_ORDER = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random")
SUFFIXES = (".npy", ".npz", ".pkl", ".pickle", ".xml", ".g85", ".png")
G85_NAMESPACE = "http://www.semi.org"
# PNG rendering palette (RGB): background, passing die, failing die.
PALETTE = {NO_DIE: (255, 255, 255), PASS: (46, 160, 67), FAIL: (214, 39, 40)}


class WaferError(InputError):
    """Base of every wafer pipeline input error."""


class WaferFormatError(WaferError):
    """A wafer file could not be read: the message names the file and what was wrong."""


@dataclass
class WaferMap:
    grid: np.ndarray  # (rows, cols) uint8: 0 no die, 1 pass, 2 fail
    wafer_id: str
    source: str = ""  # file (and member / row) the map came from
    lot_id: str | None = None
    slot: int | None = None  # wafer index in the lot, 1..25
    product: str | None = None
    die_size: float | None = None  # WM-811K `dieSize`: dies per wafer
    bins: np.ndarray | None = None  # (rows, cols) original bin codes as strings, when the source has them
    bin_quality: dict[str, str] = field(default_factory=dict)  # bin code -> "pass" | "fail"
    null_bin: str | None = None
    labels: tuple[str, ...] | None = None  # known failure types (training data); () = labelled `none`

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def n_dies(self) -> int:
        return int((self.grid != NO_DIE).sum())

    @property
    def n_fail(self) -> int:
        return int((self.grid == FAIL).sum())

    @property
    def yield_pct(self) -> float:
        """Passing dies / gross dies, in percent."""
        return 100.0 * (self.n_dies - self.n_fail) / max(self.n_dies, 1)


@dataclass
class WaferReadError:
    """One wafer (or whole file) that could not be read; stands in for it in a batch."""

    wafer_id: str
    source: str
    error: str


def check_grid(grid, where: str) -> np.ndarray:
    """A 2-D integer grid with values 0..2 and at least one die, as uint8; WaferFormatError naming `where` if not."""
    arr = np.asarray(grid)
    if arr.dtype == object:
        raise WaferFormatError(f"{where}: expected a numeric 2-D grid, found an object array")
    if arr.ndim != 2 or arr.size == 0 or 0 in arr.shape:
        raise WaferFormatError(f"{where}: expected a non-empty 2-D grid, found shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise WaferFormatError(f"{where}: expected integer die codes 0/1/2, found non-integer values")
    elif arr.dtype.kind not in "iub":
        raise WaferFormatError(f"{where}: expected integer die codes, found dtype {arr.dtype}")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 2:
        bad = sorted({int(v) for v in np.unique(arr) if v < 0 or v > 2})[:5]
        raise WaferFormatError(f"{where}: expected die codes 0 (no die), 1 (pass), 2 (fail), found {bad}")
    out = arr.astype(np.uint8)
    if not (out != NO_DIE).any():
        raise WaferFormatError(f"{where}: the grid holds no dies (all 0)")
    return out


# ---------------------------------------------------------------------------------------------------------------- npy


def read_npy(path: str | Path, data: bytes | None = None, wafer_id: str | None = None) -> WaferMap:
    where = str(path)
    try:
        raw = data if data is not None else Path(path).read_bytes()
    except OSError as exc:
        raise WaferFormatError(f"{where}: cannot read ({exc})") from exc
    # np.load treats anything without the NPY magic as a pickle; say what the file really lacks instead.
    if not raw.startswith(b"\x93NUMPY"):
        raise WaferFormatError(f"{where}: not a .npy file (expected the \\x93NUMPY header, found {raw[:8]!r})")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise WaferFormatError(f"{where}: not a readable .npy array ({exc})") from exc
    return WaferMap(grid=check_grid(arr, where), wafer_id=wafer_id or Path(path).stem, source=where)


def write_npy(wafer: WaferMap, path: str | Path) -> Path:
    return _atomic_write(path, lambda f: np.save(f, wafer.grid, allow_pickle=False))


# ---------------------------------------------------------------------------------------------------------- MixedWM38


def read_mixedwm38(path: str | Path, data: bytes | None = None) -> Iterator[WaferMap | WaferReadError]:
    """MixedWM38 `.npz`: `arr_0` (N, 52, 52) maps, `arr_1` (N, 8) multi-hot labels (optional)."""
    where = str(path)
    try:
        npz = np.load(io.BytesIO(data) if data is not None else path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise WaferFormatError(f"{where}: not a readable .npz archive ({exc})") from exc
    with npz:
        if "arr_0" not in npz.files:
            raise WaferFormatError(f"{where}: expected MixedWM38 arrays arr_0 (maps) and arr_1 (labels), "
                                   f"found {sorted(npz.files)}")
        maps = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz.files else None
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise WaferFormatError(f"{where}: arr_0 should be (N, rows, cols), found shape {maps.shape}")
    if labels is not None and (labels.ndim != 2 or labels.shape != (len(maps), len(MIXEDWM38_ORDER))):
        raise WaferFormatError(f"{where}: arr_1 should be ({len(maps)}, 8) multi-hot labels, found {labels.shape}")
    stem = Path(path).stem
    for i in range(len(maps)):
        wafer_id, source = f"{stem}_{i:06d}", f"{where}#{i}"
        try:
            grid = check_grid(maps[i], source)
        except WaferFormatError as exc:
            yield WaferReadError(wafer_id, source, str(exc))
            continue
        names = None
        if labels is not None:
            names = tuple(sorted((MIXEDWM38_ORDER[j] for j in np.flatnonzero(labels[i])), key=CLASSES.index))
        yield WaferMap(grid=grid, wafer_id=wafer_id, source=source, labels=names)


# ------------------------------------------------------------------------------------------------------------ WM-811K

# Module paths an old pandas (0.x, as in LSWMD.pkl) pickled under, and where those classes live now.
_PANDAS_RENAMES = {
    ("pandas.indexes.base", "Index"): ("pandas", "Index"),
    ("pandas.indexes.range", "RangeIndex"): ("pandas", "RangeIndex"),
    ("pandas.indexes.numeric", "Int64Index"): ("pandas", "Index"),
    ("pandas.core.indexes.numeric", "Int64Index"): ("pandas", "Index"),
    ("pandas.core.indexes.numeric", "Float64Index"): ("pandas", "Index"),
    ("pandas.core.index", "Index"): ("pandas", "Index"),
    ("pandas.core.internals", "BlockManager"): ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.frame", "DataFrame"): ("pandas", "DataFrame"),
    ("pandas.core.series", "Series"): ("pandas", "Series"),
}
# Only these top-level packages may be reconstructed: a pickle naming anything else (os, subprocess...) is refused.
_PICKLE_ALLOWED = ("numpy", "pandas", "pyarrow", "_codecs", "builtins", "copyreg", "collections", "datetime")
# Builtins a DataFrame pickle needs; eval, exec, getattr, print... are refused.
_SAFE_BUILTINS = {"slice", "bytearray", "bytes", "set", "frozenset", "complex", "object", "list", "dict", "tuple",
                  "str", "int", "float", "bool", "range"}


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module, name = _PANDAS_RENAMES.get((module, name), (module, name))
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if module.split(".")[0] not in _PICKLE_ALLOWED or (module == "builtins" and name not in _SAFE_BUILTINS):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} "
                                         f"(only numpy, pandas and pyarrow data are allowed)")
        if module.startswith("numpy.core.") or module == "numpy.core":
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def load_lswmd(path: str | Path, data: bytes | None = None):
    """The WM-811K DataFrame; tolerant of old pandas module paths and Python 2 strings (latin-1)."""
    where = str(path)
    raw = data if data is not None else Path(path).read_bytes()
    errors = []
    for encoding in ("ASCII", "latin1"):
        try:
            frame = _TolerantUnpickler(io.BytesIO(raw), encoding=encoding).load()
            break
        except Exception as exc:  # noqa: BLE001 - any failure here means "try the next way", reported below
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise WaferFormatError(f"{where}: not a readable WM-811K pickle ({'; '.join(errors)})")
    columns = getattr(frame, "columns", None)
    if columns is None or "waferMap" not in set(columns):
        found = list(columns) if columns is not None else type(frame).__name__
        raise WaferFormatError(f"{where}: expected a DataFrame with a waferMap column (LSWMD.pkl), found {found}")
    return frame


def _nested_label(value) -> str | None:
    """`[['Center']]` -> 'Center'; empty arrays/lists, None and NaN -> None (unlabelled)."""
    while isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            return None
        value = value[0]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def read_lswmd(path: str | Path, data: bytes | None = None) -> Iterator[WaferMap | WaferReadError]:
    where = str(path)
    frame = load_lswmd(path, data)
    columns = set(frame.columns)
    for i, row in enumerate(frame.itertuples(index=False)):
        values = row._asdict() if hasattr(row, "_asdict") else dict(zip(frame.columns, row))
        lot = _nested_label(values.get("lotName")) if "lotName" in columns else None
        index = values.get("waferIndex") if "waferIndex" in columns else None
        slot = int(index) if index is not None and np.isfinite(float(index)) else None
        wafer_id = f"{lot}_{slot:02d}" if lot and slot is not None else f"{Path(path).stem}_{i:06d}"
        source = f"{where}#{i}"
        try:
            grid = check_grid(values["waferMap"], source)
        except WaferFormatError as exc:
            yield WaferReadError(wafer_id, source, str(exc))
            continue
        failure = _nested_label(values.get("failureType")) if "failureType" in columns else None
        if failure is not None and failure not in CLASSES:
            yield WaferReadError(wafer_id, source, f"{source}: unknown failureType {failure!r}; "
                                                   f"expected one of {', '.join(CLASSES)}")
            continue
        labels = None if failure is None else (() if failure == "none" else (failure,))
        die_size = values.get("dieSize") if "dieSize" in columns else None
        yield WaferMap(grid=grid, wafer_id=wafer_id, source=source, lot_id=lot, slot=slot,
                       die_size=float(die_size) if die_size is not None else None, labels=labels)


# ------------------------------------------------------------------------------------------------------------ G85 XML


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(elem, name: str):
    for c in elem:
        if _local(c.tag) == name:
            return c
    return None


def read_g85(path: str | Path, data: bytes | None = None) -> WaferMap:
    """SEMI G85 XML map: bin codes per die, `<Bin BinQuality=Pass|Fail>`, `NullBin` for positions with no die."""
    where = str(path)
    raw = data if data is not None else Path(path).read_bytes()
    if b"<!DOCTYPE" in raw[:4096] or b"<!ENTITY" in raw:
        raise WaferFormatError(f"{where}: DTDs and entities are not allowed in a G85 map")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise WaferFormatError(f"{where}: not well-formed XML ({exc})") from exc
    if _local(root.tag) != "Map":
        raise WaferFormatError(f"{where}: expected a G85 <Map> root element, found <{_local(root.tag)}>")
    device = _child(root, "Device")
    if device is None:
        raise WaferFormatError(f"{where}: <Map> has no <Device> element")
    try:
        rows, cols = int(device.get("Rows", "")), int(device.get("Columns", ""))
    except ValueError as exc:
        raise WaferFormatError(f"{where}: Device Rows/Columns must be integers, found "
                               f"{device.get('Rows')!r}/{device.get('Columns')!r}") from exc
    if rows <= 0 or cols <= 0:
        raise WaferFormatError(f"{where}: Device Rows/Columns must be positive, found {rows}x{cols}")
    null_bin = device.get("NullBin")
    if null_bin is None:
        raise WaferFormatError(f"{where}: Device has no NullBin attribute")
    bin_type = (device.get("BinType") or "ASCII").lower()
    quality: dict[str, str] = {}
    for b in device:
        if _local(b.tag) != "Bin":
            continue
        code, q = b.get("BinCode"), (b.get("BinQuality") or "").strip().lower()
        if code is None or q not in ("pass", "fail"):
            raise WaferFormatError(f"{where}: <Bin> needs BinCode and BinQuality Pass|Fail, found "
                                   f"BinCode={code!r} BinQuality={b.get('BinQuality')!r}")
        quality[_norm_code(code, bin_type)] = q
    data_elem = _child(device, "Data")
    row_elems = [r for r in data_elem if _local(r.tag) == "Row"] if data_elem is not None else []
    if len(row_elems) != rows:
        raise WaferFormatError(f"{where}: Device says Rows={rows}, the Data element holds {len(row_elems)} <Row>s")
    null = _norm_code(null_bin, bin_type)
    codes = np.empty((rows, cols), dtype=object)
    for i, r in enumerate(row_elems):
        text = (r.text or "").strip()
        cells = text.split() if bin_type in ("decimal", "integer2") or " " in text else list(text)
        if bin_type == "hexadecimal" and " " not in text:
            cells = [text[k:k + 2] for k in range(0, len(text), 2)]
        if len(cells) != cols:
            raise WaferFormatError(f"{where}: row {i} holds {len(cells)} bins, Device says Columns={cols}")
        codes[i] = [_norm_code(c, bin_type) for c in cells]
    unknown = sorted({c for c in codes.ravel() if c != null and c not in quality})
    if unknown:
        raise WaferFormatError(f"{where}: bin codes {unknown[:5]} have no <Bin> entry; known bins "
                               f"{sorted(quality)} and NullBin {null!r}")
    grid = np.full((rows, cols), NO_DIE, dtype=np.uint8)
    for code, q in quality.items():
        grid[codes == code] = PASS if q == "pass" else FAIL
    grid = check_grid(grid, where)
    # Orientation: degrees clockwise of the notch from 6 o'clock; rotate so the notch ends at the bottom.
    try:
        orientation = int(float(device.get("Orientation", "0"))) % 360
    except ValueError as exc:
        raise WaferFormatError(f"{where}: Orientation must be 0/90/180/270, found {device.get('Orientation')!r}") \
            from exc
    if orientation % 90:
        raise WaferFormatError(f"{where}: Orientation must be 0/90/180/270, found {orientation}")
    k = orientation // 90
    grid, codes = np.rot90(grid, k).copy(), np.rot90(codes, k).astype(str)
    slot = root.get("SlotNumber") or device.get("SlotNumber")
    return WaferMap(grid=grid, wafer_id=root.get("WaferId") or Path(path).stem, source=where,
                    lot_id=device.get("LotId"), product=device.get("ProductId"),
                    slot=int(slot) if slot and slot.isdigit() else None, bins=codes, bin_quality=quality,
                    null_bin=null)


def _norm_code(code: str, bin_type: str) -> str:
    code = code.strip()
    if bin_type in ("decimal", "integer2") and code.isdigit():
        return str(int(code))
    return code.upper() if bin_type == "hexadecimal" else code


def g85_xml(wafer: WaferMap) -> bytes:
    """G85 XML text for a wafer; its own bins when it has them, else bins `1` pass, `X` fail, null `.`."""
    if wafer.bins is not None and wafer.bin_quality:
        codes, quality, null = np.asarray(wafer.bins, dtype=str), dict(wafer.bin_quality), wafer.null_bin or "."
    else:
        codes = np.select([wafer.grid == PASS, wafer.grid == FAIL], ["1", "X"], ".").astype(str)
        quality, null = {"1": "pass", "X": "fail"}, "."
    single = all(len(c) == 1 for c in [*quality, null])
    root = ET.Element("Map", {"xmlns:semi": G85_NAMESPACE, "WaferId": wafer.wafer_id, "FormatRevision": "G85-1101"})
    rows, cols = wafer.grid.shape
    device = ET.SubElement(root, "Device", {
        "ProductId": wafer.product or "", "LotId": wafer.lot_id or "", "Rows": str(rows), "Columns": str(cols),
        "Orientation": "0", "OriginLocation": "2", "BinType": "ASCII" if single else "Decimal", "NullBin": null})
    if wafer.slot is not None:
        root.set("SlotNumber", str(wafer.slot))
    for code, q in sorted(quality.items()):
        ET.SubElement(device, "Bin", {"BinCode": code, "BinCount": str(int((codes == code).sum())),
                                      "BinQuality": q.capitalize()})
    data = ET.SubElement(device, "Data", {"MapName": "Map", "Version": "1"})
    for r in range(rows):
        ET.SubElement(data, "Row").text = ("" if single else " ").join(codes[r])
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_g85(wafer: WaferMap, path: str | Path) -> Path:
    text = g85_xml(wafer)
    return _atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------------------------- PNG


def render_rgb(grid: np.ndarray, scale: int = 1) -> np.ndarray:
    """(rows*scale, cols*scale, 3) uint8 image of a grid in the report palette."""
    lut = np.array([PALETTE[NO_DIE], PALETTE[PASS], PALETTE[FAIL]], dtype=np.uint8)
    img = lut[grid]
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1) if scale > 1 else img


def write_png(wafer: WaferMap, path: str | Path, scale: int = 4) -> Path:
    """PNG rendering, `scale` pixels per die; the grid size and scale go in text chunks so it reads back exactly."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    rows, cols = wafer.grid.shape
    for key, value in (("wafer_id", wafer.wafer_id), ("lot_id", wafer.lot_id or ""), ("product", wafer.product or ""),
                       ("rows", str(rows)), ("cols", str(cols)), ("die_px", str(scale))):
        info.add_text(key, value)
    image = Image.fromarray(render_rgb(wafer.grid, scale), mode="RGB")
    return _atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def read_png(path: str | Path, data: bytes | None = None) -> WaferMap:
    """A PNG rendering: ours (palette + size in text chunks), or any image whose pixels are one die each, coloured
    in our palette or as grey levels 0 / ~128 / 255 (no die / pass / fail, the common WM-811K rendering)."""
    from PIL import Image, UnidentifiedImageError

    where = str(path)
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise WaferFormatError(f"{where}: not a readable PNG image ({exc})") from exc
    text = getattr(image, "text", {}) or {}
    if image.mode in ("L", "I", "I;16", "P") and "die_px" not in text:
        grey = np.asarray(image.convert("L"), dtype=np.int16)
        grid = np.digitize(grey, [64, 192]).astype(np.uint8)  # <64 no die, 64..191 pass, >=192 fail
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
        scale = int(text.get("die_px", "1") or 1)
        if scale > 1:
            rgb = rgb[scale // 2::scale, scale // 2::scale]
        lut = np.array([PALETTE[NO_DIE], PALETTE[PASS], PALETTE[FAIL]], dtype=np.int32)
        dist = ((rgb[:, :, None, :] - lut[None, None]) ** 2).sum(-1)  # (rows, cols, 3)
        if dist.min(-1).max() > 3 * 40 ** 2:
            raise WaferFormatError(f"{where}: pixel colours are not the wafer palette (white no die, green pass, "
                                   f"red fail) nor grey levels")
        grid = dist.argmin(-1).astype(np.uint8)
    if "rows" in text and "cols" in text and grid.shape != (int(text["rows"]), int(text["cols"])):
        raise WaferFormatError(f"{where}: image holds a {grid.shape} grid, its text chunk says "
                               f"{text['rows']}x{text['cols']}")
    return WaferMap(grid=check_grid(grid, where), wafer_id=text.get("wafer_id") or Path(path).stem, source=where,
                    lot_id=text.get("lot_id") or None, product=text.get("product") or None)


# -------------------------------------------------------------------------------------------------------- dispatching


def read_file(path: str | Path, data: bytes | None = None) -> Iterator[WaferMap | WaferReadError]:
    """Every wafer in one file (by suffix); a file that cannot be read at all yields one WaferReadError."""
    path = Path(str(path))
    suffix = path.suffix.lower()
    if data is None and not path.is_file():
        yield WaferReadError(path.stem, str(path), f"{path}: no such file")
        return
    try:
        if suffix == ".npy":
            yield read_npy(path, data)
        elif suffix in (".xml", ".g85"):
            yield read_g85(path, data)
        elif suffix == ".png":
            yield read_png(path, data)
        elif suffix == ".npz":
            yield from read_mixedwm38(path, data)
        elif suffix in (".pkl", ".pickle"):
            yield from read_lswmd(path, data)
        else:
            raise WaferFormatError(f"{path}: unknown wafer file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    except (WaferFormatError, OSError) as exc:
        message = str(exc) if isinstance(exc, WaferFormatError) else f"{path}: {exc.strerror or exc}"
        yield WaferReadError(path.stem, str(path), message)


def iter_wafers(inputs: Iterable[str | Path]) -> Iterator[WaferMap | WaferReadError]:
    """Lazily, every wafer under `inputs` (files, folders walked in sorted order, zips); one item per wafer."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                if sub.suffix.lower() in SUFFIXES or sub.suffix.lower() == ".zip":
                    yield from iter_wafers([sub])
        elif path.suffix.lower() == ".zip":
            yield from _iter_zip(path)
        elif not path.exists():
            yield WaferReadError(path.stem, str(path), f"{path}: no such file or folder")
        else:
            yield from read_file(path)


def source_file(source: str) -> str:
    """The file a wafer's `source` names: 'a.npz#3' -> 'a.npz', 'lot.zip::x.npy' -> 'lot.zip'."""
    if "::" in source:
        return source.split("::", 1)[0]
    head, sep, tail = source.rpartition("#")
    return head if sep and tail.isdigit() else source


def read_sources(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], WaferMap]:
    """Maps for (source, wafer_id) keys, read back from their files; keys whose file is gone are left out."""
    wanted = set(keys)
    found: dict[tuple[str, str], WaferMap] = {}
    for name in sorted({source_file(source) for source, _ in wanted}):
        if not Path(name).exists():
            continue
        for item in iter_wafers([name]):
            if isinstance(item, WaferMap) and (item.source, item.wafer_id) in wanted:
                found[(item.source, item.wafer_id)] = item
    return found


def _iter_zip(path: Path) -> Iterator[WaferMap | WaferReadError]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield WaferReadError(path.stem, str(path), f"{path}: not a readable zip archive ({exc})")
        return
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            name = info.filename
            if info.is_dir() or Path(name).suffix.lower() not in SUFFIXES or "__MACOSX" in name:
                continue
            member = f"{path}::{name}"
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
                yield WaferReadError(Path(name).stem, member, f"{member}: unreadable zip member ({exc})")
                continue
            for item in read_file(Path(name), data):
                # Name the archive in sources and messages, so the user can find the member.
                if isinstance(item, WaferReadError):
                    yield WaferReadError(item.wafer_id, member + item.source[len(name):],
                                         item.error.replace(name, member, 1))
                else:
                    yield replace(item, source=member + item.source[len(name):])


def _atomic_write(path: str | Path, write) -> Path:
    """Write through a temporary file in the same folder and rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
