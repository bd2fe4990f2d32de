"""Outbox, administrator key, institutions, revocations, API tokens, document bytes, web sessions.

The tables added after cf31c97 (issues 12 and 13): the notification outbox and its deliveries, the
installation administrator's key, institutions, role and API-token revocations, API tokens, document
bytes and web sessions. Only new tables: no existing row changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sf_admin_key",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("key_sha256", sa.String(), nullable=False),
        sa.Column("os_user", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_sha256"),
    )
    op.create_table(
        "sf_document_content",
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "sf_outbox",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=True),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("roles_json", sa.String(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("message_json", sa.Text(), nullable=True),
        sa.Column("lease", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("sf_outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_outbox_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_web_session",
        sa.Column("token_sha256", sa.String(), nullable=False),
        sa.Column("csrf", sa.String(), nullable=False),
        sa.Column("language", sa.String(), nullable=False),
        sa.Column("username", sa.String(), nullable=True),
        sa.Column("printed_name", sa.String(), nullable=True),
        sa.Column("here", sa.String(), nullable=False),
        sa.Column("flash_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("ended_why", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    with op.batch_alter_table("sf_web_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_web_session_last_seen"), ["last_seen"], unique=False)

    op.create_table(
        "sf_api_token",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("scopes_json", sa.Text(), nullable=False),
        sa.Column("token_sha256", sa.String(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_table(
        "sf_institution",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("first_officer_id", sa.String(), nullable=False),
        sa.Column("admin_key_id", sa.String(), nullable=False),
        sa.Column("os_user", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["admin_key_id"],
            ["sf_admin_key.id"],
        ),
        sa.ForeignKeyConstraint(
            ["first_officer_id"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("institution"),
    )
    op.create_table(
        "sf_outbox_delivery",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("message_id", sa.String(), nullable=False),
        sa.Column("channel_sha256", sa.String(), nullable=False),
        sa.Column("channel", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("holder", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["sf_outbox.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id", "channel_sha256", "n"),
    )
    with op.batch_alter_table("sf_outbox_delivery", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_outbox_delivery_message_id"), ["message_id"], unique=False)

    op.create_table(
        "sf_api_token_revocation",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("token_id", sa.String(), nullable=False),
        sa.Column("revoked_by", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["sf_api_token.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_id"),
    )
    op.create_table(
        "sf_role_revocation",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("grant_id", sa.String(), nullable=False),
        sa.Column("revoked_by", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["grant_id"],
            ["sf_role_grant.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("grant_id"),
    )


def downgrade() -> None:
    op.drop_table("sf_role_revocation")
    op.drop_table("sf_api_token_revocation")
    with op.batch_alter_table("sf_outbox_delivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_outbox_delivery_message_id"))

    op.drop_table("sf_outbox_delivery")
    op.drop_table("sf_institution")
    op.drop_table("sf_api_token")
    with op.batch_alter_table("sf_web_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_web_session_last_seen"))

    op.drop_table("sf_web_session")
    with op.batch_alter_table("sf_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_outbox_run_id"))

    op.drop_table("sf_outbox")
    op.drop_table("sf_document_content")
    op.drop_table("sf_admin_key")
