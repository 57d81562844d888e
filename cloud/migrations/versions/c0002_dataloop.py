"""Data loop: captured samples, drift sketches and scores, drift policies, alerts, capture state.

Revision ID: c0002_dataloop
Revises: c0001_initial
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0002_dataloop"
down_revision: str | None = "c0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column[object]:
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "cloud_samples",
        _id(),
        sa.Column("sample_id", sa.String(32), nullable=False, unique=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("artifact_id", sa.String(64), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        _ts("ts"),
        sa.Column("top1", sa.Integer(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("entropy", sa.Float(), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        _ts("received_at"),
    )
    op.create_index("ix_cloud_samples_device_id", "cloud_samples", ["device_id"])
    op.create_index("ix_cloud_samples_model", "cloud_samples", ["model"])
    op.create_index("ix_cloud_samples_artifact_id", "cloud_samples", ["artifact_id"])
    op.create_index("ix_cloud_samples_ts", "cloud_samples", ["ts"])
    op.create_table(
        "cloud_sketches",
        _id(),
        sa.Column("sketch_id", sa.String(32), nullable=False, unique=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("artifact_id", sa.String(64), nullable=True),
        sa.Column("spec_key", sa.String(128), nullable=False),
        sa.Column("spec_sha256", sa.String(64), nullable=False),
        _ts("window_start"),
        _ts("window_end"),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("dropped", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column(
            "model_version_id",
            sa.Integer(),
            sa.ForeignKey("cloud_model_versions.id"),
            nullable=True,
        ),
        _ts("received_at"),
    )
    op.create_index("ix_cloud_sketches_device_id", "cloud_sketches", ["device_id"])
    op.create_index("ix_cloud_sketches_model", "cloud_sketches", ["model"])
    op.create_index("ix_cloud_sketches_window_end", "cloud_sketches", ["window_end"])
    op.create_index("ix_cloud_sketches_status", "cloud_sketches", ["status"])
    op.create_table(
        "cloud_drift_scores",
        _id(),
        sa.Column(
            "sketch_id",
            sa.Integer(),
            sa.ForeignKey("cloud_sketches.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column(
            "model_version_id",
            sa.Integer(),
            sa.ForeignKey("cloud_model_versions.id"),
            nullable=False,
        ),
        sa.Column("artifact_id", sa.String(64), nullable=True),
        _ts("window_start"),
        _ts("window_end"),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("drifted_features", sa.JSON(), nullable=False),
        sa.Column("fleet_status", sa.Text(), nullable=True),
        _ts("created_at"),
    )
    op.create_index("ix_cloud_drift_scores_device_id", "cloud_drift_scores", ["device_id"])
    op.create_index("ix_cloud_drift_scores_model", "cloud_drift_scores", ["model"])
    op.create_index(
        "ix_cloud_drift_scores_model_version_id", "cloud_drift_scores", ["model_version_id"]
    )
    op.create_index("ix_cloud_drift_scores_window_end", "cloud_drift_scores", ["window_end"])
    op.create_table(
        "cloud_drift_policies",
        _id(),
        sa.Column(
            "model_id", sa.Integer(), sa.ForeignKey("cloud_models.id"), nullable=False, unique=True
        ),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("min_samples", sa.Integer(), nullable=False),
        sa.Column("webhook_url", sa.String(1024), nullable=True),
        _ts("updated_at"),
    )
    op.create_table(
        "cloud_drift_alerts",
        _id(),
        sa.Column(
            "score_id",
            sa.Integer(),
            sa.ForeignKey("cloud_drift_scores.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column(
            "model_version_id",
            sa.Integer(),
            sa.ForeignKey("cloud_model_versions.id"),
            nullable=False,
        ),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("drifted_features", sa.JSON(), nullable=False),
        _ts("window_start"),
        _ts("window_end"),
        _ts("created_at"),
        _ts("acknowledged_at", nullable=True),
        sa.Column("ack_note", sa.Text(), nullable=True),
        sa.Column("webhook_status", sa.Text(), nullable=True),
    )
    op.create_index("ix_cloud_drift_alerts_device_id", "cloud_drift_alerts", ["device_id"])
    op.create_index("ix_cloud_drift_alerts_model", "cloud_drift_alerts", ["model"])
    op.create_index(
        "ix_cloud_drift_alerts_acknowledged_at", "cloud_drift_alerts", ["acknowledged_at"]
    )
    op.create_table(
        "cloud_device_capture",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=False),
        _ts("updated_at"),
    )


def downgrade() -> None:
    for table in (
        "cloud_device_capture",
        "cloud_drift_alerts",
        "cloud_drift_policies",
        "cloud_drift_scores",
        "cloud_sketches",
        "cloud_samples",
    ):
        op.drop_table(table)
