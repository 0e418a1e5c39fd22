"""source studies: what the DICOMweb poller has seen and pulled (issue 10)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'source_studies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('source', sa.String(length=64), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.Enum('PULLING', 'DONE', 'FAILED', name='pullstate', native_enum=False, length=16),
                  nullable=False),
        sa.Column('archive_instances', sa.Integer(), nullable=True),
        sa.Column('pulled', sa.Integer(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('first_seen', sa.DateTime(), nullable=False),
        sa.Column('heartbeat', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.Column('next_attempt', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('source', 'study_instance_uid', name='uq_source_study'),
    )
    with op.batch_alter_table('source_studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_source_studies_source'), ['source'], unique=False)
        batch_op.create_index(batch_op.f('ix_source_studies_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_source_studies_study_instance_uid'), ['study_instance_uid'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('source_studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_source_studies_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_source_studies_state'))
        batch_op.drop_index(batch_op.f('ix_source_studies_source'))
    op.drop_table('source_studies')
