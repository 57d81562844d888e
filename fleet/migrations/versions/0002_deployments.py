"""Deployments (rollouts) and device reports (reported and desired state).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _org() -> sa.Column[object]:
    return sa.Column("org_id", sa.Uuid(), sa.ForeignKey("organizations.id"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Uuid(), primary_key=True),
        _org(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("outbox", sa.JSON(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_index("ix_deployments_org_id", "deployments", ["org_id"])
    op.create_index("ix_deployments_phase", "deployments", ["phase"])
    op.create_table(
        "device_reports",
        sa.Column("device_id", sa.String(64), primary_key=True),
        _org(),
        sa.Column("online", sa.Boolean(), nullable=False),
        _ts("last_seen", nullable=True),
        sa.Column("heartbeat", sa.JSON(), nullable=True),
        sa.Column("reported_models", sa.JSON(), nullable=False),
        sa.Column("desired_models", sa.JSON(), nullable=False),
    )
    op.create_index("ix_device_reports_org_id", "device_reports", ["org_id"])


def downgrade() -> None:
    for table in ("device_reports", "deployments"):
        op.drop_table(table)
