"""The audit trail: who did what to which object, when, from where, with what outcome.

`record` adds an event to the caller's session, so it commits or rolls back together with the change it
describes. A refused action rolls its transaction back; `act` then writes the `denied` event on its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Callable, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from apps.store.core import Actor, Store
from apps.store.errors import AuthenticationError, PasswordChangeRequired, PermissionDenied, StoreError
from apps.store.models import AuditEvent as AuditRow
from apps.store.models import User, utcnow

T = TypeVar("T")
MAX_CLIENT_LEN = 64


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    id: int
    at: dt.datetime
    username: str
    role: str | None
    action: str
    object_type: str | None
    object_id: str | None
    client: str | None
    outcome: str
    details: dict


def record(session: Session, actor: Actor | None, action: str, object_type: str | None = None,
           object_id: Any = None, *, client: str | None = None, outcome: str = "ok",
           details: dict | None = None, username: str | None = None) -> None:
    session.add(AuditRow(
        at=utcnow(),
        user_id=actor.user_id if actor else None,
        username=(actor.username if actor else username) or "anonymous",
        role=actor.role if actor else None,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        client=client[:MAX_CLIENT_LEN] if client else None,
        outcome=outcome,
        details=details or {},
    ))


def current_user(session: Session, actor: Actor, action: str = "", *, one_time_password_ok: bool = False
                 ) -> User | None:
    """The acting user's row, checked active and past its one-time password (None for the system operator).

    `one_time_password_ok`: for the only things an account with a one-time password may do (open a session after
    logging in, change the password).
    """
    if not isinstance(actor, Actor):
        raise StoreError(f"actor: expected an apps.store.Actor, found {type(actor).__name__}")
    if actor.is_system:
        return None
    user = session.get(User, actor.user_id)
    if user is None or user.username != actor.username:
        raise AuthenticationError(f"user {actor.username!r} no longer exists; log in again")
    if not user.active:
        raise AuthenticationError(f"user {actor.username!r} is disabled")
    if user.must_change_password and not one_time_password_ok:
        raise PasswordChangeRequired(
            f"{actor.username} must change the one-time password before anything else: log in to the web UI, or "
            "POST /api/v1/me/password with current_password and new_password", action or "unknown", "user",
            actor.username)
    return user


def refreshed(session: Session, actor: Actor, action: str = "") -> Actor:
    """The actor with the role and site the database holds now."""
    user = current_user(session, actor, action)
    return actor if user is None else Actor(user.id, user.username, user.role, user.site)


def require_role(session: Session, actor: Actor, roles: tuple[str, ...], action: str,
                 object_type: str | None = None, object_id: Any = None) -> Actor:
    now = refreshed(session, actor, action)
    if now.role not in roles:
        raise PermissionDenied(f"{now.username} ({now.role}) is not allowed {action}: needs the role "
                               f"{' or '.join(roles)}", action, object_type, object_id)
    return now


def _recording_denial(transaction: Callable[[Callable[[Session], T]], T], store: Store, actor: Actor,
                      client: str | None, fn: Callable[[Session], T]) -> T:
    """Run `fn` in `transaction` (store.read or store.write); when it is refused, keep a `denied` event."""
    try:
        return transaction(fn)
    except PermissionDenied as exc:
        store.write(lambda s: record(s, actor, exc.action or "unknown", exc.object_type, exc.object_id,
                                     client=client, outcome="denied", details={"reason": str(exc)}))
        raise


def act(store: Store, actor: Actor, client: str | None, fn: Callable[[Session], T]) -> T:
    """Run a write transaction; when it is refused, keep a `denied` event of the attempt."""
    return _recording_denial(store.write, store, actor, client, fn)


def read_or_record_denial(store: Store, actor: Actor, fn: Callable[[Session], T], client: str | None = None) -> T:
    """Run a read transaction; when it is refused, keep a `denied` event of the attempt (reads that succeed are
    audited by their caller, or not at all)."""
    return _recording_denial(store.read, store, actor, client, fn)


def audit_events(store: Store, actor: Actor, *, username: str | None = None, action: str | None = None,
                 object_type: str | None = None, object_id: Any = None, since: dt.datetime | None = None,
                 until: dt.datetime | None = None, limit: int = 1000, client: str | None = None) -> list[AuditEvent]:
    if not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise StoreError(f"limit: expected an integer in 1..100000, found {limit!r}")
    for name, value in (("since", since), ("until", until)):
        if value is not None and (not isinstance(value, dt.datetime) or value.tzinfo is None):
            raise StoreError(f"{name}: expected a timezone-aware datetime, found {value!r}")
    filters = {"username": username, "action": action, "object_type": object_type, "object_id": object_id}

    def run(session: Session) -> list[AuditEvent]:
        require_role(session, actor, ("admin",), "audit.view")
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if username is not None:
            query = query.where(AuditRow.username == username)
        if action is not None:
            query = query.where(AuditRow.action == action)
        if object_type is not None:
            query = query.where(AuditRow.object_type == object_type)
        if object_id is not None:
            query = query.where(AuditRow.object_id == str(object_id))
        if since is not None:
            query = query.where(AuditRow.at >= since)
        if until is not None:
            query = query.where(AuditRow.at < until)
        events = [AuditEvent(r.id, r.at, r.username, r.role, r.action, r.object_type, r.object_id, r.client,
                             r.outcome, r.details) for r in session.scalars(query)]
        record(session, actor, "audit.view", client=client,
               details={k: str(v) for k, v in filters.items() if v is not None} | {"returned": len(events)})
        return events

    return act(store, actor, client, run)
