"""Table definitions: the one schema for SQLite and PostgreSQL, and the Alembic target."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT on PostgreSQL; SQLite wants INTEGER for an auto-incrementing rowid alias.
BigInt = BigInteger().with_variant(Integer(), "sqlite")
Stamp = DateTime(timezone=True)

# A single row: the epoch (changes if the sequence store is reset or restored) and the global
# change cursor. Its row lock is taken last in every write transaction, so commit order equals
# change_seq order and the cursor has no gaps.
server_state = Table(
    "server_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("epoch", String(64), nullable=False),
    Column("change_seq", BigInt, nullable=False),
    # Change cursors at or below this were pruned: resuming from them needs a full resync.
    Column("pruned_through", BigInt, nullable=False, server_default="0"),
)

users = Table(
    "users",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("display_name", String(256), nullable=False, server_default=""),
    Column("email", String(320), nullable=False, server_default=""),
    Column("image_url", String(2048), nullable=False, server_default=""),
    Column("created_at", Stamp, nullable=False),
    Column("seen", Boolean, nullable=False, server_default="0"),
    Column("pref_theme", Integer, nullable=False, server_default="0"),
    Column("pref_locale", String(35), nullable=False, server_default=""),
    Column("pref_time_zone", String(64), nullable=False, server_default=""),
    Column("pref_notifications", Boolean, nullable=False, server_default="1"),
    Column("pref_version", BigInt, nullable=False, server_default="0"),
)

threads = Table(
    "threads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("tags", Text, nullable=False, server_default="[]"),
    Column("archived", Boolean, nullable=False, server_default="0"),
    Column("creator_id", String(128), nullable=False),
    Column("last_seq", BigInt, nullable=False, server_default="0"),
    Column("version", BigInt, nullable=False, server_default="1"),
    Column("created_at", Stamp, nullable=False),
    Column("updated_at", Stamp, nullable=False),
    Column("last_activity_at", Stamp, nullable=False),
    Index("ix_threads_last_activity", "last_activity_at", "id"),
)

thread_members = Table(
    "thread_members",
    metadata,
    Column("thread_id", String(32), ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("read_seq", BigInt, nullable=False, server_default="0"),
    Column("joined_at", Stamp, nullable=False),
    PrimaryKeyConstraint("thread_id", "user_id"),
    Index("ix_thread_members_user", "user_id", "thread_id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("thread_id", String(32), ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    Column("seq", BigInt, nullable=False),
    Column("author_id", String(128), nullable=False),
    Column("text", Text, nullable=False),
    Column("version", BigInt, nullable=False, server_default="1"),
    Column("deleted", Boolean, nullable=False, server_default="0"),
    Column("created_at", Stamp, nullable=False),
    Column("updated_at", Stamp, nullable=True),
    UniqueConstraint("thread_id", "seq"),
)

# The change log behind the per-user cursor: one row per committed change. `user_id` is set for
# changes meant for one user only (read markers, removal from a thread).
changes = Table(
    "changes",
    metadata,
    Column("change_seq", BigInt, primary_key=True, autoincrement=False),
    Column("thread_id", String(32), nullable=False),
    Column("user_id", String(128), nullable=True),
    Column("kind", Integer, nullable=False),
    Column("thread_seq", BigInt, nullable=False),
    Column("version", BigInt, nullable=False),
    Column("actor_id", String(128), nullable=False),
    Column("resource_id", String(32), nullable=False),
    Column("client_op_id", String(64), nullable=False, server_default=""),
    Column("created_at", Stamp, nullable=False),
    Index("ix_changes_thread", "thread_id", "change_seq"),
    Index("ix_changes_user", "user_id", "change_seq"),
)

# Idempotency keys: written in the same transaction as the change they produced.
operations = Table(
    "operations",
    metadata,
    Column("user_id", String(128), nullable=False),
    Column("client_op_id", String(64), nullable=False),
    Column("payload_hash", LargeBinary(32), nullable=False),
    Column("resource_kind", String(16), nullable=False),
    Column("resource_id", String(32), nullable=False),
    Column("change_seq", BigInt, nullable=False),
    Column("result_version", BigInt, nullable=False, server_default="0"),
    Column("created_at", Stamp, nullable=False),
    PrimaryKeyConstraint("user_id", "client_op_id"),
    Index("ix_operations_created", "created_at"),
)

# Earlier versions of messages and threads: the base of a three-way merge, and the exact payload
# of a replayed change. The current version lives in `messages` / `threads`; a row is added here
# only when a version is superseded, so the send path writes nothing extra.
message_revisions = Table(
    "message_revisions",
    metadata,
    Column("message_id", String(32), ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("version", BigInt, nullable=False),
    Column("text", Text, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("updated_at", Stamp, nullable=True),
    Column("superseded_at", Stamp, nullable=False),
    PrimaryKeyConstraint("message_id", "version"),
)

thread_revisions = Table(
    "thread_revisions",
    metadata,
    Column("thread_id", String(32), ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    Column("version", BigInt, nullable=False),
    Column("title", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("tags", Text, nullable=False),
    Column("archived", Boolean, nullable=False),
    Column("participants", Text, nullable=False),
    Column("last_seq", BigInt, nullable=False),
    Column("updated_at", Stamp, nullable=False),
    Column("superseded_at", Stamp, nullable=False),
    PrimaryKeyConstraint("thread_id", "version"),
)
