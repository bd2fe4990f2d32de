"""Signed checkpoints of the audit chain's head (issue 11, tamper evidence).

One row per checkpoint: the event it covers (``seq``, ``head_hash``), when, the key that signed it and
the Ed25519 signature (flows/record/checkpoints.py). Only a new table: no existing row changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sf_audit_checkpoint",
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("head_hash", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("signature", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("n"),
    )
    with op.batch_alter_table("sf_audit_checkpoint", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_audit_checkpoint_seq"), ["seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sf_audit_checkpoint", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_audit_checkpoint_seq"))
    op.drop_table("sf_audit_checkpoint")
