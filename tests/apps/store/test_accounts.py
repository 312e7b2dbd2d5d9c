import datetime as dt

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, update

from apps.store import (AccountLocked, AccountPolicy, Actor, AuthenticationError, ConflictError, PermissionDenied,
                        StoreError, authenticate, check_api_token, check_session, create_api_token, create_session,
                        create_user, end_session, list_api_tokens, list_users, revoke_token, revoke_user_tokens,
                        set_user_active)
from apps.store.models import ApiToken, AuthSession, User, utcnow

PASSWORD = "correct horse battery"


def test_password_is_hashed_with_argon2id(store):
    create_user(store, Actor.system(), "dr_a", PASSWORD, "clinician", "north")
    with store.session() as session:
        stored = session.scalars(select(User.password_hash).where(User.username == "dr_a")).one()
    assert stored != PASSWORD and PASSWORD not in stored
    assert stored.startswith("$argon2id$")
    assert PasswordHasher().verify(stored, PASSWORD)


def test_create_user_validates_and_refuses_duplicates(store, people, audit_log):
    with pytest.raises(ConflictError, match="'dr_a': already taken"):
        create_user(store, Actor.system(), "dr_a", PASSWORD, "clinician", "north")
    with pytest.raises(StoreError, match="role 'nurse': expected one of clinician, engineer, admin"):
        create_user(store, Actor.system(), "nurse1", PASSWORD, "nurse", "north")
    with pytest.raises(StoreError, match="at least 8 characters, found 3"):
        create_user(store, Actor.system(), "dr_c", "abc", "clinician", "north")
    with pytest.raises(StoreError, match="username '../x'"):
        create_user(store, Actor.system(), "../x", PASSWORD, "clinician", "north")
    with pytest.raises(PermissionDenied, match=r"dr_a \(clinician\) is not allowed user.create: needs the role admin"):
        create_user(store, people["dr_a"], "dr_c", PASSWORD, "clinician", "north")
    create_user(store, people["admin"], "dr_c", PASSWORD, "clinician", "south")
    denied = audit_log(action="user.create", username="dr_a")
    assert [(e.outcome, e.object_id) for e in denied] == [("denied", "dr_c")]
    assert [u.username for u in list_users(store, people["admin"])] == [
        "admin", "dr_a", "dr_b", "dr_c", "dr_south", "eng_north", "eng_south"]


def test_authenticate_returns_the_actor_and_audits(store, people, audit_log):
    me = authenticate(store, "dr_a", PASSWORD, client="10.1.2.3")
    assert me == people["dr_a"] and me.role == "clinician" and me.site == "north"
    with pytest.raises(AuthenticationError, match="unknown user or wrong password"):
        authenticate(store, "dr_a", "wrong password", client="10.1.2.3")
    with pytest.raises(AuthenticationError, match="unknown user or wrong password"):
        authenticate(store, "nobody", PASSWORD)
    logins = audit_log(action="login")
    assert [(e.username, e.outcome, e.client) for e in logins] == [
        ("dr_a", "ok", "10.1.2.3"), ("dr_a", "failed", "10.1.2.3"), ("nobody", "failed", None)]
    assert logins[1].details == {"reason": "wrong password", "locked": False}


def test_lockout_after_repeated_failures(store, people, audit_log):
    for _ in range(4):
        with pytest.raises(AuthenticationError) as info:
            authenticate(store, "dr_b", "guess")
        assert not isinstance(info.value, AccountLocked)
    with pytest.raises(AccountLocked, match="now locked for 15 minutes after 5 failures"):
        authenticate(store, "dr_b", "guess")
    with pytest.raises(AccountLocked, match="is locked until"):  # the right password does not help now
        authenticate(store, "dr_b", PASSWORD)
    assert authenticate(store, "dr_a", PASSWORD).username == "dr_a"  # other accounts are unaffected
    with store.session() as session:  # fifteen minutes later
        session.execute(update(User).where(User.username == "dr_b")
                        .values(locked_until=utcnow() - dt.timedelta(seconds=1)))
    assert authenticate(store, "dr_b", PASSWORD).username == "dr_b"
    reasons = [e.details.get("reason") for e in audit_log(action="login", username="dr_b")]
    assert reasons == ["wrong password"] * 5 + ["locked", None]


def test_failures_outside_the_window_do_not_add_up(store, people):
    for _ in range(4):
        with pytest.raises(AuthenticationError):
            authenticate(store, "dr_b", "guess")
    with store.session() as session:  # the four failures are now older than the 15-minute window
        session.execute(update(User).where(User.username == "dr_b")
                        .values(first_failed_at=utcnow() - dt.timedelta(minutes=16)))
    with pytest.raises(AuthenticationError) as info:
        authenticate(store, "dr_b", "guess")
    assert not isinstance(info.value, AccountLocked)
    with store.session() as session:
        assert session.scalars(select(User.failed_logins).where(User.username == "dr_b")).one() == 1


def test_disabled_user_cannot_log_in_and_loses_tokens(store, people):
    token, _ = create_api_token(store, people["dr_a"])
    session_token = create_session(store, people["dr_a"])
    set_user_active(store, people["admin"], "dr_a", False)
    with pytest.raises(AuthenticationError, match="account 'dr_a' is disabled"):
        authenticate(store, "dr_a", PASSWORD)
    with pytest.raises(AuthenticationError, match="revoked"):
        check_api_token(store, token)
    with pytest.raises(AuthenticationError, match="revoked"):
        check_session(store, session_token)
    with pytest.raises(AuthenticationError, match="disabled"):  # an Actor held from before is refused too
        create_api_token(store, people["dr_a"])
    set_user_active(store, people["admin"], "dr_a", True)
    assert authenticate(store, "dr_a", PASSWORD).username == "dr_a"


def test_sessions_expire_and_end(store, people, audit_log):
    token = create_session(store, people["dr_a"], client="10.0.0.9")
    assert check_session(store, token) == people["dr_a"]
    with store.session() as session:
        stored = session.scalars(select(AuthSession.token_sha256)).one()
    assert token not in stored and len(stored) == 64
    end_session(store, token)
    with pytest.raises(AuthenticationError, match="session: revoked"):
        check_session(store, token)
    second = create_session(store, people["dr_a"])
    with store.session() as session:
        session.execute(update(AuthSession).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    with pytest.raises(AuthenticationError, match="session: expired"):
        check_session(store, second)
    with pytest.raises(AuthenticationError, match="session: unknown"):
        check_session(store, "not-a-token", client="203.0.113.5")
    assert [e.action for e in audit_log(username="dr_a")] == ["session.create", "session.end", "session.create"]
    refused = audit_log(action="session.check")
    assert [(e.outcome, e.client) for e in refused] == [("failed", None), ("failed", None), ("failed", "203.0.113.5")]
    assert [e.details["reason"].split(" at ")[0] for e in refused] == [
        "session: revoked", "session: expired", "session: unknown"]


def test_api_tokens(store, people, audit_log):
    token, info = create_api_token(store, people["admin"], "eng_north", days=7, label="line 3 scorer")
    assert token.startswith("mmc_") and len(token) > 40 and info.prefix == token[:12]
    assert info.expires_at - info.created_at == dt.timedelta(days=7)
    assert check_api_token(store, token) == people["eng_north"]
    with store.session() as session:
        row = session.scalars(select(ApiToken)).one()
        assert row.token_sha256 != token and token not in row.token_sha256
        assert row.last_used_at is not None
    with pytest.raises(PermissionDenied, match="only for themself"):
        create_api_token(store, people["eng_north"], "dr_a")
    with pytest.raises(PermissionDenied, match="only their own"):
        revoke_token(store, people["dr_a"], info.id)
    with pytest.raises(StoreError, match="days: expected a whole number of days in 1..3650, found 0"):
        create_api_token(store, people["dr_a"], days=0)
    revoke_token(store, people["eng_north"], info.id)
    with pytest.raises(AuthenticationError, match="API token: revoked"):
        check_api_token(store, token)
    assert [t.revoked_at is not None for t in list_api_tokens(store, people["eng_north"])] == [True]
    actions = [(e.action, e.outcome) for e in audit_log(object_type="api_token")]
    assert actions == [("token.create", "ok"), ("token.revoke", "denied"), ("token.revoke", "ok")]


def test_expired_token_and_bulk_revoke(store, people):
    old, _ = create_api_token(store, people["dr_a"], days=1)
    with store.session() as session:
        session.execute(update(ApiToken).values(expires_at=utcnow() - dt.timedelta(minutes=1)))
    with pytest.raises(AuthenticationError, match="API token: expired"):
        check_api_token(store, old)
    fresh = [create_api_token(store, people["dr_a"])[0] for _ in range(2)]
    create_session(store, people["dr_a"])
    assert revoke_user_tokens(store, people["dr_a"], "dr_a") == 3  # two live tokens and one session
    for token in fresh:
        with pytest.raises(AuthenticationError, match="revoked"):
            check_api_token(store, token)


def test_policy_fields_must_be_positive():
    with pytest.raises(ValueError, match="AccountPolicy.max_failed_logins: expected a positive number, found 0"):
        AccountPolicy(max_failed_logins=0)


def test_one_time_password_must_be_changed_first(store, audit_log):
    from apps.store import PasswordChangeRequired, change_password, list_studies

    create_user(store, Actor.system(), "root", "one-time pw 123", "admin", must_change_password=True)
    me = authenticate(store, "root", "one-time pw 123")
    assert me.must_change_password is True
    assert check_session(store, create_session(store, me)).must_change_password is True  # log-in still works
    token, _ = create_api_token(store, Actor.system(), "root")  # the operator can still issue a token
    assert check_api_token(store, token).must_change_password is True
    for attempt in (lambda: list_users(store, me), lambda: list_studies(store, me),
                    lambda: create_api_token(store, me)):
        with pytest.raises(PasswordChangeRequired, match="root must change the one-time password before anything"):
            attempt()
    assert [u.must_change_password for u in list_users(store, Actor.system())] == [True]
    with pytest.raises(StoreError, match="new_password: expected at least 8 characters, found 5"):
        change_password(store, me, "one-time pw 123", "short")
    with pytest.raises(StoreError, match="new_password: expected a password other than the current one"):
        change_password(store, me, "one-time pw 123", "one-time pw 123")
    with pytest.raises(AuthenticationError, match="password change failed: the current password is wrong"):
        change_password(store, me, "not it at all", "a brand new secret")
    changed = change_password(store, me, "one-time pw 123", "a brand new secret", client="10.0.0.1")
    assert changed.must_change_password is False and changed == me
    assert [u.username for u in list_users(store, changed)] == ["root"]  # everything works now
    assert check_api_token(store, token).must_change_password is False  # tokens stay valid
    with pytest.raises(AuthenticationError):
        authenticate(store, "root", "one-time pw 123")
    assert authenticate(store, "root", "a brand new secret").must_change_password is False
    events = [(e.action, e.outcome) for e in audit_log(username="root") if e.action != "login"]
    assert events == [("session.create", "ok"), ("user.list", "denied"), ("study.list", "denied"),
                      ("token.create", "denied"), ("user.password", "failed"), ("user.password", "ok")]
    assert audit_log(action="user.password")[-1].details == {"was_one_time": True}


def test_wrong_current_passwords_count_toward_lockout(store, people):
    from apps.store import change_password

    for _ in range(4):
        with pytest.raises(AuthenticationError) as info:
            change_password(store, people["dr_a"], "guess guess", "a brand new secret")
        assert not isinstance(info.value, AccountLocked)
    with pytest.raises(AccountLocked, match="password change failed: account 'dr_a' is now locked"):
        change_password(store, people["dr_a"], "guess guess", "a brand new secret")
    with pytest.raises(AccountLocked, match="is locked until"):  # the right password does not help now
        change_password(store, people["dr_a"], PASSWORD, "a brand new secret")
    with pytest.raises(StoreError, match="the system operator has no password"):
        change_password(store, Actor.system(), PASSWORD, "a brand new secret")
