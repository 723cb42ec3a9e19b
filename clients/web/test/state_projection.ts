// The projection of a ClientStore's state into plain JSON with snake_case keys, and the matcher
// of the language-neutral cases (tests/cases/client_state). Must produce exactly what the
// Python projection (tests/unit/client_state_cases.py) produces for the same state.

import { toJson } from "@bufbuild/protobuf";
import type { JsonValue } from "@bufbuild/protobuf";
import { LimitsSchema } from "../../../gen/ts/threadline/v1/realtime_pb.js";
import { resourceKind } from "../src/state/index.js";
import type {
  Change,
  ClientStore,
  LocalMessage,
  OpError,
  OpOutcome,
  PendingOp,
  ThreadView,
} from "../src/state/index.js";

/** Plain JSON (as JSON.parse returns it). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

/** Objects at these keys are maps from ids (or field names): their key sets must match exactly. */
export const EXACT_MAPS: ReadonlySet<string> = new Set(["by_id", "messages", "typing", "thread_seqs", "fields"]);

/** The top-level keys of `project()`. */
export const PROJECTION_KEYS: ReadonlySet<string> = new Set([
  "user",
  "connection",
  "threads",
  "messages",
  "pending_messages",
  "failed",
  "ops",
  "ui",
  "sync",
  "sync_state",
  "resume",
]);

/** Keys the runner adds next to the projection. */
export const RUNNER_KEYS: ReadonlySet<string> = new Set(["changes", "change", "returned"]);

function time(value: Date | null): number | null {
  return value === null ? null : value.getTime() / 1000;
}

function sorted(values: Iterable<string>): string[] {
  return [...values].sort();
}

export function projectError(error: OpError | null): Json {
  if (error === null) return null;
  return {
    code: error.code,
    reason: error.reason,
    message: error.message,
    retry_after: error.retryAfter,
    field_violations: error.fieldViolations.map(([f, d]) => [f, d]),
  };
}

export function projectMessage(m: LocalMessage): Json {
  return {
    local_id: m.localId,
    id: m.id,
    thread_id: m.threadId,
    author_id: m.authorId,
    seq: m.seq,
    version: m.version,
    text: m.text,
    deleted: m.deleted,
    edited: m.edited,
    status: m.status,
    op: m.op,
    client_op_id: m.clientOpId,
    error: projectError(m.error),
    create_time: time(m.createTime),
    update_time: time(m.updateTime),
    confirmed: m.server !== null,
  };
}

export function projectThread(v: ThreadView): Json {
  const last = v.lastMessage;
  return {
    title: v.title,
    description: v.description,
    tags: [...v.tags],
    participant_ids: [...v.participantIds],
    archived: v.archived,
    creator_id: v.creatorId,
    last_seq: v.lastSeq,
    version: v.version,
    read_seq: v.readSeq,
    unread_count: v.unreadCount,
    pending: v.pending,
    create_time: time(v.createTime),
    update_time: time(v.updateTime),
    last_message:
      last === null
        ? null
        : {
            id: last.id,
            seq: Number(last.seq),
            version: Number(last.version),
            text: last.text,
            deleted: last.deleted,
          },
  };
}

export function projectOp(op: PendingOp): Json {
  const fields: JsonObject = {};
  const f = op.fields;
  if (f.title !== undefined) fields["title"] = f.title;
  if (f.description !== undefined) fields["description"] = f.description;
  if (f.tags !== undefined) fields["tags"] = [...f.tags];
  if (f.archived !== undefined) fields["archived"] = f.archived;
  return {
    op_id: op.opId,
    kind: op.kind,
    thread_id: op.threadId,
    target_id: op.targetId,
    local_id: op.localId,
    text: op.text,
    attachment_ids: [...op.attachmentIds],
    fields,
    participant_ids: [...op.participantIds],
    read_seq: op.readSeq,
    base_version: op.baseVersion,
    sent: op.sent,
    attempts: op.attempts,
    not_before: op.notBefore,
    error: projectError(op.error),
  };
}

/** The state as plain JSON with snake_case keys (identical to the Python projection). */
export function project(store: ClientStore): JsonObject {
  const s = store.state;
  const sync = s.sync;
  const state = store.syncState();
  const byId: JsonObject = {};
  for (const [tid, v] of s.threads.byId) byId[tid] = projectThread(v);
  const messages: JsonObject = {};
  for (const [tid, items] of s.messages.byThread) messages[tid] = items.map(projectMessage);
  const typing: JsonObject = {};
  for (const [tid, users] of s.ui.typing) typing[tid] = sorted(users);
  const threadSeqs: JsonObject = {};
  for (const [tid, seq] of Object.entries(state.threadSeqs)) threadSeqs[tid] = Number(seq);
  const last = state.lastSyncedAt;
  return {
    user: {
      id: s.user.id,
      online: s.user.online,
      display_name: s.user.current !== null ? s.user.current.displayName : null,
    },
    connection: s.connection,
    threads: {
      active: s.threads.active.map((v) => v.id),
      archived: s.threads.archived.map((v) => v.id),
      unread: s.threads.unread,
      by_id: byId,
    },
    messages,
    pending_messages: s.messages.pending.map((m) => m.localId),
    failed: s.messages.failed.map(projectMessage),
    ops: {
      pending: s.ops.pending.map(projectOp),
      failed: [...s.ops.failed.values()].map(projectOp),
      next: store.nextOp()?.opId ?? null,
    },
    ui: {
      active_thread: s.ui.activeThread,
      loading: sorted([...s.ui.loadingStates].filter(([, v]) => v).map(([k]) => k)),
      errors: s.ui.errors.map((e) => ({ source: e.source, at: e.at, error: projectError(e.error) })),
      typing,
      online: sorted(s.ui.online),
    },
    sync: {
      epoch: sync.epoch,
      change_seq: sync.changeSeq,
      synced: sync.synced,
      recovered: sync.recovered,
      resyncs: sync.resyncs,
      session_id: sync.sessionId,
      last_synced_at: sync.lastSyncedAt,
      limits: sync.limits !== null ? jsonOf(toJson(LimitsSchema, sync.limits)) : null,
    },
    sync_state: {
      epoch: state.epoch,
      change_seq: Number(state.changeSeq),
      thread_seqs: threadSeqs,
      pending_op_ids: [...state.pendingOpIds],
      last_synced_at: last !== undefined ? Number(last.seconds) + last.nanos / 1e9 : null,
    },
    resume: store.resumeState() !== null,
  };
}

function jsonOf(value: JsonValue): Json {
  return value as Json; // JsonValue is JSON too; the alias differs only in readonly-ness
}

export function projectOutcome(outcome: OpOutcome): Json {
  const conflict = outcome.conflict;
  return {
    op_id: outcome.op.opId,
    kind: outcome.op.kind,
    status: outcome.status,
    resource: resourceKind(outcome.resource),
    error: projectError(outcome.error),
    conflict:
      conflict === null
        ? null
        : { resource: conflict.resource, fields: [...conflict.fields], server_version: conflict.serverVersion },
  };
}

export function projectChange(change: Change): Json {
  return {
    kind: change.kind,
    thread_ids: sorted(change.threadIds),
    messages: change.messages.map((m) => m.localId),
    removed: change.removed.map((m) => m.localId),
    events: change.events.map((e) => Number(e.changeSeq)),
    outcomes: change.outcomes.map(projectOutcome),
    connection: change.connection,
  };
}

// -- matching -------------------------------------------------------------------------------------

function isObject(value: Json | undefined): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function show(value: Json | undefined): string {
  return value === undefined ? "undefined" : JSON.stringify(value);
}

/**
 * Where `actual` differs from `expected`: objects by the keys given (all keys for the id-keyed
 * maps in EXACT_MAPS), lists element by element, scalars by value and JSON type.
 */
export function mismatches(expected: Json, actual: Json | undefined, path: string, exact = false): string[] {
  const out: string[] = [];
  if (isObject(expected)) {
    if (!isObject(actual)) return [`${path}: expected an object, got ${show(actual)}`];
    for (const [key, value] of Object.entries(expected)) {
      if (!Object.hasOwn(actual, key)) {
        out.push(`${path}.${key}: missing (have ${JSON.stringify(Object.keys(actual).sort())})`);
        continue;
      }
      out.push(...mismatches(value, actual[key], `${path}.${key}`, EXACT_MAPS.has(key)));
    }
    if (exact) {
      const want = Object.keys(expected).sort();
      const have = Object.keys(actual).sort();
      if (JSON.stringify(want) !== JSON.stringify(have)) {
        out.push(`${path}: keys ${JSON.stringify(have)}, expected ${JSON.stringify(want)}`);
      }
    }
  } else if (Array.isArray(expected)) {
    if (!Array.isArray(actual) || actual.length !== expected.length) {
      return [`${path}: expected ${show(expected)}, got ${show(actual)}`];
    }
    expected.forEach((e, i) => out.push(...mismatches(e, actual[i], `${path}[${i}]`)));
  } else if (typeof expected !== typeof actual || expected !== actual) {
    out.push(`${path}: expected ${show(expected)}, got ${show(actual)}`);
  }
  return out;
}
