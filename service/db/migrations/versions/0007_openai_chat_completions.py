"""openai facade: the output of the chat jobs behind /openai/v1/chat/completions

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-12 10:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('openai_chat_completions',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('choices', sa.JSON(), nullable=False),
    sa.Column('usage', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('openai_chat_completions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_openai_chat_completions_id'), ['id'], unique=True)
        batch_op.create_index(batch_op.f('ix_openai_chat_completions_tenant'), ['tenant'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('openai_chat_completions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_openai_chat_completions_tenant'))
        batch_op.drop_index(batch_op.f('ix_openai_chat_completions_id'))
    op.drop_table('openai_chat_completions')
