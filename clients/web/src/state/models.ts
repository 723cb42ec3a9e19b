// The state's data types: enums, value types (ops, messages, threads, changes) and containers.
// A port of threadline_client/state/models.py; enum values are the Python StrEnum values.

import { create } from "@bufbuild/protobuf";
import { anyUnpack, FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import type { Any } from "@bufbuild/protobuf/wkt";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../../../../gen/ts/google/rpc/error_details_pb.js";
import type { Status } from "../../../../gen/ts/google/rpc/status_pb.js";
import type { Conflict, ResourceSnapshot } from "../../../../gen/ts/threadline/v1/errors_pb.js";
import { MessageSchema } from "../../../../gen/ts/threadline/v1/message_pb.js";
import type { Message } from "../../../../gen/ts/threadline/v1/message_pb.js";
import { OperationKind, OperationSchema, SendMessageSchema } from "../../../../gen/ts/threadline/v1/realtime_pb.js";
import type { Event, Limits, Operation, SendMessage } from "../../../../gen/ts/threadline/v1/realtime_pb.js";
import { ReadMarkerSchema, ThreadSchema } from "../../../../gen/ts/threadline/v1/thread_pb.js";
import type { ReadMarker, Thread, ThreadSummary } from "../../../../gen/ts/threadline/v1/thread_pb.js";
import type { User, UserPreferences } from "../../../../gen/ts/threadline/v1/user_pb.js";
import type { GetMeResponse } from "../../../../gen/ts/threadline/v1/user_service_pb.js";

/** Thread fields an UPDATE operation may name in its mask. */
export const THREAD_UPDATE_FIELDS: ReadonlySet<string> = new Set(["title", "description", "tags", "archived"]);

// -- enums ----------------------------------------------------------------------------------------

/** Where a session's connection stands. */
export const ConnectionState = {
  /** The first connection attempt is under way. */
  CONNECTING: "connecting",
  /** The server accepted the stream; catching up (replay or snapshot) before going online. */
  SYNCING: "syncing",
  /** Caught up; live events flow and pending operations are being sent. */
  ONLINE: "online",
  /** The stream ended; waiting (backoff) or connecting again. */
  RECONNECTING: "reconnecting",
  /** Not started, stopped, or given up after a non-transient error. */
  OFFLINE: "offline",
} as const;
export type ConnectionState = (typeof ConnectionState)[keyof typeof ConnectionState];

/** The delivery state of a `LocalMessage`. */
export const MessageStatus = {
  /** An operation on it (send, edit or delete) awaits the server's answer. */
  PENDING: "pending",
  /** The server's copy, with no local change outstanding. */
  SENT: "sent",
  /** The server rejected the operation; see `LocalMessage.error`. */
  FAILED: "failed",
} as const;
export type MessageStatus = (typeof MessageStatus)[keyof typeof MessageStatus];

/** What a pending operation does. */
export const OpKind = {
  SEND_MESSAGE: "send_message",
  EDIT_MESSAGE: "edit_message",
  DELETE_MESSAGE: "delete_message",
  CREATE_THREAD: "create_thread",
  UPDATE_THREAD: "update_thread",
  MARK_READ: "mark_read",
} as const;
export type OpKind = (typeof OpKind)[keyof typeof OpKind];

/** How an operation ended. */
export const OpStatus = {
  CONFIRMED: "confirmed",
  REJECTED: "rejected",
  CONFLICT: "conflict",
} as const;
export type OpStatus = (typeof OpStatus)[keyof typeof OpStatus];

/** What caused a change notification. */
export const ChangeKind = {
  /** A snapshot replaced the server state (or a page of older history was merged). */
  SNAPSHOT: "snapshot",
  /** Events from the stream (live or replayed). */
  EVENTS: "events",
  /** A local optimistic operation was queued, retried or dismissed. */
  LOCAL: "local",
  /** An operation result (or a deferral of a retryable one). */
  RESULT: "result",
  /** The connection state changed. */
  CONNECTION: "connection",
  /** UI-only state: active thread, loading flags, errors, sync bookkeeping. */
  UI: "ui",
} as const;
export type ChangeKind = (typeof ChangeKind)[keyof typeof ChangeKind];

/** @internal */
export const MESSAGE_OPS: ReadonlySet<OpKind> = new Set<OpKind>(["send_message", "edit_message", "delete_message"]);
/** @internal */
export const THREAD_OPS: ReadonlySet<OpKind> = new Set<OpKind>(["update_thread", "mark_read"]);

// -- errors ---------------------------------------------------------------------------------------

/** gRPC status code names by number (as grpc.StatusCode names them). */
// prettier-ignore
const CODE_NAMES: readonly string[] = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];
const INVALID_ARGUMENT = 3;

function unpackDetail<T>(details: readonly Any[], unpack: (a: Any) => T | undefined): T | undefined {
  for (const item of details) {
    try {
      const value = unpack(item);
      if (value !== undefined) return value;
    } catch {
      // A detail that does not decode is skipped, as the Python SDK keeps it raw.
    }
  }
  return undefined;
}

/** Why an operation failed, as the server said it (or the SDK, for local conditions). */
export class OpError {
  constructor(
    /** The gRPC status code name, e.g. `PERMISSION_DENIED`. */
    readonly code: string,
    /** The stable `ErrorInfo.reason`, e.g. `NOT_ALLOWED` (null if the status had none). */
    readonly reason: string | null,
    /** The status message, for people. */
    readonly message: string,
    /** Server-suggested delay before retrying, in seconds (RetryInfo), if any. */
    readonly retryAfter: number | null = null,
    /** `[field, description]` pairs (BadRequest) for INVALID_ARGUMENT. */
    readonly fieldViolations: readonly (readonly [string, string])[] = [],
  ) {}

  /** Builds an `OpError` from a `google.rpc.Status` (e.g. `OperationResult.rejected`). */
  static fromStatus(status: Status): OpError {
    const code = CODE_NAMES[status.code] ?? "UNKNOWN";
    const info = unpackDetail(status.details, (a) => anyUnpack(a, ErrorInfoSchema));
    const retry = unpackDetail(status.details, (a) => anyUnpack(a, RetryInfoSchema));
    let retryAfter: number | null = null;
    if (retry?.retryDelay !== undefined) {
      // As Python's Duration.ToTimedelta().total_seconds(): microsecond precision.
      const micros = Math.trunc(retry.retryDelay.nanos / 1000);
      retryAfter = (Number(retry.retryDelay.seconds) * 1e6 + micros) / 1e6;
    }
    let violations: (readonly [string, string])[] = [];
    if (status.code === INVALID_ARGUMENT) {
      const bad = unpackDetail(status.details, (a) => anyUnpack(a, BadRequestSchema));
      if (bad !== undefined) {
        violations = bad.fieldViolations.map((v) => [v.field, v.description] as const);
      }
    }
    return new OpError(code, info?.reason || null, status.message, retryAfter, violations);
  }

  toString(): string {
    const text = `${this.code}: ${this.message}`;
    return this.reason ? `${text} [${this.reason}]` : text;
  }
}

/** An error to show to the user. */
export class UiError {
  constructor(
    /** What failed: `op:<client_op_id>` for operations, `connection` for the stream. */
    readonly source: string,
    readonly error: OpError,
    /** When it happened (Unix seconds). */
    readonly at: number,
  ) {}
}

/** Thread fields of a create or update: title, description, tags, archived. */
export interface ThreadFields {
  title?: string;
  description?: string;
  tags?: readonly string[];
  archived?: boolean;
}

/** The fields of a `PendingOp`; all but opId, kind and threadId default to empty. */
export type PendingOpInit = Pick<PendingOp, "opId" | "kind" | "threadId"> &
  Partial<
    Pick<
      PendingOp,
      "targetId" | "localId" | "text" | "attachmentIds" | "fields" | "participantIds" | "readSeq" | "baseVersion"
    >
  >;

/** A local operation not yet answered by the server, kept in submission order. */
export class PendingOp {
  /** The `client_op_id`, stable across resends so the server applies it once. */
  opId: string;
  /** What it does. */
  kind: OpKind;
  /** The thread concerned. */
  threadId: string;
  /** The message id (edit, delete) or thread id (update, mark read); empty for sends and creates. */
  targetId: string;
  /** The `LocalMessage.localId` it shows on (the op id itself for sends). */
  localId: string;
  /** New text (send, edit). */
  text: string;
  /** Completed uploads the message carries (send). */
  attachmentIds: readonly string[];
  /** Thread fields (create, update). */
  fields: ThreadFields;
  /** Other participants (create thread). */
  participantIds: readonly string[];
  /** The read marker (mark read). */
  readSeq: number;
  /** The version the change was made from (edit, delete, update). */
  baseVersion: number;
  /** Sent at least once; the outcome may be unknown until answered. */
  sent = false;
  /** How many times it was sent. */
  attempts = 0;
  /** Monotonic time (seconds, the store clock) before which it must not be resent. */
  notBefore = 0;
  /** The last error (a failed op's reason, or the last retryable rejection). */
  error: OpError | null = null;

  constructor(init: PendingOpInit) {
    this.opId = init.opId;
    this.kind = init.kind;
    this.threadId = init.threadId;
    this.targetId = init.targetId ?? "";
    this.localId = init.localId ?? "";
    this.text = init.text ?? "";
    this.attachmentIds = init.attachmentIds ?? [];
    this.fields = init.fields ?? {};
    this.participantIds = init.participantIds ?? [];
    this.readSeq = init.readSeq ?? 0;
    this.baseVersion = init.baseVersion ?? 0;
  }

  /** The frame payload to send: `SendMessage` for sends, `Operation` for the rest. */
  toProto(): SendMessage | Operation {
    if (this.kind === OpKind.SEND_MESSAGE) {
      return create(SendMessageSchema, {
        clientOpId: this.opId,
        threadId: this.threadId,
        text: this.text,
        attachmentIds: [...this.attachmentIds],
      });
    }
    const op = create(OperationSchema, {
      clientOpId: this.opId,
      baseVersion: BigInt(this.baseVersion),
    });
    switch (this.kind) {
      case OpKind.EDIT_MESSAGE:
        op.kind = OperationKind.UPDATE;
        op.updateMask = create(FieldMaskSchema, { paths: ["text"] });
        op.resource = {
          case: "message",
          value: create(MessageSchema, { id: this.targetId, threadId: this.threadId, text: this.text }),
        };
        break;
      case OpKind.DELETE_MESSAGE:
        op.kind = OperationKind.DELETE;
        op.resource = {
          case: "message",
          value: create(MessageSchema, { id: this.targetId, threadId: this.threadId }),
        };
        break;
      case OpKind.CREATE_THREAD:
        op.kind = OperationKind.CREATE;
        op.resource = {
          case: "thread",
          value: create(ThreadSchema, {
            title: String(this.fields.title ?? ""),
            description: String(this.fields.description ?? ""),
            tags: [...(this.fields.tags ?? [])],
            participantIds: [...this.participantIds],
          }),
        };
        break;
      case OpKind.UPDATE_THREAD: {
        op.kind = OperationKind.UPDATE;
        const thread = create(ThreadSchema, { id: this.targetId });
        const paths = fieldPaths(this.fields);
        const f = this.fields;
        if (f.title !== undefined) thread.title = f.title;
        if (f.description !== undefined) thread.description = f.description;
        if (f.tags !== undefined) thread.tags = [...f.tags];
        if (f.archived !== undefined) thread.archived = f.archived;
        op.updateMask = create(FieldMaskSchema, { paths });
        op.resource = { case: "thread", value: thread };
        break;
      }
      default:
        op.kind = OperationKind.UPDATE;
        op.updateMask = create(FieldMaskSchema, { paths: ["read_seq"] });
        op.resource = {
          case: "readMarker",
          value: create(ReadMarkerSchema, { threadId: this.threadId, readSeq: BigInt(this.readSeq) }),
        };
    }
    return op;
  }
}

/** The names of the fields set, sorted (the update mask of a thread update). */
export function fieldPaths(fields: ThreadFields): string[] {
  return Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k]) => k)
    .sort();
}

/** The fields of a `LocalMessage`; localId, threadId, authorId and text are required. */
export type LocalMessageInit = Pick<LocalMessage, "localId" | "threadId" | "authorId" | "text"> &
  Partial<Omit<LocalMessage, "localId" | "threadId" | "authorId" | "text" | "pending" | "edited">>;

/**
 * A message as the UI shows it: the server's copy with local changes laid over it.
 *
 * Compared by identity: the same message is always the same object while it stays in the store,
 * and keeps its `localId` when the server's version replaces a pending one.
 */
export class LocalMessage {
  /** Stable identity for UIs: the op id of an optimistic send, else the message id. */
  localId: string;
  threadId: string;
  authorId: string;
  /** The text shown (a pending edit's text; empty on tombstones). */
  text: string;
  /** The server's message id (empty while a send is pending). */
  id: string;
  /** Position in the thread (0 while a send is pending). */
  seq: number;
  /** The server copy's version (0 while a send is pending). */
  version: number;
  /** Shown as deleted (a tombstone, or a pending delete). */
  deleted: boolean;
  status: MessageStatus;
  /** For pending sends and failed records: the operation kind. */
  op: OpKind | null;
  /** The op id of the send that created it (own messages of this client). */
  clientOpId: string;
  /** Why the operation failed (failed records only). */
  error: OpError | null;
  /** When the server committed it (or when queued, while pending). */
  createTime: Date | null;
  /** When it was last edited or deleted on the server. */
  updateTime: Date | null;
  /** The server's copy, or null while a send is pending. */
  server: Message | null;

  constructor(init: LocalMessageInit) {
    this.localId = init.localId;
    this.threadId = init.threadId;
    this.authorId = init.authorId;
    this.text = init.text;
    this.id = init.id ?? "";
    this.seq = init.seq ?? 0;
    this.version = init.version ?? 0;
    this.deleted = init.deleted ?? false;
    this.status = init.status ?? MessageStatus.SENT;
    this.op = init.op ?? null;
    this.clientOpId = init.clientOpId ?? "";
    this.error = init.error ?? null;
    this.createTime = init.createTime ?? null;
    this.updateTime = init.updateTime ?? null;
    this.server = init.server ?? null;
  }

  /** True while an operation on this message awaits the server. */
  get pending(): boolean {
    return this.status === MessageStatus.PENDING;
  }

  /** True when the server copy was edited (version above 1 and not deleted). */
  get edited(): boolean {
    return this.version > 1 && !this.deleted;
  }
}

/** A thread as the UI shows it: the server's copy with pending updates laid over it. */
export class ThreadView {
  title = "";
  description = "";
  tags: readonly string[] = [];
  /** Participants (sorted). */
  participantIds: readonly string[] = [];
  archived = false;
  creatorId = "";
  /** Highest message sequence number known (from the thread and its messages). */
  lastSeq = 0;
  /** The server copy's version. */
  version = 0;
  /** The caller's read marker (max of the server's and pending mark-reads). */
  readSeq = 0;
  /** Unread messages by others after `readSeq`. */
  unreadCount = 0;
  /** The newest message known (server copy), if any. */
  lastMessage: Message | null = null;
  createTime: Date | null = null;
  updateTime: Date | null = null;
  /** True while an update or mark-read on it awaits the server. */
  pending = false;
  /** The server's copy of the thread. */
  server: Thread = create(ThreadSchema);
  /** @internal The server's read marker, before pending mark-reads are laid over it. */
  serverReadSeq = 0;
  /** @internal The server's unread count, before pending mark-reads. */
  serverUnread = 0;
  /** @internal The change cursor the marker was last set at (to order equal markers). */
  markerChangeSeq = 0;

  constructor(readonly id: string) {}
}

/** The resource of a ResourceSnapshot (Message, Thread or ReadMarker), or null. */
export type Resource = Message | Thread | ReadMarker;

function snapshotResource(snapshot: ResourceSnapshot | undefined): Resource | null {
  return snapshot?.resource.value ?? null;
}

/** A ResourceSnapshot's oneof case as the proto field name: message, thread or read_marker. */
export function resourceKind(snapshot: ResourceSnapshot | undefined | null): string | null {
  const kind = snapshot?.resource.case;
  if (kind === undefined) return null;
  return kind === "readMarker" ? "read_marker" : kind;
}

/** An operation the server answered with a `Conflict`, for the session's resolver. */
export class ConflictInfo {
  constructor(
    /** The operation (already removed from the pending list). */
    readonly op: PendingOp,
    /** The server's Conflict: base, server and client values and conflicting fields. */
    readonly conflict: Conflict,
  ) {}

  /** `message`, `thread` or `read_marker`. */
  get resource(): string {
    return resourceKind(this.conflict.server) ?? (MESSAGE_OPS.has(this.op.kind) ? "message" : "thread");
  }

  /** Field paths changed on both sides to different values (e.g. `title`, `text`). */
  get fields(): readonly string[] {
    return [...this.conflict.fields];
  }

  /** The server's current version: the base of a resubmitted resolution. */
  get serverVersion(): number {
    return Number(this.conflict.serverVersion);
  }

  /** The resource as of the operation's base version (Message or Thread). */
  get base(): Resource | null {
    return snapshotResource(this.conflict.base);
  }

  /** The resource as the server holds it now (Message or Thread). */
  get server(): Resource | null {
    return snapshotResource(this.conflict.server);
  }

  /** The resource as this client wanted it (Message or Thread). */
  get client(): Resource | null {
    return snapshotResource(this.conflict.client);
  }
}

/** How an operation ended. */
export class OpOutcome {
  constructor(
    readonly op: PendingOp,
    readonly status: OpStatus,
    /** The confirmed resource (confirmed only). */
    readonly resource: ResourceSnapshot | null = null,
    /** The reason (rejected only). */
    readonly error: OpError | null = null,
    /** The conflict (conflict only). */
    readonly conflict: ConflictInfo | null = null,
  ) {}
}

/** One change notification: what a reducer call changed. */
export interface Change {
  readonly kind: ChangeKind;
  /** Threads whose view changed (added, updated or removed). */
  readonly threadIds: ReadonlySet<string>;
  /** Messages added or changed (the live objects). */
  readonly messages: readonly LocalMessage[];
  /** Messages removed from `messages.byThread` (failed, dropped with their thread, or merged). */
  readonly removed: readonly LocalMessage[];
  /** The events that changed state (ignored duplicates are left out). */
  readonly events: readonly Event[];
  /** Operations that ended. */
  readonly outcomes: readonly OpOutcome[];
  /** The new connection state (CONNECTION changes), else null. */
  readonly connection: ConnectionState | null;
}

/** Server state loaded with unary RPCs: threads with read state, recent messages, profile. */
export interface Snapshot {
  /** Every thread of the caller (active and archived) with its read state. */
  readonly summaries: readonly ThreadSummary[];
  /** Recent messages per thread id, oldest first. */
  readonly messages:
    | ReadonlyMap<string, readonly Message[]>
    | Readonly<Record<string, readonly Message[]>>;
  /** The caller's profile and preferences, if loaded. */
  readonly me?: GetMeResponse | null;
}

// -- state containers -----------------------------------------------------------------------------

/** The signed-in user. */
export class UserState {
  /** The user id (from Welcome). */
  id = "";
  /** The profile (from the snapshot's GetMe), if loaded. */
  current: User | null = null;
  /** True while the session is online. */
  online = false;
  /** The user's preferences, if loaded. */
  preferences: UserPreferences | null = null;
}

/** The user's threads. */
export class ThreadsState {
  /** Every visible thread by id. */
  byId = new Map<string, ThreadView>();
  /** Non-archived threads, most recently active first. */
  active: ThreadView[] = [];
  /** Archived threads, most recently active first. */
  archived: ThreadView[] = [];
  /** Total unread messages over active threads. */
  unread = 0;
}

/** Messages. */
export class MessagesState {
  /** Per thread id: messages by `seq`, then pending sends in the order queued. */
  byThread = new Map<string, LocalMessage[]>();
  /** Messages with an operation awaiting the server (same objects as in byThread). */
  pending: LocalMessage[] = [];
  /** Failed sends (removed from byThread) and failed edit/delete records, in order. */
  failed: LocalMessage[] = [];
}

/** UI state. */
export class UiState {
  /** The thread the user has open. */
  activeThread: string | null = null;
  /** Loading flags, e.g. `snapshot` or `history:<thread_id>`. */
  loadingStates = new Map<string, boolean>();
  /** Recent errors to show (at most 50, oldest dropped). */
  errors: UiError[] = [];
  /** Per thread id, the other users typing now. */
  typing = new Map<string, Set<string>>();
  /** Users who share a thread with this user and have a live stream now. */
  online = new Set<string>();
}

/** What the session resumes from. */
export class SyncInfo {
  /** The server epoch the cursor belongs to. */
  epoch = "";
  /** The highest change cursor applied. */
  changeSeq = 0;
  /** True when a snapshot or a successful resume backs the cursor. */
  synced = false;
  /** When the last sync completed (Unix seconds). */
  lastSyncedAt: number | null = null;
  /** The current stream's session id. */
  sessionId = "";
  /** How the last sync completed: true by replay, false by snapshot. */
  recovered: boolean | null = null;
  /** How many times the server required a reload. */
  resyncs = 0;
  /** The server's limits from the last Welcome. */
  limits: Limits | null = null;
}

/** Operations. */
export class OpsState {
  /** Unanswered operations, in submission order (sent in this order). */
  pending: PendingOp[] = [];
  /** Rejected operations by op id, kept for `retry`. */
  failed = new Map<string, PendingOp>();
}

/** Everything a client app shows, plus what it needs to resume. */
export class ClientState {
  user = new UserState();
  threads = new ThreadsState();
  messages = new MessagesState();
  ui = new UiState();
  sync = new SyncInfo();
  ops = new OpsState();
  connection: ConnectionState = ConnectionState.OFFLINE;
}
