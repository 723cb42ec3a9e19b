// The store's state and indexes, lookups, commits, and the views recomputed from overlays.
// A port of threadline_client/state/core.py.

import type { Message } from "../../../../gen/ts/threadline/v1/message_pb.js";
import {
  activity,
  copyMessage,
  Delta,
  dt,
  MAX_UI_ERRORS,
  messageKey,
  opKey,
  defaultStoreClock,
  threadKey,
} from "./common.js";
import type { StoreClock } from "./common.js";
import {
  ClientState,
  LocalMessage,
  MESSAGE_OPS,
  MessageStatus,
  OpKind,
  THREAD_OPS,
  UiError,
} from "./models.js";
import type { Change, ChangeKind, OpError, PendingOp, ThreadView } from "./models.js";
import { Notifier } from "./notify.js";
import type { SubscriberErrorHandler } from "./notify.js";

/** Options of a `ClientStore`. */
export interface StoreOptions {
  /** The signed-in user, if known before the first Welcome (it decides what counts as unread). */
  userId?: string;
  /** The time source (default: wall time and performance.now()); tests pass a fixed clock. */
  clock?: StoreClock;
  /** Called with an exception a subscriber threw (default: console.error). */
  onSubscriberError?: SubscriberErrorHandler;
}

const NO_OPS: readonly PendingOp[] = [];

/** A `ClientState` with its indexes; recomputes messages and threads as server + overlays. */
export class StoreCore extends Notifier {
  /** Everything a client app shows, plus what it needs to resume. Mutated in place. */
  readonly state = new ClientState();
  /** @internal Local id -> message in byThread. */
  protected readonly messagesById = new Map<string, LocalMessage>();
  /** @internal */
  protected readonly byServerId = new Map<string, LocalMessage>();
  /**
   * @internal Server id -> local id for this client's own sends: keeps a message's identity when
   * a reload replaces the state (the snapshot does not carry client_op_ids).
   */
  protected readonly localIds = new Map<string, string>();
  /** @internal */
  protected readonly opsById = new Map<string, PendingOp>();
  /** @internal */
  protected readonly opsByKey = new Map<string, PendingOp[]>();
  /** @internal Thread id -> version at removal: a stale create/update for it is ignored. */
  protected readonly removedThreads = new Map<string, number>();
  /** @internal */
  protected readonly clock: StoreClock;

  constructor(options: StoreOptions = {}) {
    super(options.onSubscriberError);
    this.state.user.id = options.userId ?? "";
    this.clock = options.clock ?? defaultStoreClock;
  }

  /** @internal Unix seconds (Python's time.time()). */
  protected now(): number {
    return this.clock.now();
  }

  /** @internal Monotonic seconds (Python's time.monotonic()). */
  protected monotonic(): number {
    return this.clock.monotonic ? this.clock.monotonic() : this.clock.now();
  }

  // -- commits ----------------------------------------------------------------------------

  /** @internal */
  protected commit(delta: Delta, kind: ChangeKind): Change | null {
    if (delta.threads.size) this.refreshThreads();
    if (delta.empty()) return null;
    const change = delta.change(kind);
    this.notify(change);
    return change;
  }

  /** @internal Commits and notifies even when nothing changed. */
  protected commitAlways(delta: Delta, kind: ChangeKind): Change {
    if (delta.threads.size) this.refreshThreads();
    const change = delta.change(kind);
    this.notify(change);
    return change;
  }

  // -- lookups ----------------------------------------------------------------------------

  /** Returns the message with this local id or server id (in byThread), if any. */
  message(key: string): LocalMessage | undefined {
    return this.messagesById.get(key) ?? this.byServerId.get(key);
  }

  /** Returns a visible thread by id, if any. */
  thread(threadId: string): ThreadView | undefined {
    return this.state.threads.byId.get(threadId);
  }

  /** Returns the pending operation with this id, if any. */
  pendingOp(opId: string): PendingOp | undefined {
    return this.opsById.get(opId);
  }

  /** Returns the oldest pending operation (the next one to send), if any. */
  nextOp(): PendingOp | undefined {
    return this.state.ops.pending[0];
  }

  // -- ui errors --------------------------------------------------------------------------

  /** @internal */
  protected pushError(source: string, error: OpError): void {
    const errors = this.state.ui.errors;
    errors.push(new UiError(source, error, this.now()));
    if (errors.length > MAX_UI_ERRORS) errors.splice(0, errors.length - MAX_UI_ERRORS);
  }

  // -- messages ---------------------------------------------------------------------------

  /** @internal */
  protected countsUnread(view: ThreadView | undefined, m: Message): boolean {
    return (
      view !== undefined &&
      m.authorId !== this.state.user.id &&
      !m.deleted &&
      Number(m.seq) > view.serverReadSeq
    );
  }

  /** @internal */
  protected newMessage(m: Message): LocalMessage {
    const localId = this.localIds.get(m.id) ?? m.id;
    const msg = new LocalMessage({
      localId,
      threadId: m.threadId,
      authorId: m.authorId,
      text: m.text,
      clientOpId: localId !== m.id ? localId : "",
      server: copyMessage(m),
    });
    this.messagesById.set(localId, msg);
    this.byServerId.set(m.id, msg);
    return msg;
  }

  /** @internal */
  protected forgetMessage(msg: LocalMessage): void {
    if (this.messagesById.get(msg.localId) === msg) this.messagesById.delete(msg.localId);
    if (msg.id && this.byServerId.get(msg.id) === msg) this.byServerId.delete(msg.id);
    this.setPending(msg, false);
  }

  /** @internal Puts a confirmed message at its `seq` position, before the pending sends. */
  protected insertSorted(msg: LocalMessage): void {
    const byThread = this.state.messages.byThread;
    let items = byThread.get(msg.threadId);
    if (items === undefined) {
      items = [];
      byThread.set(msg.threadId, items);
    }
    const at = items.indexOf(msg);
    if (at >= 0) items.splice(at, 1);
    let confirmed = items.length;
    while (confirmed && items[confirmed - 1]?.server === null) confirmed -= 1;
    // bisect_right by seq over the confirmed prefix
    let lo = 0;
    let hi = confirmed;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (msg.seq < (items[mid]?.seq ?? 0)) hi = mid;
      else lo = mid + 1;
    }
    items.splice(lo, 0, msg);
  }

  /** @internal */
  protected removeFromThread(msg: LocalMessage): void {
    const byThread = this.state.messages.byThread;
    const items = byThread.get(msg.threadId);
    if (items === undefined) return;
    const at = items.indexOf(msg);
    if (at < 0) return;
    items.splice(at, 1);
    if (!items.length) byThread.delete(msg.threadId);
  }

  /** @internal */
  protected setPending(msg: LocalMessage, pending: boolean): void {
    const items = this.state.messages.pending;
    const at = items.indexOf(msg);
    if (pending && at < 0) items.push(msg);
    else if (!pending && at >= 0) items.splice(at, 1);
  }

  /** @internal Server copy, then each pending operation's overlay in order. */
  protected recomputeMessage(msg: LocalMessage): void {
    const s = msg.server;
    if (s !== null) {
      msg.id = s.id;
      msg.seq = Number(s.seq);
      msg.version = Number(s.version);
      msg.text = s.text;
      msg.deleted = s.deleted;
      msg.authorId = s.authorId;
      msg.createTime = dt(s.createTime);
      msg.updateTime = dt(s.updateTime);
    }
    let pending = false;
    for (const op of this.opsByKey.get(messageKey(msg.localId)) ?? NO_OPS) {
      pending = true;
      if (op.kind === OpKind.EDIT_MESSAGE) {
        msg.text = op.text;
      } else if (op.kind === OpKind.DELETE_MESSAGE) {
        msg.deleted = true;
        msg.text = "";
      }
    }
    if (pending) {
      msg.status = MessageStatus.PENDING;
      msg.error = null;
    } else if (msg.status !== MessageStatus.FAILED) {
      msg.status = MessageStatus.SENT;
    }
    if (msg.server !== null && msg.op === OpKind.SEND_MESSAGE && !pending) msg.op = null;
    this.setPending(msg, pending);
  }

  // -- threads ----------------------------------------------------------------------------

  /** @internal Server copy, then pending updates and mark-reads in order. */
  protected recomputeThread(view: ThreadView): void {
    const s = view.server;
    view.title = s.title;
    view.description = s.description;
    view.tags = [...s.tags];
    view.participantIds = [...s.participantIds].sort();
    view.archived = s.archived;
    view.creatorId = s.creatorId;
    view.version = Number(s.version);
    view.createTime = dt(s.createTime);
    view.updateTime = dt(s.updateTime);
    let readSeq = view.serverReadSeq;
    const ops = this.opsByKey.get(threadKey(view.id)) ?? NO_OPS;
    for (const op of ops) {
      if (op.kind === OpKind.UPDATE_THREAD) {
        const f = op.fields;
        if (f.title !== undefined) view.title = f.title;
        if (f.description !== undefined) view.description = f.description;
        if (f.tags !== undefined) view.tags = [...f.tags];
        if (f.archived !== undefined) view.archived = f.archived;
      } else if (op.kind === OpKind.MARK_READ) {
        readSeq = Math.max(readSeq, op.readSeq);
      }
    }
    view.pending = ops.length > 0;
    view.readSeq = readSeq;
    if (readSeq === view.serverReadSeq) {
      view.unreadCount = view.serverUnread;
    } else if (readSeq >= view.lastSeq) {
      view.unreadCount = 0;
    } else {
      // Optimistic estimate from the messages at hand; the server's count replaces it.
      let count = 0;
      for (const m of this.state.messages.byThread.get(view.id) ?? []) {
        if (m.server !== null && this.countsUnread(view, m.server) && m.seq > readSeq) count += 1;
      }
      view.unreadCount = count;
    }
  }

  /** @internal */
  protected refreshThreads(): void {
    const threads = this.state.threads;
    const keyed = [...threads.byId.values()].map((v) => ({ v, a: activity(v) }));
    keyed.sort((x, y) => y.a - x.a || (x.v.id < y.v.id ? -1 : x.v.id > y.v.id ? 1 : 0));
    const ordered = keyed.map((k) => k.v);
    threads.active = ordered.filter((v) => !v.archived);
    threads.archived = ordered.filter((v) => v.archived);
    threads.unread = threads.active.reduce((sum, v) => sum + v.unreadCount, 0);
  }

  // -- operations -------------------------------------------------------------------------

  /** @internal */
  protected addOp(op: PendingOp): void {
    this.opsById.set(op.opId, op);
    this.state.ops.pending.push(op);
    const key = opKey(op);
    const items = this.opsByKey.get(key);
    if (items === undefined) this.opsByKey.set(key, [op]);
    else items.push(op);
  }

  /** @internal */
  protected removeOp(op: PendingOp): void {
    if (!this.opsById.has(op.opId)) return;
    this.opsById.delete(op.opId);
    const pending = this.state.ops.pending;
    const at = pending.indexOf(op);
    if (at >= 0) pending.splice(at, 1);
    const key = opKey(op);
    const items = this.opsByKey.get(key) ?? [];
    const i = items.indexOf(op);
    if (i >= 0) items.splice(i, 1);
    if (!items.length) this.opsByKey.delete(key);
  }

  /** @internal */
  protected refreshTarget(op: PendingOp, delta: Delta): void {
    if (MESSAGE_OPS.has(op.kind)) {
      const msg = this.messagesById.get(op.localId);
      if (msg !== undefined) {
        this.recomputeMessage(msg);
        delta.touch(msg);
      }
    } else if (THREAD_OPS.has(op.kind)) {
      const view = this.state.threads.byId.get(op.targetId);
      if (view !== undefined) {
        this.recomputeThread(view);
        delta.threads.add(view.id);
      }
    }
  }
}
