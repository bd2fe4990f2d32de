"""Failed sign-ins counted per (account, client) and per client (issue 15, web safety).

``sf_sign_in_throttle`` is shared by every web process, so a stranger's failures make only their own
client wait and never lock the owner out (flows/services/throttle.py, docs/security.md). Not a quality
record: every failed sign-in is an audit event as before. Only a new table: no existing row changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sf_sign_in_throttle",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("first_at", sa.Float(), nullable=False),
        sa.Column("last_at", sa.Float(), nullable=False),
        sa.Column("blocked_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("sf_sign_in_throttle", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sf_sign_in_throttle_last_at"), ["last_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sf_sign_in_throttle", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sf_sign_in_throttle_last_at"))
    op.drop_table("sf_sign_in_throttle")
