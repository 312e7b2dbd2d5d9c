"""The mmcore server: FastAPI app factory, settings, auth, metrics, model queues and the services behind the REST
API (apps/api.py) and the web UI (apps/web.py). See docs/app.md."""

from apps.server.settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None, *, ui: bool = True):
    from apps.server.app import create_app as _create_app

    return _create_app(settings, ui=ui)
