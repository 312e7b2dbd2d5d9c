"""Log-in, password and log-out pages: plain HTML (no scripts, no external assets), store accounts, a session
cookie. An account with a one-time password (the first-start admin) is sent to the password page until it has
chosen a new one; the web UI and the API refuse it until then."""

from __future__ import annotations

import html

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from apps.server.auth import SESSION_COOKIE, client_address, cookie_token
from apps.store import (AccountLocked, AuthenticationError, StoreError, authenticate, change_password, create_session,
                        end_session)

pages_router = APIRouter(include_in_schema=False)

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mmcore: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; background: #f3f4f6; margin: 0; }}
main {{ max-width: 380px; margin: 12vh auto; background: #fff; padding: 32px 36px; border-radius: 10px;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} p.sub {{ color: #6b7280; margin: 0 0 24px; font-size: 14px; }}
label {{ display: block; font-size: 14px; margin: 14px 0 4px; color: #374151; }}
input {{ width: 100%; box-sizing: border-box; padding: 9px 10px; border: 1px solid #d1d5db; border-radius: 6px;
         font-size: 15px; }}
button {{ margin-top: 22px; width: 100%; padding: 10px; background: #ea580c; color: #fff; border: 0;
          border-radius: 6px; font-size: 15px; cursor: pointer; }}
.err {{ background: #fef2f2; color: #991b1b; padding: 8px 10px; border-radius: 6px; font-size: 14px; }}
.info {{ background: #fffbeb; color: #92400e; padding: 8px 10px; border-radius: 6px; font-size: 14px; }}
.note {{ color: #6b7280; font-size: 12px; margin-top: 18px; }} .note a {{ color: #6b7280; }}
</style></head><body><main>
<h1>mmcore</h1><p class="sub">{subtitle}</p>
{message}
{form}
<p class="note">{note}</p>
</main></body></html>"""

LOGIN_FORM = """<form method="post" action="/login">
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password"
 autocomplete="current-password" required>
<button type="submit" id="login">Log in</button>
</form>"""

PASSWORD_FORM = """<form method="post" action="/password">
<label for="current_password">Current password</label><input id="current_password" name="current_password"
 type="password" autocomplete="current-password" required>
<label for="new_password">New password ({min_length}+ characters)</label><input id="new_password"
 name="new_password" type="password" autocomplete="new-password" minlength="{min_length}" required>
<label for="repeat_password">New password again</label><input id="repeat_password" name="repeat_password"
 type="password" autocomplete="new-password" minlength="{min_length}" required>
<button type="submit" id="change-password">Change password</button>
</form>"""

DEMO_NOTE = "Demonstration models trained on synthetic data: not for diagnostic use."


def login_page(error: str = "", status: int = 200) -> HTMLResponse:
    block = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(PAGE.format(title="log in", subtitle="CT draft reports and wafer-map scoring", message=block,
                                    form=LOGIN_FORM, note=DEMO_NOTE), status_code=status)


def password_page(actor, min_length: int, error: str = "", status: int = 200) -> HTMLResponse:
    if error:
        block = f'<p class="err" role="alert">{html.escape(error)}</p>'
    elif actor.must_change_password:
        block = ('<p class="info" role="status">This account still has its one-time password. Choose your own '
                 "password before you continue.</p>")
    else:
        block = ""
    note = (f"Signed in as {html.escape(actor.username)}. " +
            ("" if actor.must_change_password else '<a href="/">Back to the application</a> · ') +
            '<a href="/logout">Log out</a>')
    return HTMLResponse(PAGE.format(title="change password", subtitle="Change your password", message=block,
                                    form=PASSWORD_FORM.format(min_length=min_length), note=note),
                        status_code=status)


@pages_router.get("/login")
def login_form():
    return login_page()


@pages_router.post("/login")
def login(request: Request, username: str = Form(""), password: str = Form("")):
    ctx = request.app.state.ctx
    client = client_address(request)
    try:
        actor = authenticate(ctx.store, username.strip(), password, client=client)
    except AccountLocked as exc:
        return login_page(f"Account locked: {exc}", 423)
    except AuthenticationError:
        return login_page("Unknown user name or wrong password.", 401)
    token = create_session(ctx.store, actor, client=client)
    response = RedirectResponse("/password" if actor.must_change_password else "/", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=ctx.settings.cookie_secure,
                        max_age=int(ctx.store.policy.session_ttl_s), path="/")
    return response


def _session(request: Request):
    """(token, actor) of the request's session cookie, or (None, None)."""
    ctx = request.app.state.ctx
    token = cookie_token(request.headers)
    actor = ctx.actor_for_session(token, client_address(request)) if token else None
    return (token, actor) if actor else (None, None)


@pages_router.get("/password")
def password_form(request: Request):
    _, actor = _session(request)
    if actor is None:
        return RedirectResponse("/login", status_code=303)
    return password_page(actor, request.app.state.ctx.store.policy.min_password_length)


@pages_router.post("/password")
def password(request: Request, current_password: str = Form(""), new_password: str = Form(""),
             repeat_password: str = Form("")):
    ctx = request.app.state.ctx
    token, actor = _session(request)
    if actor is None:
        return RedirectResponse("/login", status_code=303)
    min_length = ctx.store.policy.min_password_length
    if new_password != repeat_password:
        return password_page(actor, min_length, "The two new passwords differ.", 400)
    try:
        change_password(ctx.store, actor, current_password, new_password, client=client_address(request))
    except AccountLocked as exc:
        return password_page(actor, min_length, f"Account locked: {exc}", 423)
    except AuthenticationError:
        return password_page(actor, min_length, "The current password is wrong.", 403)
    except StoreError as exc:  # too short, same as before
        return password_page(actor, min_length, str(exc).replace("new_password: ", "New password: "), 400)
    ctx.forget_session(token)  # the cached Actor still carries the one-time flag
    return RedirectResponse("/", status_code=303)


@pages_router.get("/logout")
def logout(request: Request):
    ctx = request.app.state.ctx
    token = cookie_token(request.headers)
    if token:
        ctx.forget_session(token)
        try:
            end_session(ctx.store, token, client=client_address(request))
        except AuthenticationError:
            pass
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
