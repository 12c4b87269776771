"""openai facade: files uploaded through /openai/v1/files and the OpenAI fields of the facade's jobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 10:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('openai_files',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('datasets', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('openai_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_openai_files_id'), ['id'], unique=True)
        batch_op.create_index(batch_op.f('ix_openai_files_tenant'), ['tenant'], unique=False)

    op.create_table('openai_jobs',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('training_file', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('validation_file', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('fine_tuned_model', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('suffix', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('method', sa.JSON(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('openai_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_openai_jobs_id'), ['id'], unique=True)
        batch_op.create_index(batch_op.f('ix_openai_jobs_tenant'), ['tenant'], unique=False)
        batch_op.create_index(batch_op.f('ix_openai_jobs_fine_tuned_model'), ['fine_tuned_model'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('openai_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_openai_jobs_fine_tuned_model'))
        batch_op.drop_index(batch_op.f('ix_openai_jobs_tenant'))
        batch_op.drop_index(batch_op.f('ix_openai_jobs_id'))
    op.drop_table('openai_jobs')

    with op.batch_alter_table('openai_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_openai_files_tenant'))
        batch_op.drop_index(batch_op.f('ix_openai_files_id'))
    op.drop_table('openai_files')
