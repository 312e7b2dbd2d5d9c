"""The web UI (Gradio Blocks, mounted at `/` by apps.server): CT, Wafers, History and Admin tabs.

Reports: a draft is edited, saved and signed; a signed version is read-only and *Amend report* (with a reason)
opens the next version, which is edited and signed the same way. History shows every version and its diffs.

Every handler resolves the user from the session cookie (apps/server/pages.py logs in) and acts through the same
services and store calls as the REST API. Uploads are moved into the store and deleted from Gradio's cache;
rendered images go into per-user cache files; downloads are FastAPI routes under /files/ that check ownership.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import html
import inspect
import io
import re
from pathlib import Path

import gradio as gr
import numpy as np

from apps.server.auth import cookie_token
from mmcore.errors import InputError
from pipelines.ct.report import SYSTEM_TITLES, SYSTEMS
from pipelines.ct.volume import WINDOWS

MEASUREMENT_COLUMNS = ["id", "type", "side", "lobe", "diameter_mm", "long_axis_mm", "short_axis_mm", "volume_ml",
                       "laa950_percent", "cardiothoracic_ratio", "edited"]
EDITABLE_NUMBERS = ["diameter_mm", "long_axis_mm", "short_axis_mm", "volume_ml", "laa950_percent",
                    "cardiothoracic_ratio"]
WAFER_COLUMNS = ["wafer_id", "source", "status", "predicted_class", "defect_score", "anomaly_score", "error"]
ROLES = ["clinician", "engineer", "admin"]
DIFF_MODEL, DIFF_PREVIOUS = "model draft", "previous version"
DISPLAY_PX = 512  # slices smaller than this are shown enlarged by a whole factor


def sentences(text: str) -> list[str]:
    """One sentence a line: a diff then marks the sentences that changed, not whole long paragraphs."""
    return [part for line in text.splitlines() for part in re.split(r"(?<=[.!?])\s+", line) if part]


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def build_ui(ctx) -> gr.Blocks:
    from apps import store as st

    REPORT_OUTPUTS: list = []  # filled once the widgets exist; handlers return values in this order

    def actor_of(request: gr.Request):
        headers = getattr(request, "headers", None) or {}
        client = getattr(getattr(request, "client", None), "host", None)
        actor = ctx.actor_for_session(cookie_token(headers), client)
        if actor is None:
            raise gr.Error("Your session has ended: reload the page and log in again.")
        return actor, client

    def guarded(fn):
        """Store and input errors become a readable message in the UI instead of a stack trace."""
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except InputError as exc:
                raise gr.Error(str(exc)) from exc
        functools.update_wrapper(run, fn)
        run.__signature__ = inspect.signature(fn)  # Gradio injects gr.Request / gr.Progress by annotation
        return run

    # ------------------------------------------------------------------------------------------------ CT helpers

    def render(actor, study_id, z, window, measurements):
        ingested = ctx.ct.ingested(actor, study_id)
        volume = ingested.volume
        z = int(min(max(int(z), 0), volume.shape[0] - 1))
        boxes = []
        for m in measurements or []:
            c = m.get("center_voxel")
            size = m.get("long_axis_mm") or m.get("diameter_mm")
            if not c or not size:
                continue
            sz, sy, sx = volume.spacing_zyx
            rz = max(1, round(size / 2 / sz))
            if abs(c[0] - z) <= rz:
                ry, rx = size / 2 / sy + 3, size / 2 / sx + 3
                boxes.append((int(c[1] - ry), int(c[2] - rx), int(c[1] + ry), int(c[2] + rx)))
        from pipelines.ct.render import slice_rgb

        rgb = slice_rgb(volume, z, window, boxes=boxes)
        scale = max(1, DISPLAY_PX // max(rgb.shape[:2]))  # small matrices are enlarged for reading (whole pixels)
        if scale > 1:
            rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
        return ctx.files.write(actor.username, f"slice-{z}.png", _png(rgb)), volume.shape[0]

    def flags_html(content: dict) -> str:
        parts = []
        for c in content.get("critical", []):
            parts.append(f'<div class="mm-critical">CRITICAL RESULT: {html.escape(c["message"])}</div>')
        for f in content.get("flags", []):
            mid = f" ({html.escape(f['measurement_id'])})" if f.get("measurement_id") else ""
            parts.append(f'<div class="mm-flag"><b>{html.escape(f["kind"])}</b>{mid}: {html.escape(f["message"])}'
                         "</div>")
        if not parts:
            parts.append('<div class="mm-ok">Grounding: every statement matches a measurement.</div>')
        model = content.get("model", {})
        if model.get("demo"):
            parts.append('<p><i>Drafted by a demonstration model (' + html.escape(model.get("id", "")) +
                         '): not for diagnostic use.</i></p>')
        return "\n".join(parts)

    def links_html(report_id, status, deid) -> str:
        if not report_id:
            return ""
        q = "?deidentified=true" if deid else ""
        items = [(f"/files/reports/{report_id}.pdf{q}", "PDF"), (f"/files/reports/{report_id}.dcm{q}", "DICOM SR"),
                 (f"/files/reports/{report_id}.fhir{q}", "FHIR"), (f"/files/reports/{report_id}.json{q}", "JSON")]
        links = " · ".join(f'<a href="{u}" download id="dl-{label.split()[-1].lower()}">{label}</a>'
                           for u, label in items)
        return (f"<p><b>Report {report_id}</b> ({html.escape(status)}){' de-identified' if deid else ''}: "
                f"{links}</p>")

    def measurement_rows(content):
        rows = []
        for m in content.get("measurements", []):
            rows.append([m.get(c) if c != "edited" else ("edited" if m.get("edited") else "") for c in
                         MEASUREMENT_COLUMNS])
        return rows

    def report_outputs(actor, info, content, deid, z=None, window="lung"):
        """Values for every report widget, in the order of REPORT_OUTPUTS."""
        image, n = render(actor, info.study_id, z if z is not None else _default_slice(content, actor, info),
                          window, content.get("measurements"))
        findings = content.get("findings", {})
        indication = content.get("indication", {})
        transcript = indication.get("transcript") or ""
        editable = info.is_open  # a signed version is shown read-only; Amend opens the next one

        def box(value):
            return gr.update(value=value, interactive=editable)

        return [info.id, info.study_id, image, gr.update(maximum=n - 1, value=z if z is not None else
                                                         _default_slice(content, actor, info)),
                flags_html(content), transcript, *[box(findings.get(s, "")) for s in SYSTEMS],
                box(content.get("impression", "")), box(content.get("recommendation", "")),
                box(measurement_rows(content)), status_markdown(actor, info), links_html(info.id, info.status, deid),
                gr.update(interactive=editable), gr.update(interactive=editable), gr.update(visible=not editable)]

    def status_markdown(actor, info) -> str:
        """This version's state and what to do next, then every version of the study."""
        if info.status == "draft":
            state = "**draft**: edit, *Save changes*, then *Sign report*"
        elif info.is_open:
            state = (f"**amended**, not signed yet (amends report {info.amends_id}: "
                     f"{html.escape(info.amend_reason or '')}): edit, *Save changes*, then *Sign report*")
        else:
            state = (f"**{info.status}**, signed by {html.escape(info.signer)} at {info.signed_at:%Y-%m-%d %H:%M} UTC;"
                     " read-only (*Amend report* opens a new version)")
        versions = []
        for r in st.list_reports(ctx.store, actor, info.study_id):
            signed = f"signed by {html.escape(r.signer)}" if r.signer else "not signed"
            mark = "**" if r.id == info.id else ""
            versions.append(f"{mark}v{r.version} (report {r.id}) {r.status}, {signed}{mark}")
        return f"Report {info.id}, version {info.version}: {state}  \nVersions: " + " · ".join(versions)

    def _default_slice(content, actor, info):
        for m in content.get("measurements", []):
            if m.get("center_voxel"):
                return int(m["center_voxel"][0])
        return ctx.ct.ingested(actor, info.study_id).volume.shape[0] // 2

    def study_choices(actor):
        return [(f"{s.id}: {s.description or s.study_uid[:24]} ({s.created_at:%Y-%m-%d %H:%M})", s.id)
                for s in st.list_studies(ctx.store, actor, limit=200)]

    # ------------------------------------------------------------------------------------------------ handlers

    @guarded
    def on_load(request: gr.Request):
        actor, _ = actor_of(request)
        header = (f"### mmcore &nbsp; <small>signed in as **{html.escape(actor.username)}** ({actor.role}, site "
                  f"{html.escape(actor.site)}) · [Change password](/password) · [Log out](/logout)</small>")
        choices = study_choices(actor) if actor.role in ("clinician", "admin") else []
        clinical, wafers = actor.role in ("clinician", "admin"), actor.role in ("engineer", "admin")
        # Role tabs start hidden and are shown here (Gradio shows a hidden tab on update, not the reverse).
        return (header, gr.update(choices=choices), gr.Tab(visible=actor.role == "admin"),
                gr.update(visible=actor.role == "admin"), gr.Tab(visible=clinical), gr.Tab(visible=wafers),
                gr.Tabs(selected="ct" if clinical else "wafers"), gr.update(visible=clinical),
                gr.update(visible=wafers))

    @guarded
    def on_generate(files, voice, deid, request: gr.Request, progress=gr.Progress()):
        from apps.server.ct import UploadedFile

        actor, client = actor_of(request)
        if not files:
            raise gr.Error("Choose DICOM files or a zip of one CT series first.")
        paths = [f if isinstance(f, str) else f.name for f in files]
        uploads = [UploadedFile(Path(p).name, Path(p)) for p in paths]
        voice_upload = UploadedFile(Path(voice).name, Path(voice)) if voice else None
        try:
            study, info = ctx.ct.upload(actor, uploads, voice_upload, client=client,
                                        progress=lambda f, text: progress(f, desc=text))
        finally:
            for p in paths + ([voice] if voice else []):
                ctx.files.forget(p)  # the bytes are in the store now (or refused): drop the cached upload
        progress(0.95, desc="rendering")
        out = report_outputs(actor, info, info.content, deid)
        return [None, None, gr.update(choices=study_choices(actor), value=study.id)] + out

    @guarded
    def on_pick_study(study_id, deid, request: gr.Request):
        actor, client = actor_of(request)
        if not study_id:
            return [gr.update()] * len(REPORT_OUTPUTS)
        reports = st.list_reports(ctx.store, actor, int(study_id), client=client)
        if not reports:
            raise gr.Error(f"Study {study_id} has no report yet.")
        info, content = ctx.ct.report(actor, reports[-1].id, client=client)
        return report_outputs(actor, info, content.model_dump(mode="json"), deid)

    @guarded
    def on_slice(report_id, study_id, z, window, rows, request: gr.Request):
        actor, _ = actor_of(request)
        if not study_id:
            return None
        ms = [dict(zip(MEASUREMENT_COLUMNS, r)) for r in _rows(rows)]
        info, content = ctx.ct.report(actor, int(report_id)) if report_id else (None, None)
        measurements = content.model_dump(mode="json")["measurements"] if content else ms
        return render(actor, int(study_id), z, window, measurements)[0]

    def _rows(rows):
        if rows is None:
            return []
        if hasattr(rows, "values"):
            return rows.values.tolist()
        return list(rows)

    @guarded
    def on_save(report_id, deid, z, window, lungs, pleura, heart, mediastinum, bones, abdomen, impression,
                recommendation, rows, request: gr.Request):
        actor, client = actor_of(request)
        if not report_id:
            raise gr.Error("Generate or open a report first.")
        sections = dict(zip(SYSTEMS, (lungs, pleura, heart, mediastinum, bones, abdomen)))
        _, current = ctx.ct.report(actor, int(report_id), client=client)
        edits = {}
        for row in _rows(rows):
            r = dict(zip(MEASUREMENT_COLUMNS, row))
            try:
                m = current.measurement(str(r["id"]))
            except InputError:
                continue
            changed = {}
            for k in EDITABLE_NUMBERS:
                new = r.get(k)
                new = None if new in ("", None) or (isinstance(new, float) and np.isnan(new)) else float(new)
                old = getattr(m, k)
                if (old is None) != (new is None) or (old is not None and abs(old - new) > 1e-6):
                    changed[k] = new
            if changed:
                edits[m.id] = changed
        info = ctx.ct.edit(actor, int(report_id), findings=sections, impression=impression,
                           recommendation=recommendation, measurements=edits, client=client)
        gr.Info(f"Version {info.version} saved ({len(edits)} measurement(s) edited); grounding re-checked.")
        return report_outputs(actor, info, info.content, deid, z, window)

    @guarded
    def on_sign(report_id, deid, z, window, request: gr.Request):
        actor, client = actor_of(request)
        if not report_id:
            raise gr.Error("Generate or open a report first.")
        ctx.ct.sign(actor, int(report_id), client=client)
        info, content = ctx.ct.report(actor, int(report_id), client=client)
        gr.Info(f"Report {report_id} signed.")
        return report_outputs(actor, info, content.model_dump(mode="json"), deid, z, window)

    @guarded
    def on_amend(report_id, reason, deid, z, window, request: gr.Request):
        actor, client = actor_of(request)
        if not report_id:
            raise gr.Error("Open a signed report first.")
        if not (reason or "").strip():
            raise gr.Error("Reason for the amendment: say why the signed report changes.")
        info = ctx.ct.amend(actor, int(report_id), reason=reason, client=client)
        gr.Info(f"Version {info.version} (report {info.id}) amends report {report_id}: edit it, save and sign it.")
        return report_outputs(actor, info, info.content, deid, z, window) + [""]

    @guarded
    def on_open_report(report_id, deid, request: gr.Request):
        """History -> CT tab: one version of a report, with its study's slices."""
        actor, client = actor_of(request)
        if not report_id:
            raise gr.Error("Enter a report id from the table.")
        info, content = ctx.ct.report(actor, int(report_id), client=client)
        return report_outputs(actor, info, content.model_dump(mode="json"), deid) + [
            gr.Tabs(selected="ct"), gr.update(value=info.study_id)]

    @guarded
    def on_deid(report_id, deid, request: gr.Request):
        actor, client = actor_of(request)
        if not report_id:
            return ""
        info = st.get_report(ctx.store, actor, int(report_id), client=client)
        return links_html(info.id, info.status, deid)

    # ------------------------------------------------------------------------------------------------ wafers

    @guarded
    def on_score(files, lot, product, request: gr.Request, progress=gr.Progress()):
        from apps.api import _lot_and_product
        from apps.server.errors import ApiError
        from apps.server.wafers import WaferFile, read_uploads

        actor, client = actor_of(request)
        if not files:
            raise gr.Error("Choose wafer map files (or a zip) first.")
        paths = [f if isinstance(f, str) else f.name for f in files]
        try:
            lot, product = _lot_and_product((lot or "").strip(), (product or "").strip())
            progress(0.1, desc="reading maps")
            items = read_uploads([WaferFile(Path(p).name, Path(p).read_bytes()) for p in paths],
                                 ctx.settings.max_wafer_maps, 8 * ctx.settings.max_request_bytes)
            progress(0.3, desc=f"scoring {len(items)} wafers")
            results = ctx.wafers.score(actor, lot, product, items, client=client)
        except ApiError as exc:
            raise gr.Error(exc.message) from exc
        finally:
            for p in paths:
                ctx.files.forget(p)
        progress(0.9, desc="lot report")
        rows = [[r[c] if c in r else None for c in WAFER_COLUMNS] for r in results]
        return [lot, rows] + lot_outputs(actor, lot, client)

    def lot_outputs(actor, lot, client):
        from pipelines.wafer.maps import render_rgb
        from pipelines.wafer.report import density_rgb

        report = ctx.wafers.lot_report(actor, lot, client=client)
        s = report.summary()
        hist = ", ".join(f"{k} {v}" for k, v in s["class_histogram"].items() if v)
        md = (f"**Lot {html.escape(lot)}** ({html.escape(s['product'] or 'no product')}): {s['wafers']} wafers, "
              f"{s['scored']} scored, {s['errors']} errors; mean yield "
              f"{'-' if s['mean_yield_pct'] is None else format(s['mean_yield_pct'], '.1f') + ' %'}; "
              f"{len(s['excursions'])} excursions (defect >= {s['thresholds']['defect']}, anomaly >= "
              f"{s['thresholds']['anomaly']}).\n\nClasses: {hist or 'none'}")
        gallery = []
        from PIL import Image

        for w, grid in report.gallery:
            img = Image.fromarray(render_rgb(grid)).resize((160, 160), Image.NEAREST)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            path = ctx.files.write(actor.username, f"{w.wafer_id}.png", buf.getvalue())
            gallery.append((path, f"{w.wafer_id}: {w.predicted_class} ({', '.join(w.flags)})"))
        density = None
        if report.density is not None:
            density = ctx.files.write(actor.username, "density.png", _png(density_rgb(report.density)))
        links = " · ".join(f'<a href="/files/lots/{html.escape(lot)}.{k}" download>{k.upper()}</a>'
                           for k in ("pdf", "csv", "json"))
        return [md, gallery, density, f"<p>Lot report: {links}</p>"]

    # ------------------------------------------------------------------------------------------------ history

    @guarded
    def on_history(since, user, status, request: gr.Request):
        actor, client = actor_of(request)
        try:
            since_dt = dt.datetime.fromisoformat(since.strip()).replace(tzinfo=dt.timezone.utc) if since and \
                since.strip() else None
        except ValueError as exc:
            raise gr.Error(f"From date: expected YYYY-MM-DD, found {since!r}") from exc
        user = (user or "").strip()
        studies, reports = [], []
        if actor.role in ("clinician", "admin"):
            for s in st.list_studies(ctx.store, actor, limit=500, client=client):
                if since_dt and s.created_at.replace(tzinfo=dt.timezone.utc) < since_dt:
                    continue
                if user and s.owner != user:
                    continue
                studies.append([s.id, s.description, s.patient_pseudonym, s.study_date, s.owner, s.site,
                                f"{s.created_at:%Y-%m-%d %H:%M}"])
                for r in st.list_reports(ctx.store, actor, s.id, client=client):
                    if status and status != "any" and r.status != status:
                        continue
                    reports.append([r.id, s.id, r.version, r.status, r.author, r.signer or "",
                                    f"{r.signed_at:%Y-%m-%d %H:%M}" if r.signed_at else "", r.amends_id or "",
                                    r.amend_reason or "", r.model_id or ""])
        lots = []
        if actor.role in ("engineer", "admin"):
            for lot in st.list_lots(ctx.store, actor):
                if since_dt and lot.created_at.replace(tzinfo=dt.timezone.utc) < since_dt:
                    continue
                lots.append([lot.lot_id, lot.product, lot.site, f"{lot.created_at:%Y-%m-%d %H:%M}"])
        audit = []
        if actor.role == "admin":
            for e in st.audit_events(ctx.store, actor, username=user or None, since=since_dt, limit=300,
                                     client=client):
                audit.append([f"{e.at:%Y-%m-%d %H:%M:%S}", e.username, e.role, e.action, e.object_type,
                              e.object_id, e.outcome, e.client])
        return studies, reports, lots, audit

    @guarded
    def on_diff(report_id, against, request: gr.Request):
        from pipelines.ct.report import CTReport

        actor, client = actor_of(request)
        if not report_id:
            raise gr.Error("Enter a report id from the table.")
        info = st.get_report(ctx.store, actor, int(report_id), client=client)
        label = "current text" if info.is_open else "signed text"
        if against == DIFF_PREVIOUS:
            if not info.amends_id:
                return f"<p>Report {info.id} is version {info.version}: there is no earlier version to compare.</p>"
            before_info = st.get_report(ctx.store, actor, info.amends_id, client=client)
            before_content, before_label = before_info.content, f"version {before_info.version}"
        else:
            if not info.model_draft:
                return "<p>This report has no model draft to compare with.</p>"
            before_content, before_label = info.model_draft, "model draft"
        before, after = (sentences(CTReport.model_validate(c).narrative()) for c in (before_content, info.content))
        table = difflib.HtmlDiff(wrapcolumn=100).make_table(before, after, before_label,
                                                           f"version {info.version} ({label})", context=False)
        reason = f"; reason: {html.escape(info.amend_reason)}" if info.amend_reason else ""
        return (f"<p>Report {info.id}, version {info.version} ({info.status}{reason}): {before_label} vs "
                f"{label}</p>" + table)

    # ------------------------------------------------------------------------------------------------ admin

    @guarded
    def on_users(request: gr.Request):
        actor, _ = actor_of(request)
        return [[u.username, u.role, u.site, "yes" if u.active else "no",
                 f"{u.locked_until:%Y-%m-%d %H:%M}" if u.locked_until else "",
                 "not changed yet" if u.must_change_password else "", f"{u.created_at:%Y-%m-%d}"]
                for u in st.list_users(ctx.store, actor)]

    @guarded
    def on_add_user(username, password, role, site, request: gr.Request):
        actor, client = actor_of(request)
        st.create_user(ctx.store, actor, (username or "").strip(), password or "", role, (site or "main").strip(),
                       client=client)
        gr.Info(f"User {username} ({role}) created.")
        return on_users.__wrapped__(request), "", ""

    def set_active(username, active, request):
        actor, client = actor_of(request)
        st.set_user_active(ctx.store, actor, (username or "").strip(), active, client=client)
        return on_users.__wrapped__(request)

    @guarded
    def on_disable(username, request: gr.Request):
        return set_active(username, False, request)

    @guarded
    def on_enable(username, request: gr.Request):
        return set_active(username, True, request)

    # ------------------------------------------------------------------------------------------------ layout

    with gr.Blocks(title="mmcore", analytics_enabled=False, delete_cache=(900, 3600)) as demo:
        header = gr.Markdown("### mmcore")
        report_id = gr.State(None)
        study_id = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("CT report", id="ct", visible=False) as ct_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        ct_files = gr.File(label="DICOM files or a zip of one series", file_count="multiple",
                                           type="filepath", elem_id="ct-files")
                        voice = gr.Audio(label="Voice note (record or upload)", sources=["upload", "microphone"],
                                         type="filepath", elem_id="voice")
                        generate = gr.Button("Generate draft report", variant="primary", elem_id="generate")
                        picker = gr.Dropdown(label="Or open a stored study", choices=[], elem_id="study-picker")
                        deid = gr.Checkbox(label="De-identified exports (PS3.15 basic profile)", value=False,
                                           elem_id="deid")
                        downloads = gr.HTML(elem_id="downloads")
                    with gr.Column(scale=2):
                        slice_image = gr.Image(label="Slice (measured findings boxed)", type="filepath",
                                               interactive=False, height=420, elem_id="slice", buttons=[])
                        with gr.Row():
                            slider = gr.Slider(0, 1, value=0, step=1, label="Slice", elem_id="slice-slider")
                            window = gr.Radio(list(WINDOWS), value="lung", label="Window", elem_id="window")
                status_line = gr.Markdown(elem_id="report-status")
                flags = gr.HTML(elem_id="flags")
                transcript = gr.Textbox(label="Voice note transcript (verbatim)", interactive=False, lines=2,
                                        elem_id="transcript")
                with gr.Accordion("Findings", open=True):
                    section_boxes = [gr.Textbox(label=SYSTEM_TITLES[s], lines=2, elem_id=f"findings-{s}")
                                     for s in SYSTEMS]
                impression = gr.Textbox(label="Impression", lines=3, elem_id="impression")
                recommendation = gr.Textbox(label="Recommendation", lines=2, elem_id="recommendation")
                measurements = gr.Dataframe(headers=MEASUREMENT_COLUMNS, label="Measurements (edit a number to "
                                            "correct it; the row is marked edited and re-grounded)",
                                            interactive=True, wrap=True, elem_id="measurements",
                                            static_columns=[0, 1, 10])
                with gr.Row():
                    save = gr.Button("Save changes", elem_id="save")
                    sign = gr.Button("Sign report", variant="primary", elem_id="sign")
                with gr.Row(visible=False) as amend_row:
                    amend_reason = gr.Textbox(label="Reason for the amendment", scale=3, elem_id="amend-reason",
                                              placeholder="e.g. nodule re-measured on the thin-slice series")
                    amend = gr.Button("Amend report", scale=1, elem_id="amend")
            with gr.Tab("Wafers", id="wafers", visible=False) as wafers_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        wafer_files = gr.File(label="Wafer maps (.npy .npz .pkl .g85/.xml .png) or a zip",
                                              file_count="multiple", type="filepath", elem_id="wafer-files")
                        lot = gr.Textbox(label="Lot id (empty: a new one)", elem_id="lot")
                        product = gr.Textbox(label="Product", elem_id="product")
                        score = gr.Button("Score wafers", variant="primary", elem_id="score")
                    with gr.Column(scale=2):
                        lot_md = gr.Markdown(elem_id="lot-summary")
                        lot_links = gr.HTML()
                        density = gr.Image(label="Stacked fail density", type="filepath", interactive=False,
                                           height=260, buttons=[])
                wafer_table = gr.Dataframe(headers=WAFER_COLUMNS, label="Results", interactive=False, wrap=True,
                                           elem_id="wafer-results")
                gallery = gr.Gallery(label="Excursions (flagged wafers)", columns=6, height=300,
                                     elem_id="wafer-gallery")
            with gr.Tab("History", id="history") as history_tab:
                with gr.Row():
                    since = gr.Textbox(label="From date (YYYY-MM-DD)", elem_id="hist-since")
                    user_filter = gr.Textbox(label="User", elem_id="hist-user")
                    status_filter = gr.Dropdown(["any", "draft", "final", "amended"], value="any", label="Status")
                    refresh = gr.Button("Refresh", elem_id="hist-refresh")
                with gr.Column(visible=False) as history_ct:  # clinicians and admins
                    studies_table = gr.Dataframe(headers=["id", "description", "pseudonym", "date", "owner", "site",
                                                          "uploaded"], label="Studies", interactive=False)
                    reports_table = gr.Dataframe(headers=["report", "study", "version", "status", "author", "signer",
                                                          "signed", "amends", "reason", "model"],
                                                 label="Report versions", interactive=False, elem_id="hist-reports")
                    with gr.Row():
                        diff_id = gr.Number(label="Report id", precision=0, elem_id="diff-id")
                        diff_against = gr.Radio([DIFF_MODEL, DIFF_PREVIOUS], value=DIFF_MODEL, label="Compare with",
                                                elem_id="diff-against")
                        diff_btn = gr.Button("Show differences", elem_id="diff")
                        open_btn = gr.Button("Open in the CT report tab", elem_id="hist-open")
                    diff_html = gr.HTML(elem_id="diff-view")
                lots_table = gr.Dataframe(headers=["lot", "product", "site", "created"], label="Lots",
                                          interactive=False, elem_id="hist-lots", visible=False)
                with gr.Group(visible=False) as audit_group:
                    audit_table = gr.Dataframe(headers=["at", "user", "role", "action", "object", "id", "outcome",
                                                        "client"], label="Audit events (admins)", interactive=False)
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                users_table = gr.Dataframe(headers=["user", "role", "site", "active", "locked until",
                                                    "one-time password", "created"],
                                           label="Users", interactive=False, elem_id="users")
                with gr.Row():
                    new_user = gr.Textbox(label="User name (to add, disable or enable)", elem_id="new-user")
                    new_password = gr.Textbox(label="Password (8+ characters)", type="password",
                                              elem_id="new-password")
                    new_role = gr.Dropdown(ROLES, value="clinician", label="Role", elem_id="new-role")
                    new_site = gr.Textbox(label="Site", value="main")
                with gr.Row():
                    add_user = gr.Button("Add user", variant="primary", elem_id="add-user")
                    disable = gr.Button("Disable user")
                    enable = gr.Button("Enable user")
                    users_refresh = gr.Button("Refresh", elem_id="users-refresh")

        REPORT_OUTPUTS[:] = [report_id, study_id, slice_image, slider, flags, transcript, *section_boxes,
                             impression, recommendation, measurements, status_line, downloads, save, sign, amend_row]
        edit_inputs = [*section_boxes, impression, recommendation, measurements]
        demo.load(on_load, None, [header, picker, admin_tab, audit_group, ct_tab, wafers_tab, tabs, history_ct,
                                  lots_table],
                  api_visibility="private")
        generate.click(on_generate, [ct_files, voice, deid], [ct_files, voice, picker] + REPORT_OUTPUTS,
                       api_visibility="private", concurrency_id="ct", concurrency_limit=ctx.settings.ct_workers,
                       show_progress_on=[slice_image, flags])
        slider.release(on_slice, [report_id, study_id, slider, window, measurements], slice_image,
                       api_visibility="private", concurrency_limit=4)
        window.change(on_slice, [report_id, study_id, slider, window, measurements], slice_image,
                      api_visibility="private", concurrency_limit=4)
        save.click(on_save, [report_id, deid, slider, window, *edit_inputs], REPORT_OUTPUTS, api_visibility="private",
                   show_progress_on=[flags])
        sign.click(on_sign, [report_id, deid, slider, window], REPORT_OUTPUTS, api_visibility="private",
                   show_progress_on=[flags])
        picker.input(on_pick_study, [picker, deid], REPORT_OUTPUTS, api_visibility="private",
                     show_progress_on=[slice_image])
        amend.click(on_amend, [report_id, amend_reason, deid, slider, window], REPORT_OUTPUTS + [amend_reason],
                    api_visibility="private", show_progress_on=[flags])
        deid.change(on_deid, [report_id, deid], downloads, api_visibility="private")
        score.click(on_score, [wafer_files, lot, product], [lot, wafer_table, lot_md, gallery, density, lot_links],
                    api_visibility="private", concurrency_id="wafer", concurrency_limit=4,
                    show_progress_on=[wafer_table])
        refresh.click(on_history, [since, user_filter, status_filter],
                      [studies_table, reports_table, lots_table, audit_table], api_visibility="private")
        diff_btn.click(on_diff, [diff_id, diff_against], diff_html, api_visibility="private")
        open_btn.click(on_open_report, [diff_id, deid], REPORT_OUTPUTS + [tabs, picker], api_visibility="private",
                       show_progress_on=[diff_html])
        users_refresh.click(on_users, None, users_table, api_visibility="private")
        # Opening a tab shows its tables at once (no empty table waiting for a Refresh click).
        admin_tab.select(on_users, None, users_table, api_visibility="private")
        history_tab.select(on_history, [since, user_filter, status_filter],
                           [studies_table, reports_table, lots_table, audit_table], api_visibility="private")
        add_user.click(on_add_user, [new_user, new_password, new_role, new_site], [users_table, new_user,
                                                                                   new_password],
                       api_visibility="private")
        disable.click(on_disable, [new_user], users_table, api_visibility="private")
        enable.click(on_enable, [new_user], users_table, api_visibility="private")
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo

