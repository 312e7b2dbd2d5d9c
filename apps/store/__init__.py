"""The store: every result mmcore keeps, behind one API shared by the CLI, the REST API and the web UI.

See docs/store.md. Importing this package pulls in SQLAlchemy, Alembic and argon2; command modules import it
inside their handlers only.
"""

from apps.store.accounts import (TokenInfo, UserInfo, authenticate, change_password, check_api_token,
                                 check_session, create_api_token, create_session, create_user, end_session,
                                 list_api_tokens, list_users, require_password_changed, revoke_token,
                                 revoke_user_tokens, set_user_active)
from apps.store.audit import AuditEvent, audit_events
from apps.store.core import AccountPolicy, Actor, Store, open_store
from apps.store.ct import (NewSeries, ReportInfo, SeriesInfo, StudyInfo, VoiceNoteInfo, add_study, add_voice_note,
                           amend_report, create_draft_report, edit_draft, get_report, get_study, list_reports,
                           list_studies, list_voice_notes, share_study, sign_report)
from apps.store.errors import (AccountLocked, AuthenticationError, ConflictError, InvalidTransition, NotFoundError,
                               PasswordChangeRequired, PermissionDenied, StoreError)
from apps.store.wafers import (LotInfo, LotSummary, NewWafer, NewWaferScore, WaferMapRef, WaferScoreInfo,
                               add_wafer_scores, add_wafers, get_or_create_lot, list_lots, lot_summary, scores_for_lot,
                               wafer_map_refs)

__all__ = [
    "AccountLocked", "AccountPolicy", "Actor", "AuditEvent", "AuthenticationError", "ConflictError",
    "InvalidTransition", "LotInfo", "LotSummary", "NewSeries", "NewWafer", "NewWaferScore", "NotFoundError",
    "PasswordChangeRequired", "PermissionDenied", "ReportInfo", "SeriesInfo", "Store", "StoreError", "StudyInfo",
    "TokenInfo", "UserInfo", "VoiceNoteInfo", "WaferMapRef", "WaferScoreInfo", "add_study", "add_voice_note",
    "add_wafer_scores", "add_wafers", "amend_report", "audit_events", "authenticate", "change_password",
    "check_api_token", "check_session", "create_api_token", "create_draft_report", "create_session", "create_user",
    "edit_draft", "end_session", "get_or_create_lot", "get_report", "get_study", "list_api_tokens", "list_lots",
    "list_reports", "list_studies", "list_users", "list_voice_notes", "lot_summary", "open_store",
    "require_password_changed", "revoke_token", "revoke_user_tokens", "scores_for_lot", "set_user_active",
    "share_study", "sign_report", "wafer_map_refs",
]
