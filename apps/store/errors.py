"""Errors the store raises. All are user-facing (`InputError`), so the CLI prints them as one line."""

from __future__ import annotations

from mmcore.errors import InputError


class StoreError(InputError):
    """A request the store cannot carry out; the message says what was expected and what was found."""


class NotFoundError(StoreError):
    """The object does not exist, or the actor may not know that it exists."""


class PermissionDenied(StoreError, PermissionError):
    """The actor's role or ownership does not allow the action. Carries what was refused, for the audit trail."""

    def __init__(self, message: str, action: str = "", object_type: str | None = None, object_id=None):
        super().__init__(message)
        self.action = action
        self.object_type = object_type
        self.object_id = None if object_id is None else str(object_id)


class PasswordChangeRequired(PermissionDenied):
    """The account still has its one-time password: only changing it (and logging in) is allowed."""


class InvalidTransition(StoreError):
    """A report (or account) cannot move from its current state to the requested one."""


class ConflictError(StoreError):
    """A unique name is already taken (username, DICOM UID, lot id in another site)."""


class AuthenticationError(StoreError):
    """Unknown user, wrong password, inactive account, or an expired or revoked session / token."""


class AccountLocked(AuthenticationError):
    """Too many failed log-ins in the policy window; the account is locked for a while."""
