"""send batch function (PostgreSQL)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:00:00.000000

The whole group-commit transaction of sends without attachments as one server-side function, so
that a batch costs one round trip (the call, in its own implicit transaction) instead of five
(BEGIN, a read, the thread bumps, the inserts, COMMIT). It decides exactly as
storage/hot/plan.py's plan_batch and allocate do (tests/e2e/test_hot_send_path.py holds both
to the engine path's outcomes and rows):

- an item whose (user, op id) has a record is a replay of it, or IDEMPOTENCY_KEY_REUSED when its
  payload hash differs;
- else an item with the same key as an earlier accepted item of the batch is a replay of that
  item (`ref`), or reused when the hashes differ;
- else an item whose sender is not a member of its thread is refused (NotFound: thread);
- else it is a new message: its thread's seq is bumped (rows locked in thread id order, so two
  batches never wait on each other in a cycle), then the change cursors are reserved, last, so
  the server_state row lock orders commits and cursors commit gapless in order.

It returns one row per item (`n` from 1, `outcome` one of new / replay / same / reused /
not_member) and, after them, one row per member of each thread that got a new message
(`outcome` = member), the recipients of its events. SQLite has no server-side functions: its
writer runs the same steps on a dedicated thread (storage/hot/sqlite.py).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = r"""
CREATE FUNCTION threadline_send_batch(
    p_user text[], p_op text[], p_thread text[], p_body text[], p_hash bytea[], p_id text[],
    p_now timestamptz, p_kind integer)
RETURNS TABLE (n integer, outcome text, ref integer, seq bigint, change_seq bigint,
               resource_id text, thread_id text, user_id text)
LANGUAGE plpgsql AS $fn$
DECLARE
    d_outcome text[];
    d_ref integer[];
    d_resource text[];
    d_change bigint[];
    a_n integer[];
    a_seq bigint[];
    v_base bigint;
BEGIN
    -- Locked before membership is read, so a removal committing meanwhile is seen.
    PERFORM 1 FROM threads t WHERE t.id = ANY (p_thread) ORDER BY t.id FOR UPDATE;

    WITH i AS (
        SELECT u.n::integer AS n, u.user_id, u.op, u.thread_id, u.hash
          FROM unnest(p_user, p_op, p_thread, p_hash) WITH ORDINALITY
               AS u(user_id, op, thread_id, hash, n)
    ),
    d AS (
        SELECT i.*, o.payload_hash AS prior_hash, o.resource_id AS prior_id,
               o.change_seq AS prior_change,
               EXISTS (SELECT 1 FROM thread_members m
                        WHERE m.thread_id = i.thread_id AND m.user_id = i.user_id) AS member
          FROM i LEFT JOIN operations o
            ON o.user_id = i.user_id AND o.client_op_id = i.op
    ),
    f AS (
        SELECT d.*, min(d.n) FILTER (WHERE d.prior_hash IS NULL AND d.member)
                        OVER (PARTITION BY d.user_id, d.op) AS first_n
          FROM d
    )
    SELECT array_agg(CASE
               WHEN f.prior_hash IS NOT NULL THEN
                   CASE WHEN f.prior_hash = f.hash THEN 'replay' ELSE 'reused' END
               WHEN f.first_n < f.n THEN
                   CASE WHEN p_hash[f.first_n] = f.hash THEN 'same' ELSE 'reused' END
               WHEN f.first_n = f.n THEN 'new'
               ELSE 'not_member' END ORDER BY f.n),
           array_agg(CASE WHEN f.prior_hash IS NULL AND f.first_n < f.n THEN f.first_n END
                     ORDER BY f.n),
           array_agg(f.prior_id ORDER BY f.n),
           array_agg(f.prior_change ORDER BY f.n)
      INTO d_outcome, d_ref, d_resource, d_change
      FROM f;

    SELECT array_agg(k ORDER BY k) INTO a_n
      FROM generate_subscripts(d_outcome, 1) AS k WHERE d_outcome[k] = 'new';

    IF a_n IS NOT NULL THEN
        WITH a AS (
            SELECT k, p_thread[k] AS tid,
                   row_number() OVER (PARTITION BY p_thread[k] ORDER BY k) AS r,
                   count(*) OVER (PARTITION BY p_thread[k]) AS c
              FROM unnest(a_n) AS k
        ),
        b AS (
            UPDATE threads t SET last_seq = t.last_seq + c.c, last_activity_at = p_now
              FROM (SELECT a.tid, max(a.c) AS c FROM a GROUP BY a.tid) AS c
             WHERE t.id = c.tid
            RETURNING t.id, t.last_seq
        )
        SELECT array_agg(b.last_seq - a.c + a.r ORDER BY a.k) INTO a_seq
          FROM a JOIN b ON b.id = a.tid;

        UPDATE server_state s SET change_seq = s.change_seq + cardinality(a_n) WHERE s.id = 1
        RETURNING s.change_seq - cardinality(a_n) INTO v_base;

        INSERT INTO messages AS m (id, thread_id, seq, author_id, text, version, deleted,
                                   created_at)
        SELECT p_id[a.k], p_thread[a.k], a.s, p_user[a.k], p_body[a.k], 1, false, p_now
          FROM unnest(a_n, a_seq) WITH ORDINALITY AS a(k, s, r) ORDER BY a.r;
        INSERT INTO operations AS o (user_id, client_op_id, payload_hash, resource_kind,
                                     resource_id, change_seq, result_version, created_at)
        SELECT p_user[a.k], p_op[a.k], p_hash[a.k], 'message', p_id[a.k], v_base + a.r, 1, p_now
          FROM unnest(a_n) WITH ORDINALITY AS a(k, r) ORDER BY a.r;
        INSERT INTO changes AS c (change_seq, thread_id, user_id, kind, thread_seq, version,
                                  actor_id, resource_id, client_op_id, created_at)
        SELECT v_base + a.r, p_thread[a.k], NULL, p_kind, a.s, 1, p_user[a.k], p_id[a.k],
               p_op[a.k], p_now
          FROM unnest(a_n, a_seq) WITH ORDINALITY AS a(k, s, r) ORDER BY a.r;
    END IF;

    RETURN QUERY
        SELECT k, d_outcome[k], d_ref[k], a.s, coalesce(v_base + a.r, d_change[k]), d_resource[k]::text,
               NULL::text, NULL::text
          FROM generate_subscripts(d_outcome, 1) AS k
          LEFT JOIN unnest(a_n, a_seq) WITH ORDINALITY AS a(ak, s, r) ON a.ak = k
         ORDER BY k;
    RETURN QUERY
        SELECT NULL::integer, 'member', NULL::integer, NULL::bigint, NULL::bigint, NULL::text,
               m.thread_id::text, m.user_id::text
          FROM thread_members m
         WHERE m.thread_id IN (SELECT DISTINCT p_thread[k] FROM unnest(a_n) AS k);
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION threadline_send_batch"
            "(text[], text[], text[], text[], bytea[], text[], timestamptz, integer)"
        )
