// The reducer for server data: welcome and sync, snapshots, history, events and op results.
// A port of threadline_client/state/reducer.py.

import { create } from "@bufbuild/protobuf";
import { ResourceSnapshotSchema } from "../../../../gen/ts/threadline/v1/errors_pb.js";
import type { ResourceSnapshot } from "../../../../gen/ts/threadline/v1/errors_pb.js";
import type { Message } from "../../../../gen/ts/threadline/v1/message_pb.js";
import { EventKind, SyncStateSchema } from "../../../../gen/ts/threadline/v1/realtime_pb.js";
import type {
  Event,
  OperationResult,
  ResyncRequired,
  SyncComplete,
  SyncState,
  Welcome,
} from "../../../../gen/ts/threadline/v1/realtime_pb.js";
import { ThreadSchema } from "../../../../gen/ts/threadline/v1/thread_pb.js";
import type { ReadMarker, Thread, ThreadSummary } from "../../../../gen/ts/threadline/v1/thread_pb.js";
import { UserPreferencesSchema, UserSchema } from "../../../../gen/ts/threadline/v1/user_pb.js";
import {
  copyMessage,
  copyThread,
  Delta,
  eventMarker,
  eventMessage,
  eventPresence,
  eventThread,
  eventTyping,
  messageSnapshot,
  opKey,
  snapshotMessages,
  threadSnapshot,
  timestampFromSeconds,
} from "./common.js";
import { StoreCore } from "./core.js";
import {
  ChangeKind,
  ConflictInfo,
  LocalMessage,
  MESSAGE_OPS,
  MessageStatus,
  OpError,
  OpKind,
  OpOutcome,
  OpStatus,
  ThreadView,
} from "./models.js";
import type { Change, PendingOp, Snapshot } from "./models.js";

/** Applies what the server sends, by the version rule, to the state. */
export class ServerReducer extends StoreCore {
  // -- sync -------------------------------------------------------------------------------

  /** The SyncState to resume with: epoch, cursor, per-thread seqs, unanswered op ids. */
  syncState(): SyncState {
    const sync = this.state.sync;
    const out = create(SyncStateSchema, { epoch: sync.epoch, changeSeq: BigInt(sync.changeSeq) });
    for (const [tid, view] of this.state.threads.byId) {
      if (view.lastSeq) out.threadSeqs[tid] = BigInt(view.lastSeq);
    }
    if (sync.lastSyncedAt !== null) out.lastSyncedAt = timestampFromSeconds(sync.lastSyncedAt);
    out.pendingOpIds = this.state.ops.pending.filter((op) => op.sent).map((op) => op.opId);
    return out;
  }

  /** `syncState()` when the cursor is backed by a completed sync, else null (start fresh). */
  resumeState(): SyncState | null {
    return this.state.sync.synced ? this.syncState() : null;
  }

  /** Records the session id, user id and limits of a new stream. */
  applyWelcome(welcome: Welcome): void {
    const sync = this.state.sync;
    sync.sessionId = welcome.sessionId;
    if (welcome.limits !== undefined) sync.limits = welcome.limits;
    const delta = new Delta();
    // Presence arrives afresh on every stream (a snapshot after SyncComplete): whoever went
    // offline while this client was disconnected must not stay online here.
    this.state.ui.online.clear();
    if (welcome.userId) {
      this.state.user.id = welcome.userId;
      for (const msg of this.state.messages.pending) {
        if (!msg.authorId) {
          // queued before the first Welcome named the user
          msg.authorId = welcome.userId;
          delta.touch(msg);
        }
      }
    }
    this.commitAlways(delta, ChangeKind.UI);
  }

  /** Records a successful resume: the cursor is where the server says the client is. */
  applySyncComplete(complete: SyncComplete): void {
    const sync = this.state.sync;
    if (complete.epoch) sync.epoch = complete.epoch;
    sync.changeSeq = Math.max(sync.changeSeq, Number(complete.changeSeq));
    sync.synced = true;
    sync.recovered = true;
    sync.lastSyncedAt = this.now();
    this.commitAlways(new Delta(), ChangeKind.UI);
  }

  /**
   * The server cannot resume this client: the next sync must reload a snapshot. Local state is
   * kept until the snapshot replaces it, so the UI does not go blank.
   */
  noteResync(_required: ResyncRequired): void {
    this.state.sync.synced = false;
    this.state.sync.resyncs += 1;
    this.commitAlways(new Delta(), ChangeKind.UI);
  }

  /** Forgets that the cursor is usable: the next connection starts fresh (no notification). */
  invalidateSync(): void {
    this.state.sync.synced = false;
  }

  // -- snapshot ---------------------------------------------------------------------------

  /**
   * Replaces the server state with a snapshot taken at or after cursor `changeSeq`.
   *
   * Threads missing from the snapshot are dropped; messages of a thread are replaced by the
   * snapshot's (the same objects are reused for messages still present, so identities hold);
   * pending operations stay and keep their overlays. Sets the cursor to `changeSeq`
   * (SyncComplete.change_seq; a bigint is accepted as it comes from the proto).
   */
  applySnapshot(snapshot: Snapshot, cursor: { epoch: string; changeSeq: number | bigint }): Change {
    const epoch = cursor.epoch;
    const changeSeq = Number(cursor.changeSeq);
    const delta = new Delta();
    const state = this.state;
    const me = snapshot.me;
    if (me !== undefined && me !== null) {
      // As Python reads an unset message field: an empty message, not None.
      state.user.current = me.user ?? create(UserSchema);
      state.user.preferences = me.preferences ?? create(UserPreferencesSchema);
      if (me.user?.id) state.user.id = me.user.id;
    }
    const present = new Set(snapshot.summaries.map((s) => s.thread?.id ?? ""));
    for (const tid of [...state.threads.byId.keys()].filter((t) => !present.has(t))) {
      this.dropThread(tid, delta);
    }
    for (const summary of snapshot.summaries) {
      const t = summary.thread ?? create(ThreadSchema);
      let view = state.threads.byId.get(t.id);
      if (view === undefined) {
        view = new ThreadView(t.id);
        state.threads.byId.set(t.id, view);
      }
      this.removedThreads.delete(t.id);
      view.server = copyThread(t);
      view.serverReadSeq = Number(summary.readSeq);
      view.serverUnread = Number(summary.unreadCount);
      view.markerChangeSeq = changeSeq;
      view.lastSeq = Number(t.lastSeq);
      view.lastMessage = summary.lastMessage !== undefined ? copyMessage(summary.lastMessage) : null;
      this.replaceMessages(t.id, snapshotMessages(snapshot, t.id), delta);
      this.recomputeThread(view);
      delta.threads.add(t.id);
    }
    const sync = state.sync;
    sync.epoch = epoch;
    sync.changeSeq = changeSeq;
    sync.synced = true;
    sync.recovered = false;
    sync.lastSyncedAt = this.now();
    return this.commitAlways(delta, ChangeKind.SNAPSHOT);
  }

  /** Merges older messages of a thread (e.g. a page loaded on scroll), by the version rule. */
  applyHistory(_threadId: string, messages: Iterable<Message>): void {
    const delta = new Delta();
    for (const m of messages) this.upsertMessage(m, delta, false);
    this.commit(delta, ChangeKind.SNAPSHOT);
  }

  /**
   * Fills in a thread the user was just added to: a THREAD_CREATED event carries only the
   * thread, so its read state, unread count, newest message and recent history are fetched
   * afterwards (see the session) and merged here by the version rule.
   */
  applyJoined(summary: ThreadSummary, messages: Iterable<Message>): void {
    const t = summary.thread ?? create(ThreadSchema);
    const view = this.state.threads.byId.get(t.id);
    if (view === undefined) return; // removed again before the fetch came back
    const delta = new Delta();
    if (view.server.version <= t.version) view.server = copyThread(t);
    const newest = summary.lastMessage;
    const current = view.lastMessage;
    if (
      newest !== undefined &&
      (current === null ||
        newest.seq > current.seq ||
        (newest.seq === current.seq && newest.version > current.version))
    ) {
      // A live edit may already have given us a newer version of the same message.
      view.lastMessage = copyMessage(newest);
    }
    for (const m of messages) this.upsertMessage(m, delta, false);
    const lastSeq = Number(t.lastSeq);
    const readSeq = Number(summary.readSeq);
    view.lastSeq = Math.max(view.lastSeq, lastSeq);
    if (view.serverReadSeq <= readSeq) {
      view.serverReadSeq = readSeq;
      const held: Message[] = [];
      for (const local of this.state.messages.byThread.get(t.id) ?? []) {
        if (local.server !== null) held.push(local.server);
      }
      const seqs = new Set(held.map((m) => Number(m.seq)));
      let all = true;
      for (let seq = readSeq + 1; seq <= lastSeq; seq += 1) {
        if (!seqs.has(seq)) {
          all = false;
          break;
        }
      }
      if (all) {
        // Every message after the marker is here, as it is now (deleted ones as tombstones):
        // count them directly. The summary and the page come from two reads, so a delete
        // between them would otherwise be counted once too often.
        view.serverUnread = held.filter((m) => this.countsUnread(view, m)).length;
      } else {
        // Only part of the unread range was loaded: the summary counted what existed up to its
        // last_seq; later messages are here (from live events, or from the page, whose events
        // are then dropped as duplicates) and count on top of it.
        view.serverUnread =
          Number(summary.unreadCount) +
          held.filter((m) => Number(m.seq) > lastSeq && this.countsUnread(view, m)).length;
      }
    }
    this.recomputeThread(view);
    delta.threads.add(t.id);
    this.commit(delta, ChangeKind.SNAPSHOT);
  }

  private replaceMessages(threadId: string, messages: readonly Message[], delta: Delta): void {
    const byThread = this.state.messages.byThread;
    const old = byThread.get(threadId) ?? [];
    const keepIds = new Set(messages.map((m) => m.id));
    const pendingSends = old.filter((m) => m.server === null);
    for (const gone of old) {
      if (gone.server !== null && !keepIds.has(gone.id)) {
        this.forgetMessage(gone);
        delta.drop(gone);
      }
    }
    const fresh: LocalMessage[] = [];
    const sorted = [...messages].sort((a, b) => (a.seq < b.seq ? -1 : a.seq > b.seq ? 1 : 0));
    for (const m of sorted) {
      let msg = this.byServerId.get(m.id);
      if (msg === undefined) msg = this.newMessage(m);
      else msg.server = copyMessage(m);
      this.recomputeMessage(msg);
      fresh.push(msg);
      delta.touch(msg);
    }
    byThread.set(threadId, [...fresh, ...pendingSends]);
    if (!fresh.length && !pendingSends.length) byThread.delete(threadId);
    const view = this.state.threads.byId.get(threadId);
    const last = fresh[fresh.length - 1];
    if (view !== undefined && last !== undefined) view.lastSeq = Math.max(view.lastSeq, last.seq);
  }

  // -- events -----------------------------------------------------------------------------

  /** Applies one EventBatch's events in order; duplicates and stale versions are ignored. */
  applyEvents(events: Iterable<Event>, _options: { replay?: boolean } = {}): Change | null {
    const delta = new Delta();
    const sync = this.state.sync;
    for (const event of events) {
      const seq = Number(event.changeSeq);
      if (seq && seq <= sync.changeSeq && sync.synced) continue; // already applied
      if (this.applyEvent(event, delta)) delta.events.push(event);
      if (seq) sync.changeSeq = Math.max(sync.changeSeq, seq);
    }
    return this.commit(delta, ChangeKind.EVENTS);
  }

  private applyEvent(event: Event, delta: Delta): boolean {
    switch (event.kind) {
      case EventKind.MESSAGE_CREATED:
      case EventKind.MESSAGE_UPDATED:
      case EventKind.MESSAGE_DELETED:
        return this.applyMessageEvent(event, delta);
      case EventKind.THREAD_CREATED:
      case EventKind.THREAD_UPDATED: {
        const thread = eventThread(event);
        let changed = this.upsertThread(thread, delta);
        const op = event.clientOpId ? this.opsById.get(event.clientOpId) : undefined;
        if (op !== undefined && (op.kind === OpKind.UPDATE_THREAD || op.kind === OpKind.CREATE_THREAD)) {
          this.confirm(op, threadSnapshot(thread), delta);
          changed = true;
        }
        return changed;
      }
      case EventKind.THREAD_REMOVED: {
        const tid = eventThread(event).id || event.threadId;
        const view = this.state.threads.byId.get(tid);
        const version = Number(event.version);
        if (view !== undefined && version && Number(view.server.version) > version) {
          return false; // removed, then added again later: the view is newer
        }
        this.removedThreads.set(tid, version);
        return this.dropThread(tid, delta);
      }
      case EventKind.READ_MARKER_UPDATED:
        return this.mergeMarker(eventMarker(event), Number(event.changeSeq), delta);
      case EventKind.TYPING: {
        const typing = eventTyping(event);
        const tid = typing.threadId || event.threadId;
        let users = this.state.ui.typing.get(tid);
        if (users === undefined) {
          users = new Set();
          this.state.ui.typing.set(tid, users);
        }
        if (typing.active) users.add(typing.userId);
        else users.delete(typing.userId);
        delta.threads.add(tid);
        return true;
      }
      case EventKind.PRESENCE: {
        const presence = eventPresence(event);
        if (presence.online) this.state.ui.online.add(presence.userId);
        else this.state.ui.online.delete(presence.userId);
        return true;
      }
      default:
        return false;
    }
  }

  private applyMessageEvent(event: Event, delta: Delta): boolean {
    const m = eventMessage(event);
    const op = event.clientOpId ? this.opsById.get(event.clientOpId) : undefined;
    if (op !== undefined && op.kind === OpKind.SEND_MESSAGE) {
      this.bindSend(op, m, delta);
      this.confirm(op, messageSnapshot(m), delta);
      return true;
    }
    let changed = this.upsertMessage(m, delta, true);
    if (op !== undefined && MESSAGE_OPS.has(op.kind)) {
      this.confirm(op, messageSnapshot(m), delta);
      changed = true;
    }
    return changed;
  }

  // -- messages ---------------------------------------------------------------------------

  /** Applies a server copy of a message by the version rule; true if anything changed. */
  private upsertMessage(m: Message, delta: Delta, countUnread: boolean): boolean {
    const view = this.state.threads.byId.get(m.threadId);
    let msg = this.byServerId.get(m.id);
    if (msg !== undefined && msg.server !== null) {
      if (m.version <= msg.server.version) return false;
      const wasUnread = this.countsUnread(view, msg.server);
      msg.server = copyMessage(m);
      if (view !== undefined && wasUnread && !this.countsUnread(view, m)) {
        view.serverUnread = Math.max(0, view.serverUnread - 1);
      }
      this.recomputeMessage(msg);
    } else {
      if (view === undefined && this.removedThreads.has(m.threadId)) {
        return false; // a late event of a thread the user can no longer see
      }
      msg = this.newMessage(m);
      this.recomputeMessage(msg);
      this.insertSorted(msg);
      if (countUnread && this.countsUnread(view, m) && view !== undefined) view.serverUnread += 1;
    }
    delta.touch(msg);
    this.noteThreadMessage(m, delta);
    return true;
  }

  private noteThreadMessage(m: Message, delta: Delta): void {
    const view = this.state.threads.byId.get(m.threadId);
    if (view === undefined) return;
    view.lastSeq = Math.max(view.lastSeq, Number(m.seq));
    const last = view.lastMessage;
    if (last === null || m.seq > last.seq || (m.seq === last.seq && m.version > last.version)) {
      view.lastMessage = copyMessage(m);
    }
    this.recomputeThread(view);
    delta.threads.add(view.id);
  }

  /** Makes the pending message of a send the server's message, in place. */
  private bindSend(op: PendingOp, m: Message, delta: Delta): LocalMessage {
    let msg = this.messagesById.get(op.localId);
    if (msg === undefined) {
      // Unknown locally (e.g. its thread was dropped meanwhile): show the server's copy.
      msg = new LocalMessage({
        localId: op.localId,
        threadId: m.threadId,
        authorId: m.authorId,
        text: m.text,
        clientOpId: op.opId,
      });
      this.messagesById.set(op.localId, msg);
    }
    const other = this.byServerId.get(m.id);
    if (other !== undefined && other !== msg) {
      // A reload showed this message before the send's outcome was known; keep the identity
      // the user saw first (the pending one) and drop the other.
      if (other.server !== null && other.server.version > m.version) m = other.server;
      this.removeFromThread(other);
      this.forgetMessage(other);
      delta.drop(other);
    }
    if (msg.server === null || m.version > msg.server.version) msg.server = copyMessage(m);
    this.byServerId.set(m.id, msg);
    this.localIds.set(m.id, msg.localId);
    this.recomputeMessage(msg); // takes the server's seq before it is placed by seq
    this.insertSorted(msg);
    delta.touch(msg);
    this.noteThreadMessage(m, delta);
    return msg;
  }

  // -- threads ----------------------------------------------------------------------------

  /** Applies a server copy of a thread by the version rule; true if anything changed. */
  private upsertThread(t: Thread, delta: Delta): boolean {
    const byId = this.state.threads.byId;
    let view = byId.get(t.id);
    const lastSeq = Number(t.lastSeq);
    if (view !== undefined) {
      if (t.version <= view.server.version) {
        if (lastSeq > view.lastSeq) {
          view.lastSeq = lastSeq;
          delta.threads.add(t.id);
          return true;
        }
        return false;
      }
    } else {
      const removedAt = this.removedThreads.get(t.id);
      if (removedAt !== undefined && Number(t.version) <= removedAt) return false;
      view = new ThreadView(t.id);
      byId.set(t.id, view);
      this.removedThreads.delete(t.id);
    }
    view.server = copyThread(t);
    view.lastSeq = Math.max(view.lastSeq, lastSeq);
    this.recomputeThread(view);
    delta.threads.add(t.id);
    return true;
  }

  /** @internal */
  protected dropThread(threadId: string, delta: Delta): boolean {
    const state = this.state;
    const view = state.threads.byId.get(threadId);
    state.threads.byId.delete(threadId);
    state.ui.typing.delete(threadId);
    const items = state.messages.byThread.get(threadId) ?? [];
    for (const msg of items.filter((m) => m.server !== null)) {
      // Pending sends stay (the server will answer them); confirmed messages go.
      items.splice(items.indexOf(msg), 1);
      this.forgetMessage(msg);
      delta.drop(msg);
    }
    if (!items.length) state.messages.byThread.delete(threadId);
    if (state.ui.activeThread === threadId) state.ui.activeThread = null;
    if (view === undefined) return false;
    delta.threads.add(threadId);
    return true;
  }

  /** Read markers only move forward; the unread count comes with the newest marker. */
  private mergeMarker(marker: ReadMarker, changeSeq: number, delta: Delta): boolean {
    const view = this.state.threads.byId.get(marker.threadId);
    if (view === undefined) return false;
    const readSeq = Number(marker.readSeq);
    const newer =
      readSeq > view.serverReadSeq ||
      (readSeq === view.serverReadSeq && changeSeq > view.markerChangeSeq);
    if (!newer) return false;
    view.serverReadSeq = readSeq;
    view.serverUnread = Number(marker.unreadCount);
    view.markerChangeSeq = Math.max(view.markerChangeSeq, changeSeq);
    this.recomputeThread(view);
    delta.threads.add(view.id);
    return true;
  }

  // -- results ----------------------------------------------------------------------------

  /**
   * Applies an operation's outcome.
   *
   * Confirmed: the pending item becomes the server's version in place. Rejected: the overlay is
   * removed and the op lands in `ops.failed` (and `messages.failed` for message ops) with the
   * server's reason. Conflict: the overlay is removed, the server's value applied, and the
   * outcome (with a `ConflictInfo`) reported for the resolver. A result for an op that is no
   * longer pending (a duplicate) only applies its resource by the version rule.
   */
  applyResult(result: OperationResult): Change | null {
    const delta = new Delta();
    const op = this.opsById.get(result.clientOpId);
    const outcome = result.outcome;
    if (outcome.case === "confirmed") {
      const snapshot = outcome.value;
      if (op !== undefined && op.kind === OpKind.SEND_MESSAGE && snapshot.resource.case === "message") {
        this.bindSend(op, snapshot.resource.value, delta);
      } else {
        this.applyResource(snapshot, Number(result.changeSeq), delta);
      }
      if (op !== undefined) this.confirm(op, snapshot, delta);
    } else if (outcome.case === "rejected" && op !== undefined) {
      this.reject(op, OpError.fromStatus(outcome.value), delta);
    } else if (outcome.case === "conflict" && op !== undefined) {
      const conflict = outcome.value;
      this.applyResource(conflict.server ?? create(ResourceSnapshotSchema), 0, delta);
      this.removeOp(op);
      this.refreshTarget(op, delta);
      delta.outcomes.push(
        new OpOutcome(op, OpStatus.CONFLICT, null, null, new ConflictInfo(op, conflict)),
      );
    }
    return this.commit(delta, ChangeKind.RESULT);
  }

  private applyResource(snapshot: ResourceSnapshot, changeSeq: number, delta: Delta): void {
    const r = snapshot.resource;
    if (r.case === "message") this.upsertMessage(r.value, delta, true);
    else if (r.case === "thread") this.upsertThread(r.value, delta);
    else if (r.case === "readMarker") this.mergeMarker(r.value, changeSeq, delta);
  }

  private confirm(op: PendingOp, snapshot: ResourceSnapshot, delta: Delta): void {
    if (!this.opsById.has(op.opId)) return;
    this.removeOp(op);
    const r = snapshot.resource;
    const version = r.case === "message" || r.case === "thread" ? Number(r.value.version) : 0;
    if (
      version &&
      (op.kind === OpKind.EDIT_MESSAGE ||
        op.kind === OpKind.DELETE_MESSAGE ||
        op.kind === OpKind.UPDATE_THREAD)
    ) {
      // Later edits of the same resource were made on top of this one (its overlay was
      // showing), so their real base is the version this one produced.
      for (const later of this.opsByKey.get(opKey(op)) ?? []) {
        if (later.baseVersion === op.baseVersion && later.kind !== OpKind.MARK_READ) {
          later.baseVersion = version;
        }
      }
    }
    this.refreshTarget(op, delta);
    delta.outcomes.push(new OpOutcome(op, OpStatus.CONFIRMED, snapshot));
  }

  /** @internal */
  protected reject(op: PendingOp, error: OpError, delta: Delta): void {
    this.removeOp(op);
    op.error = error;
    this.state.ops.failed.set(op.opId, op);
    this.pushError(`op:${op.opId}`, error);
    if (op.kind === OpKind.SEND_MESSAGE) {
      const msg = this.messagesById.get(op.localId);
      this.messagesById.delete(op.localId);
      if (msg !== undefined) {
        this.removeFromThread(msg);
        this.setPending(msg, false);
        msg.status = MessageStatus.FAILED;
        msg.error = error;
        this.state.messages.failed.push(msg);
        delta.drop(msg);
      }
    } else if (op.kind === OpKind.EDIT_MESSAGE || op.kind === OpKind.DELETE_MESSAGE) {
      const target = this.messagesById.get(op.localId);
      this.refreshTarget(op, delta);
      this.state.messages.failed.push(
        new LocalMessage({
          localId: op.opId,
          threadId: op.threadId,
          authorId: target?.authorId ?? "",
          text: op.text,
          id: op.targetId,
          seq: target?.seq ?? 0,
          version: op.baseVersion,
          deleted: op.kind === OpKind.DELETE_MESSAGE,
          status: MessageStatus.FAILED,
          op: op.kind,
          clientOpId: op.opId,
          error,
        }),
      );
    } else {
      this.refreshTarget(op, delta);
    }
    delta.outcomes.push(new OpOutcome(op, OpStatus.REJECTED, null, error));
  }
}
