"""Relabeling and retraining: label tasks, retrain policies and retrain runs.

Revision ID: c0003_labeling
Revises: c0002_dataloop
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0003_labeling"
down_revision: str | None = "c0002_dataloop"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column[object]:
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def _fk(name: str, target: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.Integer(), sa.ForeignKey(target), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "cloud_retrain_policies",
        _id(),
        _fk("model_id", "cloud_models.id", nullable=False),
        sa.Column("min_new_labels", sa.Integer(), nullable=True),
        sa.Column("drift_threshold", sa.Float(), nullable=True),
        sa.Column("drift_minutes", sa.Float(), nullable=False),
        sa.Column("require_approval", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("training", sa.JSON(), nullable=True),
        sa.Column("rollout", sa.JSON(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.UniqueConstraint("model_id"),
    )
    op.create_table(
        "cloud_retrain_runs",
        _id(),
        _fk("model_id", "cloud_models.id", nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("active_model_id", sa.Integer(), nullable=True, unique=True),
        sa.Column("reason", sa.Text(), nullable=False),
        _fk("parent_version_id", "cloud_model_versions.id", nullable=False),
        sa.Column("n_labels", sa.Integer(), nullable=False),
        _fk("dataset_id", "cloud_datasets.id", nullable=True),
        _fk("train_job_id", "cloud_jobs.id", nullable=True),
        _fk("model_version_id", "cloud_model_versions.id", nullable=True),
        _fk("compile_job_id", "cloud_jobs.id", nullable=True),
        sa.Column("profiles", sa.JSON(), nullable=False),
        sa.Column("device_ids", sa.JSON(), nullable=False),
        sa.Column("deployment_id", sa.String(64), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("approved_by", sa.String(128), nullable=True),
        _ts("approved_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_index("ix_cloud_retrain_runs_model_id", "cloud_retrain_runs", ["model_id"])
    op.create_index("ix_cloud_retrain_runs_state", "cloud_retrain_runs", ["state"])
    op.create_table(
        "cloud_label_tasks",
        _id(),
        sa.Column("sample_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        _fk("model_version_id", "cloud_model_versions.id", nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("prediction", sa.String(128), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("label", sa.String(128), nullable=True),
        sa.Column("labeled_by", sa.String(128), nullable=True),
        _ts("labeled_at", nullable=True),
        sa.Column("source", sa.String(64), nullable=True),
        _fk("retrain_run_id", "cloud_retrain_runs.id", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.UniqueConstraint("sample_id", name="uq_cloud_label_tasks_sample"),
    )
    for column in ("device_id", "model", "model_version_id", "state", "retrain_run_id"):
        op.create_index(f"ix_cloud_label_tasks_{column}", "cloud_label_tasks", [column])


def downgrade() -> None:
    op.drop_table("cloud_label_tasks")
    op.drop_table("cloud_retrain_runs")
    op.drop_table("cloud_retrain_policies")
