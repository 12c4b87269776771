"""feedback sets: uncertainty ordering, reward-model scores, judges, guidelines, gold items, time per label

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 15:30:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('feedback_sets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ordering', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False, server_default='random'))
        batch_op.add_column(sa.Column('reward_model', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('refresh_every_labels', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('guidelines', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('gold_failure_threshold', sa.Float(), nullable=False, server_default='0.25'))
        batch_op.add_column(sa.Column('gold_every', sa.Integer(), nullable=False, server_default='5'))
        batch_op.add_column(sa.Column('routing', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False, server_default='all'))
        batch_op.add_column(sa.Column('state', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('events', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('version', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('feedback_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rewards', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('gold', sa.JSON(), nullable=True))
    with op.batch_alter_table('feedback_assignments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column('margin', sa.Float(), nullable=True))
    with op.batch_alter_table('feedback_labels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('feedback_labels', schema=None) as batch_op:
        batch_op.drop_column('seconds')
    with op.batch_alter_table('feedback_assignments', schema=None) as batch_op:
        batch_op.drop_column('margin')
        batch_op.drop_column('reason')
    with op.batch_alter_table('feedback_items', schema=None) as batch_op:
        batch_op.drop_column('gold')
        batch_op.drop_column('rewards')
    with op.batch_alter_table('feedback_sets', schema=None) as batch_op:
        for column in ('version', 'events', 'state', 'routing', 'gold_every', 'gold_failure_threshold',
                       'guidelines', 'refresh_every_labels', 'reward_model', 'ordering'):
            batch_op.drop_column(column)
