"""artifacts: index on (kind, job_id), for the reconciler's look for a succeeded job's leftover checkpoints

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 20:00:00.000000
"""
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_artifacts_kind_job_id', 'artifacts', ['kind', 'job_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_artifacts_kind_job_id', table_name='artifacts')
