// Helpers shared by the store's parts: proto copies, times, keys, and `Delta`.
// A port of threadline_client/state/_common.py, plus the store's error classes and clock.

import { clone, create } from "@bufbuild/protobuf";
import { timestampDate, TimestampSchema } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { ResourceSnapshotSchema } from "../../../../gen/ts/threadline/v1/errors_pb.js";
import type { ResourceSnapshot } from "../../../../gen/ts/threadline/v1/errors_pb.js";
import { MessageSchema } from "../../../../gen/ts/threadline/v1/message_pb.js";
import type { Message } from "../../../../gen/ts/threadline/v1/message_pb.js";
import { PresenceStateSchema, TypingStateSchema } from "../../../../gen/ts/threadline/v1/realtime_pb.js";
import type { Event, PresenceState, TypingState } from "../../../../gen/ts/threadline/v1/realtime_pb.js";
import { ReadMarkerSchema, ThreadSchema } from "../../../../gen/ts/threadline/v1/thread_pb.js";
import type { ReadMarker, Thread } from "../../../../gen/ts/threadline/v1/thread_pb.js";
import { MESSAGE_OPS, THREAD_OPS } from "./models.js";
import type {
  Change,
  ChangeKind,
  ConnectionState,
  LocalMessage,
  OpOutcome,
  PendingOp,
  Snapshot,
  ThreadView,
} from "./models.js";

/** ui.errors is a notification log for people, not an audit trail. */
export const MAX_UI_ERRORS = 50;

/** Thrown by store methods (Python's KeyError): an unknown message, thread or operation. */
export class UnknownItemError extends Error {
  override name = "UnknownItemError";
}

/** Thrown by store methods (Python's ValueError): a call that cannot be made now. */
export class InvalidOperationError extends Error {
  override name = "InvalidOperationError";
}

/**
 * A source of time. `now()` is Unix seconds (Python's time.time()); `monotonic()` is seconds on a
 * clock that never goes back (Python's time.monotonic(), for `PendingOp.notBefore`) and defaults
 * to `now()` when a clock leaves it out.
 */
export interface StoreClock {
  now(): number;
  monotonic?(): number;
}

/** The clock of a store created without one: wall time and performance.now(). */
export const defaultStoreClock: Required<StoreClock> = {
  now: () => Date.now() / 1000,
  monotonic: () => performance.now() / 1000,
};

/** A fresh `client_op_id`: 32 hex characters from a random 128-bit value (like uuid4().hex). */
export function newOpId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  bytes[6] = ((bytes[6] ?? 0) & 0x0f) | 0x40; // version 4, as uuid4
  bytes[8] = ((bytes[8] ?? 0) & 0x3f) | 0x80;
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function copyMessage(m: Message): Message {
  return clone(MessageSchema, m);
}

export function copyThread(t: Thread): Thread {
  return clone(ThreadSchema, t);
}

/** A Timestamp as a Date, or null when unset. */
export function dt(ts: Timestamp | undefined): Date | null {
  return ts === undefined ? null : timestampDate(ts);
}

/** A Timestamp as Unix seconds at microsecond precision (as Python's datetime.timestamp()). */
export function tsSeconds(ts: Timestamp | undefined): number {
  if (ts === undefined) return 0;
  const micros = Math.trunc(ts.nanos / 1000);
  return (Number(ts.seconds) * 1e6 + micros) / 1e6;
}

/** Unix seconds as a Timestamp, as Python's Timestamp.FromNanoseconds(int(t * 1e9)). */
export function timestampFromSeconds(t: number): Timestamp {
  const nanos = BigInt(Math.trunc(t * 1e9));
  const seconds = nanos / 1_000_000_000n - (nanos % 1_000_000_000n < 0n ? 1n : 0n);
  return create(TimestampSchema, { seconds, nanos: Number(nanos - seconds * 1_000_000_000n) });
}

/** A snapshot's messages of one thread. */
export function snapshotMessages(snapshot: Snapshot, threadId: string): readonly Message[] {
  const m = snapshot.messages;
  if (m instanceof Map) return (m as ReadonlyMap<string, readonly Message[]>).get(threadId) ?? [];
  const record = m as Readonly<Record<string, readonly Message[]>>;
  return Object.hasOwn(record, threadId) ? (record[threadId] ?? []) : [];
}

// Payload accessors: like Python's `event.message`, an absent field reads as an empty message.
export function eventMessage(e: Event): Message {
  return e.payload.case === "message" ? e.payload.value : create(MessageSchema);
}
export function eventThread(e: Event): Thread {
  return e.payload.case === "thread" ? e.payload.value : create(ThreadSchema);
}
export function eventMarker(e: Event): ReadMarker {
  return e.payload.case === "readMarker" ? e.payload.value : create(ReadMarkerSchema);
}
export function eventTyping(e: Event): TypingState {
  return e.payload.case === "typing" ? e.payload.value : create(TypingStateSchema);
}
export function eventPresence(e: Event): PresenceState {
  return e.payload.case === "presence" ? e.payload.value : create(PresenceStateSchema);
}
export function messageSnapshot(m: Message): ResourceSnapshot {
  return create(ResourceSnapshotSchema, { resource: { case: "message", value: m } });
}
export function threadSnapshot(t: Thread): ResourceSnapshot {
  return create(ResourceSnapshotSchema, { resource: { case: "thread", value: t } });
}

/** What one reducer call changed; becomes a `Change`. */
export class Delta {
  readonly threads = new Set<string>();
  readonly messages = new Set<LocalMessage>();
  readonly removed = new Set<LocalMessage>();
  readonly events: Event[] = [];
  readonly outcomes: OpOutcome[] = [];

  touch(message: LocalMessage): void {
    this.messages.add(message);
    this.removed.delete(message);
  }

  drop(message: LocalMessage): void {
    this.removed.add(message);
    this.messages.delete(message);
  }

  empty(): boolean {
    return !(
      this.threads.size ||
      this.messages.size ||
      this.removed.size ||
      this.events.length ||
      this.outcomes.length
    );
  }

  change(kind: ChangeKind): Change {
    return makeChange(kind, {
      threadIds: new Set(this.threads),
      messages: [...this.messages],
      removed: [...this.removed],
      events: [...this.events],
      outcomes: [...this.outcomes],
    });
  }
}

/** A frozen `Change` (fields left out are empty). */
export function makeChange(
  kind: ChangeKind,
  parts: Partial<Omit<Change, "kind">> & { connection?: ConnectionState | null } = {},
): Change {
  return Object.freeze({
    kind,
    threadIds: parts.threadIds ?? new Set<string>(),
    messages: Object.freeze([...(parts.messages ?? [])]),
    removed: Object.freeze([...(parts.removed ?? [])]),
    events: Object.freeze([...(parts.events ?? [])]),
    outcomes: Object.freeze([...(parts.outcomes ?? [])]),
    connection: parts.connection ?? null,
  });
}

export function messageKey(localId: string): string {
  return `m:${localId}`;
}

export function threadKey(threadId: string): string {
  return `t:${threadId}`;
}

export function opKey(op: PendingOp): string {
  if (MESSAGE_OPS.has(op.kind)) return messageKey(op.localId);
  if (THREAD_OPS.has(op.kind)) return threadKey(op.targetId);
  return `o:${op.opId}`;
}

/** How recently a thread was active: its newest message, its last update or its creation. */
export function activity(view: ThreadView): number {
  const last = view.lastMessage;
  const lastTime = last?.createTime !== undefined ? Number(last.createTime.seconds) : 0;
  return Math.max(lastTime, tsSeconds(view.server.updateTime), tsSeconds(view.server.createTime));
}
