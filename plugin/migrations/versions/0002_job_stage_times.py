"""job stage timestamps (issue 9: per-stage latencies in /metrics)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('started_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('prepared_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('inferred_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('reported_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('finished_at')
        batch_op.drop_column('reported_at')
        batch_op.drop_column('inferred_at')
        batch_op.drop_column('prepared_at')
        batch_op.drop_column('started_at')

