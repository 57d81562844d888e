"""Initial schema: organizations, API keys, groups, devices, artifacts, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _org() -> sa.Column[object]:
    return sa.Column("org_id", sa.Uuid(), sa.ForeignKey("organizations.id"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        _ts("created_at"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("key_id", sa.String(12), nullable=False, unique=True),
        _org(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("secret_hash", sa.String(256), nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(12), nullable=True),
        _ts("revoked_at", nullable=True),
    )
    op.create_index("ix_api_keys_org_id", "api_keys", ["org_id"])
    op.create_table(
        "groups",
        sa.Column("id", sa.Uuid(), primary_key=True),
        _org(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.String(1024), nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("org_id", "name", name="uq_groups_org_name"),
    )
    op.create_index("ix_groups_org_id", "groups", ["org_id"])
    op.create_table(
        "devices",
        sa.Column("id", sa.Uuid(), primary_key=True),
        # Unique in the whole fleet: it is the device's MQTT username.
        sa.Column("device_id", sa.String(64), nullable=False, unique=True),
        _org(),
        sa.Column("profile", sa.String(128), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("group_id", sa.Uuid(), sa.ForeignKey("groups.id"), nullable=True),
        _ts("created_at"),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        _ts("revoked_at", nullable=True),
    )
    op.create_index("ix_devices_org_id", "devices", ["org_id"])
    op.create_index("ix_devices_group_id", "devices", ["group_id"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Uuid(), primary_key=True),
        _org(),
        sa.Column("artifact_id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(128), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("transfer_sha256", sa.String(64), nullable=False),
        _ts("uploaded_at"),
        sa.Column("uploaded_by", sa.String(12), nullable=True),
        sa.UniqueConstraint("org_id", "artifact_id", name="uq_artifacts_org_artifact"),
    )
    op.create_index("ix_artifacts_org_id", "artifacts", ["org_id"])
    op.create_index("ix_artifacts_artifact_id", "artifacts", ["artifact_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _org(),
        sa.Column("actor", sa.String(12), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(1024), nullable=True),
        _ts("at"),
    )
    op.create_index("ix_audit_log_org_id", "audit_log", ["org_id"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    for table in ("audit_log", "artifacts", "devices", "groups", "api_keys", "organizations"):
        op.drop_table(table)
