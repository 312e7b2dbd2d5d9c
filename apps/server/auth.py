"""Who is calling: bearer API tokens for the REST API, a session cookie for the UI, and the first-start admin."""

from __future__ import annotations

import secrets
import sys
from http.cookies import SimpleCookie

from fastapi import Request

from apps.server.errors import ApiError
from apps.store import (Actor, AuthenticationError, Store, check_api_token, check_session, create_user,
                        list_users, require_password_changed)

SESSION_COOKIE = "mmcore_session"
BOOTSTRAP_ADMIN = "admin"


def bootstrap_admin(store: Store, out=sys.stdout) -> str | None:
    """On an empty user table, create `admin` with a random one-time password and print it once; returns it.

    The password has been on a console (and maybe in a log), so the account must choose a new one before it can do
    anything else: the UI asks at the first log-in, the API answers 403 `password_change_required` until then.
    """
    if list_users(store, Actor.system()):
        return None
    password = secrets.token_urlsafe(12)
    create_user(store, Actor.system(), BOOTSTRAP_ADMIN, password, "admin", must_change_password=True,
                client="bootstrap")
    print(f"first start: created user '{BOOTSTRAP_ADMIN}' (role admin) with the one-time password: {password}\n"
          "  it is shown only now; log in to the web UI and choose a new password (or POST /api/v1/me/password "
          "with a token from `mmcore users token admin`), then create the clinician and engineer accounts",
          file=out, flush=True)
    return password


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def bearer_actor(store: Store, request: Request) -> Actor:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated", "Authorization: expected 'Bearer <API token>' (from `mmcore users "
                                               "token NAME`), found " + ("nothing" if not header else "another scheme"),
                       {"WWW-Authenticate": "Bearer"})
    try:
        return check_api_token(store, token.strip(), client=client_address(request))
    except AuthenticationError as exc:
        raise ApiError(401, "unauthenticated", f"API token refused: {exc}", {"WWW-Authenticate": "Bearer"}) from exc


def cookie_token(headers) -> str | None:
    """The session token from a Cookie header (ASGI header list or a mapping)."""
    if isinstance(headers, list):
        raw = b"; ".join(v for k, v in headers if k == b"cookie").decode("latin-1")
    else:
        raw = headers.get("cookie", "")
    if not raw:
        return None
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # noqa: BLE001 - a malformed cookie header is simply no session
        return None
    morsel = jar.get(SESSION_COOKIE)
    return morsel.value if morsel and morsel.value else None


def session_actor(store: Store, token: str | None, client: str | None = None) -> Actor | None:
    if not token:
        return None
    try:
        return check_session(store, token, client=client)
    except AuthenticationError:
        return None


def require_new_password(store: Store, actor: Actor, request: Request) -> Actor:
    """Refuse (403 password_change_required, audited) an account that still has its one-time password, before the
    request's body is read or a model runs; the store refuses it on every call too."""
    if actor.must_change_password:
        require_password_changed(store, actor, "api.request", client=client_address(request))
    return actor


def require_role(actor: Actor, *roles: str) -> None:
    if actor.role not in roles:
        raise ApiError(403, "forbidden", f"role {actor.role!r} may not do this; needs {' or '.join(roles)}")
