"""job monitors: status_reason and the reward-hacking monitors that fired

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status_reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        # Existing jobs had no monitors: an empty list, so the column can be NOT NULL like the other JSON ones.
        batch_op.add_column(sa.Column('monitors', sa.JSON(), server_default='[]', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('monitors')
        batch_op.drop_column('status_reason')
