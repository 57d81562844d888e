"""Cloud schema: datasets, jobs and their events, registered models and versions, compiles.

Revision ID: c0001_initial
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column[object]:
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "cloud_datasets",
        _id(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("stored_path", sa.String(1024), nullable=False),
        sa.Column("input_shape", sa.JSON(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("name", "version", name="uq_cloud_datasets_name_version"),
    )
    op.create_index("ix_cloud_datasets_digest", "cloud_datasets", ["digest"])
    op.create_table(
        "cloud_jobs",
        _id(),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("cloud_jobs.id"), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
    )
    op.create_index("ix_cloud_jobs_state", "cloud_jobs", ["state"])
    op.create_index("ix_cloud_jobs_parent_id", "cloud_jobs", ["parent_id"])
    op.create_table(
        "cloud_job_events",
        _id(),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("cloud_jobs.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        _ts("time"),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.UniqueConstraint("job_id", "seq", name="uq_cloud_job_events_job_seq"),
    )
    op.create_index("ix_cloud_job_events_job_id", "cloud_job_events", ["job_id"])
    op.create_table(
        "cloud_models",
        _id(),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        _ts("created_at"),
    )
    op.create_table(
        "cloud_model_versions",
        _id(),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("cloud_models.id"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("cloud_datasets.id"), nullable=False),
        sa.Column("training_job_id", sa.Integer(), sa.ForeignKey("cloud_jobs.id"), nullable=True),
        sa.Column("code_version", sa.String(128), nullable=False),
        sa.Column(
            "parent_version_id",
            sa.Integer(),
            sa.ForeignKey("cloud_model_versions.id"),
            nullable=True,
        ),
        sa.Column("weights_path", sa.String(1024), nullable=False),
        sa.Column("onnx_path", sa.String(1024), nullable=False),
        sa.Column("baseline_path", sa.String(1024), nullable=False),
        sa.Column("input_shape", sa.JSON(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("model_id", "version", name="uq_cloud_model_versions_model_version"),
    )
    op.create_index("ix_cloud_model_versions_model_id", "cloud_model_versions", ["model_id"])
    op.create_index("ix_cloud_model_versions_dataset_id", "cloud_model_versions", ["dataset_id"])
    op.create_table(
        "cloud_compile_records",
        _id(),
        sa.Column(
            "model_version_id",
            sa.Integer(),
            sa.ForeignKey("cloud_model_versions.id"),
            nullable=False,
        ),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("cloud_jobs.id"), nullable=False),
        sa.Column("profile", sa.String(128), nullable=False),
        sa.Column("tuning_db_digest", sa.String(64), nullable=True),
        sa.Column("artifact_id", sa.String(64), nullable=True),
        sa.Column("bundle_path", sa.String(1024), nullable=True),
        sa.Column("fleet_uploaded", sa.Boolean(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("created_at"),
    )
    op.create_index(
        "ix_cloud_compile_records_model_version_id", "cloud_compile_records", ["model_version_id"]
    )
    op.create_index("ix_cloud_compile_records_job_id", "cloud_compile_records", ["job_id"])
    op.create_index(
        "ix_cloud_compile_records_artifact_id", "cloud_compile_records", ["artifact_id"]
    )


def downgrade() -> None:
    for table in (
        "cloud_compile_records",
        "cloud_model_versions",
        "cloud_models",
        "cloud_job_events",
        "cloud_jobs",
        "cloud_datasets",
    ):
        op.drop_table(table)
