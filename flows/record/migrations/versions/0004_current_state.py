"""The current state, for reads that cost what is open, not what is past (issue 11).

``sf_current_run``, ``sf_current_step`` and ``sf_current_quarantine`` hold each run's status now, each
step's newest record and each dose held in quarantine; ``flows.record.current`` keeps them in the
transaction of every ledger append. They are not records (no hash covers them): ``audit verify``
compares them with the record rows. An upgrade through this revision fills them from the record
(``flows.record.db.upgrade_db``, ``current.rebuild``). Also an index on ``sf_outbox.at`` for the
outbox sweep. No existing row changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sf_current_run",
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("institution", sa.String(), nullable=False),
        sa.Column("sop_id", sa.String(), nullable=False),
        sa.Column("sop_version", sa.Integer(), nullable=False),
        sa.Column("product", sa.String(), nullable=True),
        sa.Column("coi", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("status_n", sa.Integer(), nullable=False),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("run_id"),
    )
    with op.batch_alter_table("sf_current_run", schema=None) as batch_op:
        batch_op.create_index("ix_sf_current_run_coi", ["coi", "started_at"], unique=False)
        batch_op.create_index("ix_sf_current_run_institution", ["institution", "started_at"], unique=False)
        batch_op.create_index("ix_sf_current_run_open", ["open", "started_at"], unique=False)
        batch_op.create_index("ix_sf_current_run_product", ["product", "started_at"], unique=False)
        batch_op.create_index("ix_sf_current_run_sop", ["sop_id", "started_at"], unique=False)
        batch_op.create_index("ix_sf_current_run_started", ["started_at"], unique=False)
        batch_op.create_index("ix_sf_current_run_status", ["status", "started_at"], unique=False)

    op.create_table(
        "sf_current_step",
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("record_id", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("first_n", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_waiting_id", sa.String(), nullable=True),
        sa.Column("first_waiting_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sf_run.id"],
        ),
        sa.PrimaryKeyConstraint("run_id", "step_id"),
    )
    with op.batch_alter_table("sf_current_step", schema=None) as batch_op:
        batch_op.create_index("ix_sf_current_step_status", ["status", "at"], unique=False)

    op.create_table(
        "sf_current_quarantine",
        sa.Column("deviation_id", sa.String(), nullable=False),
        sa.Column("coi", sa.String(), nullable=True),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["deviation_id"],
            ["sf_deviation.id"],
        ),
        sa.PrimaryKeyConstraint("deviation_id"),
    )
    with op.batch_alter_table("sf_current_quarantine", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_current_quarantine_coi"), ["coi"], unique=False)

    with op.batch_alter_table("sf_outbox", schema=None) as batch_op:
        batch_op.create_index("ix_sf_outbox_at", ["at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sf_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_sf_outbox_at")
    op.drop_table("sf_current_quarantine")
    op.drop_table("sf_current_step")
    op.drop_table("sf_current_run")
