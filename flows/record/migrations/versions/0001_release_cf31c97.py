"""The schema of the last release before versioned migrations (commit cf31c97).

Exactly the tables that release's ``SQLModel.metadata.create_all`` made. A database that release made
has no version table: ``flows.record.schema`` recognises it by its tables and stamps it 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sf_audit",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("object_type", sa.String(), nullable=False),
        sa.Column("object_id", sa.String(), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("prev_hash", sa.String(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("hash"),
        sa.UniqueConstraint("prev_hash"),
    )
    with op.batch_alter_table("sf_audit", schema=None) as batch_op:
        batch_op.create_index("ix_sf_audit_object", ["object_type", "object_id"], unique=False)

    op.create_table(
        "sf_reminder",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("object_id", sa.String(), nullable=False),
        sa.Column("deliveries_json", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "object_id"),
    )
    op.create_table(
        "sf_sop_version",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("sop_id", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("institution", "sop_id", "sha256"),
    )
    op.create_table(
        "sf_user",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("printed_name", sa.String(), nullable=False),
        sa.Column("password_hash", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_user", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_user_username"), ["username"], unique=True)

    op.create_table(
        "sf_role_grant",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("granted_by", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_role_grant", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_role_grant_user_id"), ["user_id"], unique=False)

    op.create_table(
        "sf_run",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("sop_version_id", sa.String(), nullable=False),
        sa.Column("sop_id", sa.String(), nullable=False),
        sa.Column("sop_version", sa.Integer(), nullable=False),
        sa.Column("sop_sha256", sa.String(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("params_json", sa.Text(), nullable=False),
        sa.Column("product_json", sa.Text(), nullable=True),
        sa.Column("flow_run_id", sa.String(), nullable=False),
        sa.Column("started_by", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parent_run_id", sa.String(), nullable=True),
        sa.Column("parent_step_id", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_run_id"],
            ["sf_run.id"],
        ),
        sa.ForeignKeyConstraint(
            ["sop_version_id"],
            ["sf_sop_version.id"],
        ),
        sa.ForeignKeyConstraint(
            ["started_by"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_run_parent_run_id"), ["parent_run_id"], unique=False)

    op.create_table(
        "sf_sop_version_event",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("version_id", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("data_json", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("printed_name", sa.String(), nullable=True),
        sa.Column("meaning", sa.String(), nullable=True),
        sa.Column("signed_sha256", sa.String(), nullable=True),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["sf_sop_version.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version_id", "n"),
    )
    with op.batch_alter_table("sf_sop_version_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_sop_version_event_version_id"), ["version_id"], unique=False)

    op.create_table(
        "sf_training",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("sop_id", sa.String(), nullable=False),
        sa.Column("sop_version", sa.Integer(), nullable=False),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trainer", sa.String(), nullable=False),
        sa.Column("recorded_by", sa.String(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_training", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_training_user_id"), ["user_id"], unique=False)

    op.create_table(
        "sf_training_assignment",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("version_id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("sop_id", sa.String(), nullable=False),
        sa.Column("sop_version", sa.Integer(), nullable=False),
        sa.Column("roles_json", sa.String(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["sf_user.id"],
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["sf_sop_version.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "version_id"),
    )
    with op.batch_alter_table("sf_training_assignment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_training_assignment_user_id"), ["user_id"], unique=False)

    op.create_table(
        "sf_user_event",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("data_json", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "n"),
    )
    with op.batch_alter_table("sf_user_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_user_event_user_id"), ["user_id"], unique=False)

    op.create_table(
        "sf_deviation",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("classification", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("quarantine", sa.Boolean(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_deviation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_deviation_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_document",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("template", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("rendered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_document", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_document_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_escalation",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("waiting_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("to_role", sa.String(), nullable=True),
        sa.Column("deliveries_json", sa.Text(), nullable=False),
        sa.Column("deviation_id", sa.String(), nullable=True),
        sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("waiting_id"),
    )
    with op.batch_alter_table("sf_escalation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_escalation_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_run_event",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("detail", sa.String(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "n"),
    )
    with op.batch_alter_table("sf_run_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_run_event_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_signature",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("printed_name", sa.String(), nullable=False),
        sa.Column("meaning", sa.String(), nullable=False),
        sa.Column("statement", sa.String(), nullable=True),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signed_sha256", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["sf_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sf_signature", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_signature_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_step_record",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("data_json", sa.Text(), nullable=False),
        sa.Column("actor_id", sa.String(), nullable=True),
        sa.Column("signature_id", sa.String(), nullable=True),
        sa.Column("supersedes_id", sa.String(), nullable=True),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("task_run_id", sa.String(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["actor_id"],
            ["sf_user.id"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "n"),
    )
    with op.batch_alter_table("sf_step_record", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_step_record_run_id"), ["run_id"], unique=False)

    op.create_table(
        "sf_deviation_event",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("deviation_id", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("data_json", sa.Text(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("actor_id", sa.String(), nullable=True),
        sa.Column("signature_id", sa.String(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["actor_id"],
            ["sf_user.id"],
        ),
        sa.ForeignKeyConstraint(
            ["deviation_id"],
            ["sf_deviation.id"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("deviation_id", "n"),
    )
    with op.batch_alter_table("sf_deviation_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_deviation_event_deviation_id"), ["deviation_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sf_deviation_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_deviation_event_deviation_id"))

    op.drop_table("sf_deviation_event")
    with op.batch_alter_table("sf_step_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_step_record_run_id"))

    op.drop_table("sf_step_record")
    with op.batch_alter_table("sf_signature", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_signature_run_id"))

    op.drop_table("sf_signature")
    with op.batch_alter_table("sf_run_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_run_event_run_id"))

    op.drop_table("sf_run_event")
    with op.batch_alter_table("sf_escalation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_escalation_run_id"))

    op.drop_table("sf_escalation")
    with op.batch_alter_table("sf_document", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_document_run_id"))

    op.drop_table("sf_document")
    with op.batch_alter_table("sf_deviation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_deviation_run_id"))

    op.drop_table("sf_deviation")
    with op.batch_alter_table("sf_user_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_user_event_user_id"))

    op.drop_table("sf_user_event")
    with op.batch_alter_table("sf_training_assignment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_training_assignment_user_id"))

    op.drop_table("sf_training_assignment")
    with op.batch_alter_table("sf_training", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_training_user_id"))

    op.drop_table("sf_training")
    with op.batch_alter_table("sf_sop_version_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_sop_version_event_version_id"))

    op.drop_table("sf_sop_version_event")
    with op.batch_alter_table("sf_run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_run_parent_run_id"))

    op.drop_table("sf_run")
    with op.batch_alter_table("sf_role_grant", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_role_grant_user_id"))

    op.drop_table("sf_role_grant")
    with op.batch_alter_table("sf_user", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_user_username"))

    op.drop_table("sf_user")
    op.drop_table("sf_sop_version")
    op.drop_table("sf_reminder")
    with op.batch_alter_table("sf_audit", schema=None) as batch_op:
        batch_op.drop_index("ix_sf_audit_object")

    op.drop_table("sf_audit")
