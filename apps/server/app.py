"""The application factory: one store, the model queues, the services, the REST API, the log-in pages and the
Gradio UI mounted at `/`, all behind one middleware that limits bodies, counts requests and guards UI files."""

from __future__ import annotations

import logging
import os
import threading
import time

from fastapi import FastAPI

from apps.server.auth import bootstrap_admin, cookie_token, session_actor
from apps.server.ct import CTService
from apps.server.errors import install_handlers
from apps.server.files import FileRegistry
from apps.server.inference import ModelQueue
from apps.server.metrics import Metrics
from apps.server.middleware import ServerMiddleware
from apps.server.settings import Settings
from apps.server.wafers import WaferService
from apps.store import Actor, open_store

log = logging.getLogger("mmcore.server")
SESSION_CACHE_S = 5.0  # a session checked this recently is not re-read from the database (revocation lag, s)
VERSION = "1.0"


def offline_environment(settings: Settings) -> None:
    """Gradio settings that keep the app offline and its cache inside the data folder (set before importing it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(settings.gradio_dir)
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    os.environ["GRADIO_MCP_SERVER"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MMCORE_OFFLINE", "1")


class ServerContext:
    """Everything a request handler needs; one per app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(settings.db_url, settings.data_dir)
        self.metrics = Metrics()
        self.files = FileRegistry(settings.gradio_dir)
        self.files.reset()
        self.ct = CTService(self.store, settings, ModelQueue("ct", settings.ct_workers, self.metrics),
                            ModelQueue("speech", settings.speech_workers, self.metrics))
        self.wafers = WaferService(self.store, settings, self.metrics)
        self._sessions: dict[str, tuple[Actor, float]] = {}
        self._lock = threading.Lock()
        self.bootstrap_password = bootstrap_admin(self.store) if settings.print_bootstrap else None

    def actor_for_session(self, token: str | None, client: str | None = None) -> Actor | None:
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._sessions.get(token)
            if hit and hit[1] > now:
                return hit[0]
        actor = session_actor(self.store, token, client)
        with self._lock:
            if actor is None:
                self._sessions.pop(token, None)
            else:
                self._sessions[token] = (actor, now + SESSION_CACHE_S)
                if len(self._sessions) > 10_000:
                    self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
        return actor

    def forget_session(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)

    def scope_actor(self, scope) -> Actor | None:
        return self.actor_for_session(cookie_token(scope.get("headers") or []), (scope.get("client") or (None,))[0])

    def session_user(self, scope) -> str | None:
        """The UI's user: None without a session, or while the account's one-time password is unchanged."""
        actor = self.scope_actor(scope)
        return actor.username if actor and not actor.must_change_password else None

    def ui_redirect(self, scope) -> str | None:
        """Where the browser goes instead of the UI: the log-in page, or the password page for a one-time one."""
        actor = self.scope_actor(scope)
        if actor is None:
            return "/login"
        return "/password" if actor.must_change_password else None

    def close(self) -> None:
        self.wafers.batcher.close()
        self.store.close()


def create_app(settings: Settings | None = None, *, ui: bool = True) -> FastAPI:
    settings = settings or Settings()
    offline_environment(settings)
    ctx = ServerContext(settings)
    app = FastAPI(title="mmcore", version=VERSION, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/v1/openapi.json",
                  description="CT draft reports and wafer-map scoring. Authenticate with `Authorization: Bearer "
                              "<token>` (`mmcore users token NAME`). Errors: {\"error\": {\"code\", \"message\"}}.")
    app.state.ctx = ctx
    install_handlers(app)

    from apps.api import router
    from apps.server.pages import pages_router

    app.include_router(router)
    app.include_router(pages_router)
    if ui:
        import gradio as gr

        from apps.web import build_ui

        blocks = build_ui(ctx)
        app = gr.mount_gradio_app(
            app, blocks, path="/", auth_dependency=lambda request: ctx.session_user(request.scope),
            footer_links=[], show_error=True, max_file_size=settings.max_request_bytes,
            blocked_paths=[str(settings.data_dir / "blobs"), str(settings.data_dir / "deid.key"),
                           str(settings.upload_dir)] + ([str(settings.data_dir / "mmcore.db")]),
            allowed_paths=[], ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False,
            css=WEB_CSS, theme=gr.themes.Default())  # the default theme ships its fonts: nothing fetched
        app.state.ctx = ctx
    app.add_middleware(ServerMiddleware, metrics=ctx.metrics, max_bytes=settings.max_request_bytes,
                       files=ctx.files, session_user=ctx.session_user, ui_redirect=ctx.ui_redirect)
    return app


WEB_CSS = """
.mm-flag { border-left: 4px solid #d97706; padding: 4px 8px; margin: 2px 0; background: #fffbeb; }
.mm-critical { border-left: 4px solid #b91c1c; padding: 6px 10px; background: #fef2f2; font-weight: 600; }
.mm-ok { border-left: 4px solid #15803d; padding: 4px 8px; background: #f0fdf4; }
footer { display: none !important; }
table.diff { font-size: 13px; border-collapse: collapse; } table.diff td { padding: 2px 6px; vertical-align: top; }
.diff_add { background: #dcfce7; } .diff_chg { background: #fef9c3; } .diff_sub { background: #fee2e2; }
.diff_header { color: #6b7280; } .diff_next { display: none; }
"""
