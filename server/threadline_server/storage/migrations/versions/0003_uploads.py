"""uploads

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 12:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Generated with alembic autogenerate against storage/uploads.py's table, then reviewed.
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("uploader_id", sa.String(length=128), nullable=False),
        sa.Column("client_op_id", sa.String(length=64), nullable=True),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column(
            "size_bytes", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), server_default="", nullable=False),
        sa.Column("object_key", sa.String(length=255), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("attach_order", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "version",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            server_default="1",
            nullable=False,
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'ready', 'attached', 'deleting')", name="ck_uploads_state"
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_uploads_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
        sa.UniqueConstraint("object_key", name=op.f("uq_uploads_object_key")),
        sa.UniqueConstraint(
            "uploader_id", "client_op_id", name=op.f("uq_uploads_uploader_id_client_op_id")
        ),
    )
    op.create_index("ix_uploads_message", "uploads", ["message_id", "attach_order"], unique=False)
    op.create_index("ix_uploads_state_expires", "uploads", ["state", "expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_uploads_state_expires", table_name="uploads")
    op.drop_index("ix_uploads_message", table_name="uploads")
    op.drop_table("uploads")
