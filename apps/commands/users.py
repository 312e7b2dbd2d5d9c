"""`mmcore users`: accounts and API tokens, run by the local operator on the database host."""

from __future__ import annotations

import getpass
import sys

from apps.commands.db import add_store_arguments, open_from_args
from mmcore.errors import InputError

ROLES = ("clinician", "engineer", "admin")


def register(subparsers) -> None:
    p = subparsers.add_parser("users", help="user accounts and API tokens")
    sub = p.add_subparsers(dest="users_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="create a user; the password comes from a prompt, or stdin when piped")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--site", default="main", help="the user's site (default: main)")
    add_store_arguments(add)
    add.set_defaults(handler=cmd_add)

    token = sub.add_parser("token", help="create an API token; printed once, alone on the last line")
    token.add_argument("name")
    token.add_argument("--days", type=int, default=None, help="validity in days (default: 90)")
    token.add_argument("--label", default="", help="what the token is for")
    add_store_arguments(token)
    token.set_defaults(handler=cmd_token)

    ls = sub.add_parser("list", help="users with role, site and state; --tokens adds each user's API tokens")
    ls.add_argument("--tokens", action="store_true")
    add_store_arguments(ls)
    ls.set_defaults(handler=cmd_list)

    revoke = sub.add_parser("revoke", help="revoke a user's API tokens and sessions (all, or one by --token-id)")
    revoke.add_argument("name")
    revoke.add_argument("--token-id", type=int, default=None)
    add_store_arguments(revoke)
    revoke.set_defaults(handler=cmd_revoke)

    for action, active in (("disable", False), ("enable", True)):
        q = sub.add_parser(action, help=f"{action} a user's log-in" + (" and revoke its tokens" if not active else ""))
        q.add_argument("name")
        add_store_arguments(q)
        q.set_defaults(handler=cmd_set_active, active=active)


def read_password(name: str) -> str:
    if sys.stdin is None:
        raise InputError("password: expected it on stdin or from a terminal prompt, found no stdin")
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("repeat it: ") != first:
            raise InputError("password: the two entries differ")
        return first
    line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise InputError("password: expected one line on stdin, found nothing")
    return password


def cmd_add(args) -> int:
    from apps.store import Actor, create_user  # noqa: PLC0415

    password = read_password(args.name)
    with open_from_args(args) as store:
        user = create_user(store, Actor.system(), args.name, password, args.role, args.site, client="cli")
    print(f"user {user.username} created: role {user.role}, site {user.site}")
    return 0


def cmd_token(args) -> int:
    from apps.store import Actor, create_api_token  # noqa: PLC0415

    with open_from_args(args) as store:
        token, info = create_api_token(store, Actor.system(), args.name, days=args.days, label=args.label,
                                       client="cli")
    print(f"API token {info.id} for {info.username} (prefix {info.prefix}), valid until "
          f"{info.expires_at:%Y-%m-%d %H:%M} UTC. It is shown only now; store it safely:")
    print(token)
    return 0


def cmd_list(args) -> int:
    from apps.store import Actor, list_api_tokens, list_users  # noqa: PLC0415
    from apps.store.models import utcnow  # noqa: PLC0415

    with open_from_args(args) as store:
        users = list_users(store, Actor.system())
        tokens = {u.username: list_api_tokens(store, Actor.system(), u.username) for u in users} if args.tokens \
            else {}
    now = utcnow()
    rows = [("user", "role", "site", "state", "created")]
    for u in users:
        state = "disabled" if not u.active else (
            f"locked until {u.locked_until:%H:%M} UTC" if u.locked_until and u.locked_until > now else
            "one-time password (change it at the first log-in)" if u.must_change_password else "active")
        rows.append((u.username, u.role, u.site, state, f"{u.created_at:%Y-%m-%d}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        for t in tokens.get(row[0], []):
            state = "revoked" if t.revoked_at else "expired" if t.expires_at <= now else "live"
            print(f"    token {t.id} {t.prefix}... {state}, expires {t.expires_at:%Y-%m-%d}"
                  + (f", {t.label}" if t.label else ""))
    return 0


def cmd_revoke(args) -> int:
    from apps.store import Actor, list_api_tokens, revoke_token, revoke_user_tokens  # noqa: PLC0415

    with open_from_args(args) as store:
        if args.token_id is None:
            count = revoke_user_tokens(store, Actor.system(), args.name, client="cli")
            print(f"revoked {count} live token(s) and session(s) of {args.name}")
            return 0
        owned = {t.id for t in list_api_tokens(store, Actor.system(), args.name)}
        if args.token_id not in owned:
            raise InputError(f"--token-id {args.token_id}: not a token of {args.name} "
                             f"(their tokens: {sorted(owned) or 'none'})")
        revoke_token(store, Actor.system(), args.token_id, client="cli")
    print(f"revoked API token {args.token_id} of {args.name}")
    return 0


def cmd_set_active(args) -> int:
    from apps.store import Actor, set_user_active  # noqa: PLC0415

    with open_from_args(args) as store:
        set_user_active(store, Actor.system(), args.name, args.active, client="cli")
    print(f"user {args.name} {'enabled' if args.active else 'disabled'}")
    return 0
