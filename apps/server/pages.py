"""Log-in and log-out pages: plain HTML (no scripts, no external assets), store accounts, a session cookie."""

from __future__ import annotations

import html

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from apps.server.auth import SESSION_COOKIE, client_address, cookie_token
from apps.store import AccountLocked, AuthenticationError, authenticate, create_session, end_session

pages_router = APIRouter(include_in_schema=False)

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mmcore: log in</title>
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
.note {{ color: #6b7280; font-size: 12px; margin-top: 18px; }}
</style></head><body><main>
<h1>mmcore</h1><p class="sub">CT draft reports and wafer-map scoring</p>
{error}
<form method="post" action="/login">
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password"
 autocomplete="current-password" required>
<button type="submit" id="login">Log in</button>
</form>
<p class="note">Demonstration models trained on synthetic data: not for diagnostic use.</p>
</main></body></html>"""


def login_page(error: str = "", status: int = 200) -> HTMLResponse:
    block = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(PAGE.format(error=block), status_code=status)


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
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=ctx.settings.cookie_secure,
                        max_age=int(ctx.store.policy.session_ttl_s), path="/")
    return response


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
