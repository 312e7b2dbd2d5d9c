"""Users, log-in with lockout, web sessions and API tokens.

Passwords are hashed with argon2id (argon2-cffi). Session and API tokens are 256-bit random strings; only their
sha256 is stored (a fast hash is enough for secrets that cannot be guessed, and it allows lookup by hash).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from apps.store.audit import act, current_user, record, refreshed, require_role
from apps.store.core import AccountPolicy, Actor, Store
from apps.store.errors import (AccountLocked, AuthenticationError, ConflictError, NotFoundError, PermissionDenied,
                               StoreError)
from apps.store.models import ROLES, ApiToken, AuthSession, User, utcnow

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
API_TOKEN_PREFIX = "mmc_"
LAST_USED_RESOLUTION_S = 60  # refresh api_tokens.last_used_at at most this often (avoids a write per request)
MAX_TOKEN_DAYS = 3650
MAX_PASSWORD_LENGTH = 1024  # argon2 takes any length; this only bounds the work a request can ask for


@dataclasses.dataclass(frozen=True)
class UserInfo:
    username: str
    role: str
    site: str
    active: bool
    created_at: dt.datetime
    locked_until: dt.datetime | None
    must_change_password: bool = False


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    id: int
    username: str
    label: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


def hasher(policy: AccountPolicy) -> PasswordHasher:
    return PasswordHasher(time_cost=policy.argon2_time_cost, memory_cost=policy.argon2_memory_kib,
                          parallelism=policy.argon2_parallelism)


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_username(username) -> str:
    if not isinstance(username, str) or not USERNAME.match(username):
        raise StoreError(f"username {username!r}: expected 1-64 letters, digits or . _ @ -, "
                         "starting with a letter or digit")
    return username


def check_site(site) -> str:
    if not isinstance(site, str) or not SITE.match(site):
        raise StoreError(f"site {site!r}: expected 1-64 letters, digits or . _ -")
    return site


def _user_by_name(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise NotFoundError(f"user {username!r}: no such user")
    return user


def _actor(user: User) -> Actor:
    return Actor(user.id, user.username, user.role, user.site, must_change_password=user.must_change_password)


# --- users -----------------------------------------------------------------------------------------------------


def check_password(policy: AccountPolicy, password, field: str = "password") -> str:
    if not isinstance(password, str) or len(password) < policy.min_password_length:
        raise StoreError(f"{field}: expected at least {policy.min_password_length} characters, found "
                         f"{len(password) if isinstance(password, str) else type(password).__name__}")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise StoreError(f"{field}: expected at most {MAX_PASSWORD_LENGTH} characters, found {len(password)}")
    return password


def create_user(store: Store, actor: Actor, username: str, password: str, role: str, site: str = "main", *,
                must_change_password: bool = False, client: str | None = None) -> Actor:
    """A new account; `must_change_password=True` for a one-time password (only log-in and changing it work)."""
    check_username(username)
    check_site(site)
    if role not in ROLES:
        raise StoreError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    check_password(store.policy, password)
    password_hash = hasher(store.policy).hash(password)  # slow on purpose; outside the transaction

    def run(session: Session) -> Actor:
        require_role(session, actor, ("admin",), "user.create", "user", username)
        if session.scalars(select(User.id).where(User.username == username)).first() is not None:
            raise ConflictError(f"username {username!r}: already taken")
        user = User(username=username, password_hash=password_hash, role=role, site=site, active=True,
                    must_change_password=bool(must_change_password), failed_logins=0)
        session.add(user)
        session.flush()
        record(session, actor, "user.create", "user", username, client=client,
               details={"role": role, "site": site, "must_change_password": bool(must_change_password)})
        return _actor(user)

    try:
        return act(store, actor, client, run)
    except IntegrityError:  # a concurrent create of the same name won the race
        raise ConflictError(f"username {username!r}: already taken") from None


def set_user_active(store: Store, actor: Actor, username: str, active: bool, *, client: str | None = None) -> None:
    action = "user.enable" if active else "user.disable"

    def run(session: Session) -> None:
        require_role(session, actor, ("admin",), action, "user", username)
        user = _user_by_name(session, username)
        user.active = bool(active)
        if active:
            user.failed_logins, user.first_failed_at, user.locked_until = 0, None, None
        else:
            _revoke_all(session, user.id)
        record(session, actor, action, "user", username, client=client)

    act(store, actor, client, run)


def list_users(store: Store, actor: Actor) -> list[UserInfo]:
    def run(session: Session) -> list[UserInfo]:
        require_role(session, actor, ("admin",), "user.list")
        return [UserInfo(u.username, u.role, u.site, u.active, u.created_at, u.locked_until, u.must_change_password)
                for u in session.scalars(select(User).order_by(User.username))]

    return act(store, actor, None, run)


# --- log-in ----------------------------------------------------------------------------------------------------


def authenticate(store: Store, username: str, password: str, client: str | None = None) -> Actor:
    """The user's Actor when the password is right; every attempt is audited, failures count toward lockout."""
    def run(session: Session) -> Actor | AuthenticationError:
        outcome = _verify(session, store.policy, username, password, "login", "log-in", client)
        if isinstance(outcome, Actor):
            record(session, outcome, "login", "user", username, client=client)
        return outcome

    if not isinstance(username, str) or not isinstance(password, str):
        raise AuthenticationError("log-in failed: username and password must be text")
    outcome = store.write(run)  # failures must commit (counter, audit) before they are raised
    if isinstance(outcome, AuthenticationError):
        raise outcome
    return outcome


def change_password(store: Store, actor: Actor, current_password: str, new_password: str, *,
                    client: str | None = None) -> Actor:
    """Set your own password; the current one proves it is you (failures count toward lockout, as at log-in).
    Clears a one-time password. Sessions and API tokens stay valid."""
    if not isinstance(current_password, str):
        raise StoreError("current_password: expected text")
    check_password(store.policy, new_password, "new_password")
    if new_password == current_password:
        raise StoreError("new_password: expected a password other than the current one")
    new_hash = hasher(store.policy).hash(new_password)  # slow on purpose; outside the transaction

    def run(session: Session) -> Actor | AuthenticationError:
        user = current_user(session, actor, "user.password", one_time_password_ok=True)
        if user is None:
            raise StoreError("the system operator has no password; change a user's password as that user")
        outcome = _verify(session, store.policy, user.username, current_password, "user.password",
                          "password change", client)
        if isinstance(outcome, AuthenticationError):
            return outcome
        was_one_time = user.must_change_password
        user.password_hash, user.must_change_password = new_hash, False
        record(session, outcome, "user.password", "user", user.username, client=client,
               details={"was_one_time": was_one_time})
        return _actor(user)

    outcome = store.write(run)  # a wrong current password must commit its failure count before it is raised
    if isinstance(outcome, AuthenticationError):
        raise outcome
    return outcome


def require_password_changed(store: Store, actor: Actor, action: str, *, client: str | None = None) -> None:
    """Raise PasswordChangeRequired (audited as a `denied` `action`) while the actor's one-time password is
    unchanged; for callers that refuse early, before any store call of their own (e.g. ahead of an upload)."""
    act(store, actor, client, lambda session: current_user(session, actor, action))


def _verify(session: Session, policy: AccountPolicy, username: str, password: str, action: str, what: str,
            client: str | None) -> Actor | AuthenticationError:
    """Check a password inside a write transaction: the user's Actor, or the error to raise once the failure (its
    audit event and the lockout counter) is committed."""
    ph = hasher(policy)
    now = utcnow()
    user = session.scalars(select(User).where(User.username == username).with_for_update()).one_or_none()
    if user is None:
        _burn_time(ph)  # same cost as a real check, so timing does not reveal which names exist
        record(session, None, action, "user", username, client=client, outcome="failed",
               username=str(username)[:64], details={"reason": "unknown user"})
        return AuthenticationError(f"{what} failed: unknown user or wrong password")
    who = _actor(user)
    if not user.active:
        record(session, who, action, "user", username, client=client, outcome="failed",
               details={"reason": "disabled"})
        return AuthenticationError(f"{what} failed: account {username!r} is disabled")
    if user.locked_until is not None and user.locked_until > now:
        record(session, who, action, "user", username, client=client, outcome="failed",
               details={"reason": "locked"})
        return AccountLocked(f"{what} failed: account {username!r} is locked until "
                             f"{user.locked_until:%Y-%m-%d %H:%M:%S} UTC after repeated failures")
    try:
        ph.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        window_start = now - dt.timedelta(seconds=policy.failure_window_s)
        if user.first_failed_at is None or user.first_failed_at < window_start:
            user.failed_logins, user.first_failed_at = 1, now
        else:
            user.failed_logins += 1
        locked = user.failed_logins >= policy.max_failed_logins
        if locked:
            user.locked_until = now + dt.timedelta(seconds=policy.lockout_s)
            user.failed_logins, user.first_failed_at = 0, None
        record(session, who, action, "user", username, client=client, outcome="failed",
               details={"reason": "wrong password", "locked": locked})
        if locked:
            return AccountLocked(f"{what} failed: account {username!r} is now locked for "
                                 f"{policy.lockout_s / 60:g} minutes after {policy.max_failed_logins} failures")
        return AuthenticationError(f"{what} failed: " + ("unknown user or wrong password" if action == "login"
                                                         else "the current password is wrong"))
    user.failed_logins, user.first_failed_at, user.locked_until = 0, None, None
    if ph.check_needs_rehash(user.password_hash):
        user.password_hash = ph.hash(password)
    return who


_DUMMY_HASHES: dict[tuple, str] = {}


def _burn_time(ph: PasswordHasher) -> None:
    key = (ph.time_cost, ph.memory_cost, ph.parallelism)
    if key not in _DUMMY_HASHES:
        _DUMMY_HASHES[key] = ph.hash(secrets.token_hex(16))
    try:
        ph.verify(_DUMMY_HASHES[key], "not the password")
    except VerificationError:
        pass


# --- web sessions ----------------------------------------------------------------------------------------------


def create_session(store: Store, actor: Actor, *, client: str | None = None) -> str:
    """A new session token for `actor` (put it in an HttpOnly cookie); valid for `policy.session_ttl_s`."""
    token = secrets.token_urlsafe(32)

    def run(session: Session) -> str:
        # An account with a one-time password gets a session: the UI's first page asks for a new password.
        user = current_user(session, actor, "session.create", one_time_password_ok=True)
        if user is None:
            raise StoreError("the system operator has no web sessions; log in as a user")
        now = utcnow()
        row = AuthSession(user_id=user.id, token_sha256=sha256_hex(token), created_at=now,
                          expires_at=now + dt.timedelta(seconds=store.policy.session_ttl_s), client=client)
        session.add(row)
        session.flush()
        record(session, actor, "session.create", "session", row.id, client=client)
        return token

    return store.write(run)


def check_session(store: Store, token: str, *, client: str | None = None) -> Actor:
    """The session's user; a refused token is audited (`session.check`, failed) with the client address."""
    def run(session: Session) -> Actor:
        row = _live(session, AuthSession, token, "session")
        return _actor_of(session, row.user_id, "session")

    return _refused_audited(store, "session.check", client, lambda: store.read(run))


def end_session(store: Store, token: str, *, client: str | None = None) -> None:
    def run(session: Session) -> None:
        row = session.scalars(select(AuthSession).where(AuthSession.token_sha256 == sha256_hex(str(token)))
                              ).one_or_none()
        if row is None or row.revoked_at is not None:
            return
        row.revoked_at = utcnow()
        user = session.get(User, row.user_id)
        record(session, _actor(user), "session.end", "session", row.id, client=client)

    store.write(run)


# --- API tokens ------------------------------------------------------------------------------------------------


def create_api_token(store: Store, actor: Actor, username: str | None = None, *, days: int | None = None,
                     label: str = "", client: str | None = None) -> tuple[str, TokenInfo]:
    """A new API token, returned once in clear; for yourself, or for anyone when admin."""
    days = store.policy.api_token_days if days is None else days
    if not isinstance(days, int) or not 1 <= days <= MAX_TOKEN_DAYS:
        raise StoreError(f"days: expected a whole number of days in 1..{MAX_TOKEN_DAYS}, found {days!r}")
    if not isinstance(label, str) or len(label) > 128:
        raise StoreError("label: expected text of at most 128 characters")
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)

    def run(session: Session) -> TokenInfo:
        me = refreshed(session, actor, "token.create")
        name = username or me.username
        if name != me.username and me.role != "admin":
            raise PermissionDenied(f"{me.username} may create API tokens only for themself", "token.create",
                                   "user", name)
        owner = _user_by_name(session, name)
        if not owner.active:
            raise StoreError(f"user {name!r} is disabled; enable it before creating tokens")
        now = utcnow()
        row = ApiToken(user_id=owner.id, token_sha256=sha256_hex(token), prefix=token[:12], label=label,
                       created_at=now, expires_at=now + dt.timedelta(days=days))
        session.add(row)
        session.flush()
        record(session, actor, "token.create", "api_token", row.id, client=client,
               details={"user": name, "days": days, "label": label})
        return _token_info(row, name)

    return token, act(store, actor, client, run)


def check_api_token(store: Store, token: str, *, client: str | None = None) -> Actor:
    def run(session: Session) -> Actor:
        row = _live(session, ApiToken, token, "API token")
        who = _actor_of(session, row.user_id, "API token")
        now = utcnow()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > LAST_USED_RESOLUTION_S:
            row.last_used_at = now
        return who

    return _refused_audited(store, "token.check", client, lambda: store.write(run))


def _refused_audited(store: Store, action: str, client: str | None, check):
    """Run a token check; when it refuses, keep a `failed` event (repeated ones reveal guessing or stale clients)."""
    try:
        return check()
    except AuthenticationError as exc:
        store.write(lambda s: record(s, None, action, client=client, outcome="failed", username="anonymous",
                                     details={"reason": str(exc)}))
        raise


def revoke_token(store: Store, actor: Actor, token_id: int, *, client: str | None = None) -> None:
    def run(session: Session) -> None:
        me = refreshed(session, actor, "token.revoke")
        row = session.get(ApiToken, token_id)
        if row is None:
            raise NotFoundError(f"API token {token_id}: no such token")
        if row.user_id != me.user_id and me.role != "admin":
            raise PermissionDenied(f"{me.username} may revoke only their own API tokens", "token.revoke",
                                   "api_token", token_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        record(session, actor, "token.revoke", "api_token", token_id, client=client)

    act(store, actor, client, run)


def revoke_user_tokens(store: Store, actor: Actor, username: str, *, client: str | None = None) -> int:
    """Revoke every API token and web session of `username`; returns how many were live."""
    def run(session: Session) -> int:
        me = refreshed(session, actor, "token.revoke")
        if username != me.username and me.role != "admin":
            raise PermissionDenied(f"{me.username} may revoke only their own tokens", "token.revoke", "user",
                                   username)
        user = _user_by_name(session, username)
        count = _revoke_all(session, user.id)
        record(session, actor, "token.revoke", "user", username, client=client, details={"revoked": count})
        return count

    return act(store, actor, client, run)


def list_api_tokens(store: Store, actor: Actor, username: str | None = None) -> list[TokenInfo]:
    def run(session: Session) -> list[TokenInfo]:
        me = refreshed(session, actor, "token.list")
        name = username or me.username
        if name != me.username and me.role != "admin":
            raise PermissionDenied(f"{me.username} may list only their own API tokens", "token.list", "user", name)
        owner = _user_by_name(session, name)
        rows = session.scalars(select(ApiToken).where(ApiToken.user_id == owner.id).order_by(ApiToken.id))
        return [_token_info(r, name) for r in rows]

    return act(store, actor, None, run)


def _revoke_all(session: Session, user_id: int) -> int:
    now = utcnow()
    count = 0
    for model in (ApiToken, AuthSession):
        result = session.execute(update(model).where(model.user_id == user_id, model.revoked_at.is_(None),
                                                     model.expires_at > now).values(revoked_at=now))
        count += result.rowcount
    return count


def _live(session: Session, model, token, kind: str):
    if not isinstance(token, str) or not token:
        raise AuthenticationError(f"{kind}: missing")
    row = session.scalars(select(model).where(model.token_sha256 == sha256_hex(token))).one_or_none()
    if row is None:
        raise AuthenticationError(f"{kind}: unknown")
    if row.revoked_at is not None:
        raise AuthenticationError(f"{kind}: revoked at {row.revoked_at:%Y-%m-%d %H:%M} UTC")
    if row.expires_at <= utcnow():
        raise AuthenticationError(f"{kind}: expired at {row.expires_at:%Y-%m-%d %H:%M} UTC")
    return row


def _actor_of(session: Session, user_id: int, kind: str) -> Actor:
    user = session.get(User, user_id)
    if user is None or not user.active:
        raise AuthenticationError(f"{kind}: its user is disabled")
    return _actor(user)


def _token_info(row: ApiToken, username: str) -> TokenInfo:
    return TokenInfo(row.id, username, row.label, row.prefix, row.created_at, row.expires_at, row.revoked_at,
                     row.last_used_at)
