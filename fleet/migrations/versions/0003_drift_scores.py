"""Drift scores that the data loop posts per device, artifact and metric.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "drift_scores",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("org_id", sa.Uuid(), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("artifact_id", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        _ts("window_start"),
        _ts("window_end"),
        _ts("created_at"),
    )
    op.create_index("ix_drift_scores_org_id", "drift_scores", ["org_id"])
    op.create_index("ix_drift_scores_device_id", "drift_scores", ["device_id"])


def downgrade() -> None:
    op.drop_table("drift_scores")
