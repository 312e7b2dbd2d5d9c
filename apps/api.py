"""The REST API under /api/v1 (bearer tokens from the store), `/healthz`, `/metrics`, and `serve()`.

Every call is authorised by the store (roles, sites, ownership) and audited there; errors are JSON
{"error": {"code", "message"}}; request bodies are capped by the server middleware. See docs/app.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from apps.server.auth import bearer_actor, client_address, require_new_password
from apps.server.errors import ApiError
from apps.store import (AccountLocked, Actor, AuthenticationError, change_password, list_lots, list_reports,
                        list_studies, list_voice_notes)

router = APIRouter()
MAX_FORM_FILES = 5000  # DICOM slices sent as separate multipart parts
LOT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ACCEPT_FORMATS = {"application/pdf": "pdf", "application/dicom": "sr", "application/fhir+json": "fhir",
                  "application/json": "json"}
SUFFIX_FORMATS = {".pdf": "pdf", ".dcm": "sr", ".sr": "sr", ".fhir": "fhir", ".fhir.json": "fhir", ".json": "json"}
ERROR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {
    "type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}}}
ERRORS = {s: {"description": d, "content": ERROR_SCHEMA} for s, d in
          [(400, "bad input"), (401, "missing or refused token"), (403, "role or ownership refuses it"),
           (404, "not found"), (409, "state conflict"), (413, "request too large")]}
REPORT_EDITS = ("findings", "impression", "recommendation", "measurements")


def ctx_of(request: Request):
    return request.app.state.ctx


def token_actor(request: Request) -> Actor:
    """The token's user, even one that still has to change its one-time password (only /me routes use this)."""
    return bearer_actor(ctx_of(request).store, request)


def current_actor(request: Request) -> Actor:
    return require_new_password(ctx_of(request).store, token_actor(request), request)


def plain(obj):
    return jsonable_encoder(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj)


# ------------------------------------------------------------------------------------------------- service routes

@router.get("/healthz", tags=["service"])
def healthz(request: Request):
    ctx = ctx_of(request)
    ctx.store.read(lambda session: None)  # the database answers
    return {"status": "ok", "wafer_model": ctx.wafers.available, "report_model": ctx.ct.generator.model_id}


@router.get("/metrics", tags=["service"], response_class=Response)
def metrics(request: Request):
    ctx = ctx_of(request)
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)


@router.get("/api/v1/me", tags=["accounts"], responses=ERRORS)
def me(actor: Actor = Depends(token_actor)):
    return {"username": actor.username, "role": actor.role, "site": actor.site,
            "must_change_password": actor.must_change_password}


PASSWORD_EXAMPLE = {"current_password": "the one printed at first start", "new_password": "a long new passphrase"}


@router.post("/api/v1/me/password", tags=["accounts"], responses={**ERRORS, 423: {
    "description": "locked after repeated wrong passwords", "content": ERROR_SCHEMA}})
def new_password(request: Request, body: dict = Body(..., examples=[PASSWORD_EXAMPLE]),
                 actor: Actor = Depends(token_actor)):
    """Change your password (`current_password`, `new_password`); the first-start admin must do this before any
    other call. Wrong current passwords count toward the log-in lockout. Tokens and sessions stay valid."""
    unknown = sorted(set(body) - {"current_password", "new_password"})
    if unknown:
        raise ApiError(400, "bad_input", f"body: unknown fields {unknown}; expected current_password, new_password")
    for key in ("current_password", "new_password"):
        if not isinstance(body.get(key), str):
            raise ApiError(400, "bad_input", f"{key}: expected text, found "
                                             f"{'nothing' if key not in body else type(body[key]).__name__}")
    try:
        changed = change_password(ctx_of(request).store, actor, body["current_password"], body["new_password"],
                                  client=client_address(request))
    except AccountLocked:
        raise
    except AuthenticationError as exc:  # the token is fine; the current password given is not
        raise ApiError(403, "wrong_password", str(exc)) from exc
    return {"username": changed.username, "must_change_password": changed.must_change_password}


# ---------------------------------------------------------------------------------------------------------- CT

async def _form(request: Request):
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", f"Content-Type: expected multipart/form-data, found "
                                                      f"{kind or 'nothing'}")
    try:
        return await request.form(max_files=MAX_FORM_FILES, max_fields=100)
    except ApiError:
        raise
    except Exception as exc:  # multipart parser errors (malformed body, too many parts)
        if type(exc).__name__ == "TooLarge":
            raise
        raise ApiError(400, "bad_multipart", f"multipart body: {exc}") from exc


def _save_uploads(parts: list[UploadFile], folder: Path, prefix: str):
    from apps.server.ct import UploadedFile

    out = []
    for i, part in enumerate(parts):
        # The client's name is kept for messages only; the file on disk gets a name we choose.
        path = folder / f"{prefix}{i:05d}"
        with open(path, "wb") as dst:
            shutil.copyfileobj(part.file, dst, 1 << 20)
        out.append(UploadedFile(name=Path(part.filename or f"{prefix}{i}").name[:200], path=path))
    return out


MULTIPART_CT = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "DICOM files of one CT series, or a zip of them"},
        "voice": {"type": "string", "format": "binary", "description": "optional voice note (wav, mp3, m4a...)"}}}}}}}


@router.post("/api/v1/ct/studies", tags=["ct"], status_code=201, openapi_extra=MULTIPART_CT, responses=ERRORS)
async def create_study(request: Request, actor: Actor = Depends(current_actor)):
    """Upload one CT series (DICOM files or a zip) and an optional voice note -> the stored study and its draft."""
    from apps.server.auth import require_role

    ctx = ctx_of(request)
    require_role(actor, "clinician")
    form = await _form(request)
    try:
        files = [v for k, v in form.multi_items() if k == "files" and isinstance(v, UploadFile)]
        voices = [v for k, v in form.multi_items() if k == "voice" and isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, "bad_input", "files: expected one or more DICOM files or a zip in 'files' parts")
        if len(voices) > 1:
            raise ApiError(400, "bad_input", f"voice: expected at most one voice note, found {len(voices)}")
        work = ctx.ct.scratch()
        try:
            uploads = await run_in_threadpool(_save_uploads, files, work, "f")
            voice = (await run_in_threadpool(_save_uploads, voices, work, "v"))[0] if voices else None
            study, report = await run_in_threadpool(ctx.ct.upload, actor, uploads, voice,
                                                    client=client_address(request))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        await form.close()
    return JSONResponse({"study": plain(study), "report": _report_json(report)}, status_code=201)


def _report_json(info) -> dict:
    data = plain(info)
    data.pop("model_draft", None)  # the model's original is in the report's history view, not every response
    return data


@router.get("/api/v1/ct/studies", tags=["ct"], responses=ERRORS)
def studies(request: Request, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=10**9),
            actor: Actor = Depends(current_actor)):
    ctx = ctx_of(request)
    return {"studies": [plain(s) for s in list_studies(ctx.store, actor, limit=limit, offset=offset,
                                                       client=client_address(request))]}


@router.get("/api/v1/ct/studies/{study_id}", tags=["ct"], responses=ERRORS)
def study(request: Request, study_id: int, actor: Actor = Depends(current_actor)):
    from apps.store import get_study

    ctx = ctx_of(request)
    client = client_address(request)
    info = get_study(ctx.store, actor, study_id, client=client)
    return {"study": plain(info),
            "reports": [_report_json(r) for r in list_reports(ctx.store, actor, study_id, client=client)],
            "voice_notes": [plain(v) for v in list_voice_notes(ctx.store, actor, study_id, client=client)]}


def _parse_report_ref(ref: str, accept: str) -> tuple[int, str]:
    m = re.fullmatch(r"(\d{1,12})((?:\.[a-z]+){0,2})", ref)
    if not m:
        raise ApiError(404, "not_found", f"report {ref!r}: expected a report id, optionally with a suffix "
                                         f"({', '.join(SUFFIX_FORMATS)})")
    report_id, suffix = int(m.group(1)), m.group(2)
    if suffix:
        if suffix not in SUFFIX_FORMATS:
            raise ApiError(404, "not_found", f"report suffix {suffix!r}: expected one of {', '.join(SUFFIX_FORMATS)}")
        return report_id, SUFFIX_FORMATS[suffix]
    for item in (accept or "").split(","):
        media = item.split(";")[0].strip().lower()
        if media in ACCEPT_FORMATS:
            return report_id, ACCEPT_FORMATS[media]
        if media in ("*/*", "application/*", ""):
            return report_id, "json"
    if accept.strip():
        raise ApiError(406, "not_acceptable", f"Accept: expected one of {', '.join(ACCEPT_FORMATS)}, found {accept!r}")
    return report_id, "json"


@router.get("/api/v1/reports/{report_ref}", tags=["ct"], responses={**ERRORS, 200: {"content": {
    "application/json": {}, "application/pdf": {}, "application/dicom": {}, "application/fhir+json": {}}}})
def report(request: Request, report_ref: str, deidentified: bool = False, actor: Actor = Depends(current_actor)):
    """A report as JSON (default), PDF, DICOM SR or FHIR, chosen by Accept or by suffix (.json .pdf .dcm .fhir)."""
    ctx = ctx_of(request)
    report_id, fmt = _parse_report_ref(report_ref, request.headers.get("accept", ""))
    client = client_address(request)
    if fmt == "json" and not deidentified and "." not in report_ref:  # the API view; `.json` is the export file
        info, content = ctx.ct.report(actor, report_id, client=client)
        return {"report": _report_json(info), "content": json.loads(content.to_json())}
    data, media, name = ctx.ct.export(actor, report_id, fmt, deidentify=deidentified, client=client)
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _report_edits(body: dict, allowed: tuple[str, ...]) -> dict:
    """The edit fields of a PATCH or amend body, type-checked (the report model checks their contents)."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, "bad_input", f"body: unknown fields {unknown}; expected {', '.join(allowed)}")
    for key in ("impression", "recommendation", "reason"):
        if key in body and not isinstance(body[key], str):
            raise ApiError(400, "bad_input", f"{key}: expected text, found {type(body[key]).__name__}")
    for key, what in (("findings", "section -> text"), ("measurements", "measurement id -> fields")):
        if key in body and not isinstance(body[key], dict):
            raise ApiError(400, "bad_input", f"{key}: expected an object of {what}")
    return {k: body.get(k) for k in REPORT_EDITS}


EDIT_EXAMPLE = {"impression": "7 mm solid nodule in the right upper lobe (M1).",
                "measurements": {"M1": {"diameter_mm": 7.0}}}
AMEND_EXAMPLE = {"reason": "nodule re-measured on the thin-slice series",
                 "impression": "9 mm solid nodule in the right upper lobe (M1).",
                 "measurements": {"M1": {"diameter_mm": 9.0}}}


@router.patch("/api/v1/reports/{report_id}", tags=["ct"], responses=ERRORS)
def edit_report(request: Request, report_id: int, edits: dict = Body(..., examples=[EDIT_EXAMPLE]),
                actor: Actor = Depends(current_actor)):
    """Edit a draft or an unsigned amendment (its author): `findings` (section -> text), `impression`,
    `recommendation`, `measurements` (id -> fields). Edited measurements are marked and the report is grounded
    again."""
    ctx = ctx_of(request)
    info = ctx.ct.edit(actor, report_id, **_report_edits(edits, REPORT_EDITS), client=client_address(request))
    return {"report": _report_json(info), "flags": info.content.get("flags", [])}


@router.post("/api/v1/reports/{report_id}/amend", tags=["ct"], status_code=201, responses=ERRORS)
def amend(request: Request, report_id: int, body: dict = Body(..., examples=[AMEND_EXAMPLE]),
          actor: Actor = Depends(current_actor)):
    """Amend the newest signed version (clinician): `reason` (required) and the sections to change, as for PATCH.
    -> 201 the new version, status `amended`, not signed yet, grounded again; edit it with PATCH, then sign it."""
    ctx = ctx_of(request)
    edits = _report_edits(body, ("reason", *REPORT_EDITS))
    if not (body.get("reason") or "").strip():
        raise ApiError(400, "bad_input", "reason: expected why the signed report is amended, found nothing")
    info = ctx.ct.amend(actor, report_id, reason=body["reason"], **edits, client=client_address(request))
    return JSONResponse({"report": _report_json(info), "flags": info.content.get("flags", [])}, status_code=201)


@router.post("/api/v1/reports/{report_id}/sign", tags=["ct"], responses=ERRORS)
def sign(request: Request, report_id: int, actor: Actor = Depends(current_actor)):
    """Sign a draft (it becomes `final`) or an unsigned amendment (it stays `amended`), as a clinician; a signed
    version cannot be signed again (409)."""
    ctx = ctx_of(request)
    return {"report": _report_json(ctx.ct.sign(actor, report_id, client=client_address(request)))}


# ------------------------------------------------------------------------------------------------------- wafers

MULTIPART_WAFERS = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "wafer maps: .npy .npz .pkl .xml/.g85 .png or a zip of them"},
        "lot": {"type": "string"}, "product": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["maps"], "properties": {
        "lot": {"type": "string"}, "product": {"type": "string"},
        "maps": {"type": "array", "items": {"type": "object", "required": ["wafer_id", "grid"], "properties": {
            "wafer_id": {"type": "string"}, "slot": {"type": "integer"}, "source": {"type": "string"},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}}}}}}}}}}


def _lot_and_product(lot, product) -> tuple[str, str]:
    import datetime as dt
    import secrets

    if lot is None or lot == "":
        lot = f"LOT-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    if not isinstance(lot, str) or not LOT_ID.match(lot):
        raise ApiError(400, "bad_input", f"lot: expected 1-64 letters, digits or . _ : -, found {lot!r}")
    if product is None:
        product = ""
    if not isinstance(product, str) or len(product) > 64:
        raise ApiError(400, "bad_input", "product: expected text of at most 64 characters")
    return lot, product


@router.post("/api/v1/wafers/score", tags=["wafers"], openapi_extra=MULTIPART_WAFERS, responses={
    **ERRORS, 503: {"description": "no wafer model", "content": ERROR_SCHEMA}})
async def score_wafers(request: Request, actor: Actor = Depends(current_actor)):
    """Score wafer maps (multipart `files` + `lot` + `product`, or JSON `maps`): one result per wafer, in the
    `mmcore wafer score --out x.jsonl` shape, all stored under the lot."""
    from apps.server.auth import require_role
    from apps.server.wafers import WaferFile, maps_from_json, read_uploads

    ctx = ctx_of(request)
    require_role(actor, "engineer", "admin")
    settings = ctx.settings
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"body: not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "bad_input", "body: expected an object with 'maps', 'lot' and 'product'")
        lot, product = _lot_and_product(body.get("lot"), body.get("product"))
        items = await run_in_threadpool(maps_from_json, body.get("maps"), settings.max_wafer_maps)
    else:
        form = await _form(request)
        try:
            lot, product = _lot_and_product(form.get("lot"), form.get("product"))
            parts = [v for k, v in form.multi_items() if k == "files" and isinstance(v, UploadFile)]
            if not parts:
                raise ApiError(400, "bad_input", "files: expected one or more wafer map files or a zip")
            files = [WaferFile(Path(p.filename or "upload").name[:200], await p.read()) for p in parts]
        finally:
            await form.close()
        items = await run_in_threadpool(read_uploads, files, settings.max_wafer_maps,
                                        8 * settings.max_request_bytes)
    results = await run_in_threadpool(ctx.wafers.score, actor, lot, product, items, client=client_address(request))
    return {"lot": lot, "product": product, "model_id": ctx.wafers.model_id, "results": results}


@router.get("/api/v1/lots", tags=["wafers"], responses=ERRORS)
def lots(request: Request, actor: Actor = Depends(current_actor)):
    return {"lots": [plain(lot) for lot in list_lots(ctx_of(request).store, actor)]}


@router.get("/api/v1/lots/{lot}", tags=["wafers"], responses={**ERRORS, 200: {"content": {
    "application/json": {}, "text/csv": {}, "application/pdf": {}}}})
def lot_report(request: Request, lot: str, format: str = Query("json", pattern="^(json|csv|pdf)$"),
               actor: Actor = Depends(current_actor)):
    """The lot report: yield, class histogram, excursions, thresholds (JSON), or the CSV / PDF export."""
    ctx = ctx_of(request)
    if not LOT_ID.match(lot):
        raise ApiError(404, "not_found", f"lot {lot!r}: not a lot id")
    client = client_address(request)
    if format == "json":
        report = ctx.wafers.lot_report(actor, lot, client=client)
        return {"lot": report.summary(), "wafers": [plain(w) for w in report.wafers]}
    data, media, name = ctx.wafers.export(actor, lot, format, client=client)
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


# --------------------------------------------------------------------------------------------------- downloads

@router.get("/files/reports/{report_ref}", include_in_schema=False)
def ui_report_download(request: Request, report_ref: str, deidentified: bool = False):
    """UI downloads: the session cookie instead of a token; the store checks the user may see the report."""
    from apps.server.auth import cookie_token

    ctx = ctx_of(request)
    actor = ctx.actor_for_session(cookie_token(request.headers), client_address(request))
    if actor is None:
        raise ApiError(401, "unauthenticated", "log in first")
    report_id, fmt = _parse_report_ref(report_ref, "")
    data, media, name = ctx.ct.export(actor, report_id, fmt, deidentify=deidentified,
                                      client=client_address(request))
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/files/lots/{lot}.{fmt}", include_in_schema=False)
def ui_lot_download(request: Request, lot: str, fmt: str):
    from apps.server.auth import cookie_token

    ctx = ctx_of(request)
    actor = ctx.actor_for_session(cookie_token(request.headers), client_address(request))
    if actor is None:
        raise ApiError(401, "unauthenticated", "log in first")
    if not LOT_ID.match(lot):
        raise ApiError(404, "not_found", f"lot {lot!r}: not a lot id")
    data, media, name = ctx.wafers.export(actor, lot, fmt, client=client_address(request))
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


# --------------------------------------------------------------------------------------------------------- serve

def serve(host: str = "127.0.0.1", port: int = 7860, db_url: str | None = None, data_dir: str | None = None) -> int:
    """Run the application until interrupted (what `mmcore serve` calls)."""
    import logging

    import uvicorn

    from apps.server import Settings, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {"host": host, "port": port, "db_url": db_url}
    if data_dir:
        kwargs["data_dir"] = Path(data_dir)
    settings = Settings(**kwargs)
    app = create_app(settings)
    print(f"mmcore serving on http://{host}:{port}/ (data in {settings.data_dir}; API at /api/v1, "
          f"OpenAPI at /api/v1/openapi.json)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        app.state.ctx.close()
    return 0
