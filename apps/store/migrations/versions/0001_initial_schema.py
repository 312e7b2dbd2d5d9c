"""initial schema: accounts, CT studies and reports, wafer lots and scores, append-only audit trail

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


# The audit trail is append-only in the database itself, not just by convention in the code.
SQLITE_AUDIT_GUARDS = [
    f"""CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"""
    for verb in ("UPDATE", "DELETE")
]
PG_AUDIT_GUARDS = [
    """CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'audit_events is append-only'; END $$""",
    """CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()""",
    """CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()""",
]


def guard_audit_trail() -> None:
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_AUDIT_GUARDS if dialect == "sqlite" else PG_AUDIT_GUARDS if dialect == "postgresql" else []:
        op.execute(statement)


def unguard_audit_trail() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_change ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('failed_logins', sa.Integer(), nullable=False),
    sa.Column('first_failed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("role IN ('clinician', 'engineer', 'admin')", name=op.f('ck_users_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_tokens_token_sha256'))
    )
    op.create_index(op.f('ix_api_tokens_user_id'), 'api_tokens', ['user_id'])
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=True),
    sa.Column('object_id', sa.String(length=128), nullable=True),
    sa.Column('client', sa.String(length=64), nullable=True),
    sa.Column('outcome', sa.String(length=8), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.CheckConstraint("outcome IN ('ok', 'denied', 'failed')", name=op.f('ck_audit_events_outcome')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_audit_events_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    op.create_index(op.f('ix_audit_events_action'), 'audit_events', ['action'])
    op.create_index(op.f('ix_audit_events_at'), 'audit_events', ['at'])
    op.create_index('ix_audit_events_object', 'audit_events', ['object_type', 'object_id'])
    op.create_index(op.f('ix_audit_events_username'), 'audit_events', ['username'])
    op.create_table('auth_sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('client', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_auth_sessions_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auth_sessions')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_auth_sessions_token_sha256'))
    )
    op.create_index(op.f('ix_auth_sessions_user_id'), 'auth_sessions', ['user_id'])
    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=False),
    sa.Column('patient_pseudonym', sa.String(length=64), nullable=True),
    sa.Column('study_date', sa.String(length=8), nullable=True),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_studies_owner_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_studies')),
    sa.UniqueConstraint('study_uid', name=op.f('uq_studies_study_uid'))
    )
    op.create_index(op.f('ix_studies_owner_id'), 'studies', ['owner_id'])
    op.create_index(op.f('ix_studies_site'), 'studies', ['site'])
    op.create_table('wafer_lots',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('lot_id', sa.String(length=64), nullable=False),
    sa.Column('product', sa.String(length=64), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('created_by_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_wafer_lots_created_by_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_wafer_lots')),
    sa.UniqueConstraint('lot_id', name=op.f('uq_wafer_lots_lot_id'))
    )
    op.create_index(op.f('ix_wafer_lots_site'), 'wafer_lots', ['site'])
    op.create_table('reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('content', sa.JSON(), nullable=False),
    sa.Column('model_draft', sa.JSON(), nullable=True),
    sa.Column('model_id', sa.String(length=128), nullable=True),
    sa.Column('checkpoint_sha256', sa.String(length=64), nullable=True),
    sa.Column('author_id', sa.Integer(), nullable=False),
    sa.Column('signer_id', sa.Integer(), nullable=True),
    sa.Column('signed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('amends_id', sa.Integer(), nullable=True),
    sa.Column('amend_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('draft', 'final', 'amended')", name=op.f('ck_reports_status')),
    sa.CheckConstraint('version >= 1', name=op.f('ck_reports_version')),
    sa.ForeignKeyConstraint(['amends_id'], ['reports.id'], name=op.f('fk_reports_amends_id_reports')),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], name=op.f('fk_reports_author_id_users')),
    sa.ForeignKeyConstraint(['signer_id'], ['users.id'], name=op.f('fk_reports_signer_id_users')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_reports_study_id_studies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reports')),
    sa.UniqueConstraint('study_id', 'version', name=op.f('uq_reports_study_id_version'))
    )
    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('slice_count', sa.Integer(), nullable=False),
    sa.Column('blobs', sa.JSON(), nullable=False),
    sa.CheckConstraint('slice_count >= 0', name=op.f('ck_series_slice_count')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_series_study_id_studies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_series')),
    sa.UniqueConstraint('series_uid', name=op.f('uq_series_series_uid'))
    )
    op.create_index(op.f('ix_series_study_id'), 'series', ['study_id'])
    op.create_table('study_shares',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('site', sa.String(length=64), nullable=True),
    sa.Column('granted_by_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('(user_id IS NULL) <> (site IS NULL)', name=op.f('ck_study_shares_one_target')),
    sa.ForeignKeyConstraint(['granted_by_id'], ['users.id'], name=op.f('fk_study_shares_granted_by_id_users')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_study_shares_study_id_studies')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_study_shares_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_study_shares'))
    )
    op.create_index(op.f('ix_study_shares_site'), 'study_shares', ['site'])
    op.create_index(op.f('ix_study_shares_study_id'), 'study_shares', ['study_id'])
    op.create_index(op.f('ix_study_shares_user_id'), 'study_shares', ['user_id'])
    op.create_table('voice_notes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('audio_sha256', sa.String(length=64), nullable=False),
    sa.Column('transcript', sa.JSON(), nullable=False),
    sa.Column('engine', sa.String(length=32), nullable=False),
    sa.Column('model_id', sa.String(length=128), nullable=False),
    sa.Column('language', sa.String(length=16), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_voice_notes_owner_id_users')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_voice_notes_study_id_studies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_voice_notes'))
    )
    op.create_index(op.f('ix_voice_notes_study_id'), 'voice_notes', ['study_id'])
    op.create_table('wafers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('lot_pk', sa.Integer(), nullable=False),
    sa.Column('wafer_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=512), nullable=False),
    sa.Column('slot', sa.Integer(), nullable=True),
    sa.Column('map_sha256', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lot_pk'], ['wafer_lots.id'], name=op.f('fk_wafers_lot_pk_wafer_lots')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_wafers')),
    sa.UniqueConstraint('lot_pk', 'source', 'wafer_id', name=op.f('uq_wafers_lot_pk_source_wafer_id'))
    )
    op.create_table('wafer_scores',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('wafer_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_id', sa.String(length=128), nullable=False),
    sa.Column('probabilities', sa.JSON(), nullable=False),
    sa.Column('predicted_class', sa.String(length=64), nullable=True),
    sa.Column('defect_score', sa.Float(), nullable=True),
    sa.Column('anomaly_score', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('scored_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('ok', 'error')", name=op.f('ck_wafer_scores_status')),
    sa.ForeignKeyConstraint(['wafer_pk'], ['wafers.id'], name=op.f('fk_wafer_scores_wafer_pk_wafers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_wafer_scores'))
    )
    op.create_index('ix_wafer_scores_wafer_pk_id', 'wafer_scores', ['wafer_pk', 'id'])
    guard_audit_trail()


def downgrade() -> None:
    unguard_audit_trail()
    op.drop_index('ix_wafer_scores_wafer_pk_id', table_name='wafer_scores')
    op.drop_table('wafer_scores')
    op.drop_table('wafers')
    op.drop_index(op.f('ix_voice_notes_study_id'), table_name='voice_notes')
    op.drop_table('voice_notes')
    op.drop_index(op.f('ix_study_shares_user_id'), table_name='study_shares')
    op.drop_index(op.f('ix_study_shares_study_id'), table_name='study_shares')
    op.drop_index(op.f('ix_study_shares_site'), table_name='study_shares')
    op.drop_table('study_shares')
    op.drop_index(op.f('ix_series_study_id'), table_name='series')
    op.drop_table('series')
    op.drop_table('reports')
    op.drop_index(op.f('ix_wafer_lots_site'), table_name='wafer_lots')
    op.drop_table('wafer_lots')
    op.drop_index(op.f('ix_studies_site'), table_name='studies')
    op.drop_index(op.f('ix_studies_owner_id'), table_name='studies')
    op.drop_table('studies')
    op.drop_index(op.f('ix_auth_sessions_user_id'), table_name='auth_sessions')
    op.drop_table('auth_sessions')
    op.drop_index(op.f('ix_audit_events_username'), table_name='audit_events')
    op.drop_index('ix_audit_events_object', table_name='audit_events')
    op.drop_index(op.f('ix_audit_events_at'), table_name='audit_events')
    op.drop_index(op.f('ix_audit_events_action'), table_name='audit_events')
    op.drop_table('audit_events')
    op.drop_index(op.f('ix_api_tokens_user_id'), table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('users')
