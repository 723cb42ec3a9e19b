// Optimistic local operations: queue* overlays, send bookkeeping, defer, fail and retry.
// A port of threadline_client/state/optimistic.py.

import { Delta, InvalidOperationError, newOpId, UnknownItemError } from "./common.js";
import {
  ChangeKind,
  LocalMessage,
  MessageStatus,
  OpKind,
  PendingOp,
  THREAD_UPDATE_FIELDS,
} from "./models.js";
import type { OpError, ThreadFields } from "./models.js";
import { ServerReducer } from "./reducer.js";

/** Options of the queue* methods: the `client_op_id` (fresh when absent or empty). */
export interface QueueOptions {
  opId?: string | null;
}

/** Options of `queueSend`. */
export interface SendOptions extends QueueOptions {
  /** Completed uploads to attach (UploadService.CompleteUpload first). */
  attachmentIds?: readonly string[];
}

/** Options of edits, deletes and thread updates. */
export interface QueueOnVersionOptions extends QueueOptions {
  /** The version the change was made from; the server copy's when absent or null. */
  baseVersion?: number | null;
}

/** Options of `queueCreateThread`. */
export interface CreateThreadOptions extends QueueOptions {
  description?: string;
  tags?: Iterable<string>;
}

/** Queues local operations, shown at once as overlays until the server answers them. */
export class OptimisticOps extends ServerReducer {
  // -- queueing ---------------------------------------------------------------------------

  /**
   * Shows a new message at once as pending and queues its send.
   * Returns the pending message; its `localId` is the op id and never changes.
   */
  queueSend(threadId: string, text: string, options: SendOptions = {}): LocalMessage {
    const opId = options.opId || newOpId();
    const msg = new LocalMessage({
      localId: opId,
      threadId,
      authorId: this.state.user.id,
      text,
      status: MessageStatus.PENDING,
      op: OpKind.SEND_MESSAGE,
      clientOpId: opId,
      createTime: new Date(this.now() * 1000),
    });
    const op = new PendingOp({
      opId,
      kind: OpKind.SEND_MESSAGE,
      threadId,
      localId: opId,
      text,
      attachmentIds: [...(options.attachmentIds ?? [])],
    });
    this.messagesById.set(opId, msg);
    const byThread = this.state.messages.byThread;
    const items = byThread.get(threadId);
    if (items === undefined) byThread.set(threadId, [msg]);
    else items.push(msg);
    this.addOp(op);
    this.setPending(msg, true);
    const delta = new Delta();
    delta.touch(msg);
    this.commit(delta, ChangeKind.LOCAL);
    return msg;
  }

  private confirmedMessage(key: string): LocalMessage & { server: NonNullable<LocalMessage["server"]> } {
    const msg = this.message(key);
    if (msg === undefined) throw new UnknownItemError(`unknown message ${JSON.stringify(key)}`);
    if (msg.server === null) {
      throw new InvalidOperationError("the message is not confirmed yet; edit it once it is sent");
    }
    return msg as LocalMessage & { server: NonNullable<LocalMessage["server"]> };
  }

  /**
   * Shows an edit at once and queues it.
   *
   * @param message The message's local id or server id.
   * @throws UnknownItemError Unknown message.
   * @throws InvalidOperationError The message's send is still pending.
   */
  queueEdit(message: string, text: string, options: QueueOnVersionOptions = {}): PendingOp {
    const msg = this.confirmedMessage(message);
    const op = new PendingOp({
      opId: options.opId || newOpId(),
      kind: OpKind.EDIT_MESSAGE,
      threadId: msg.threadId,
      targetId: msg.id,
      localId: msg.localId,
      text,
      baseVersion: options.baseVersion ?? Number(msg.server.version),
    });
    return this.queueOnTarget(op);
  }

  /** Shows a delete at once (as a tombstone) and queues it. Arguments as `queueEdit`. */
  queueDelete(message: string, options: QueueOnVersionOptions = {}): PendingOp {
    const msg = this.confirmedMessage(message);
    const op = new PendingOp({
      opId: options.opId || newOpId(),
      kind: OpKind.DELETE_MESSAGE,
      threadId: msg.threadId,
      targetId: msg.id,
      localId: msg.localId,
      baseVersion: options.baseVersion ?? Number(msg.server.version),
    });
    return this.queueOnTarget(op);
  }

  /**
   * Shows new thread fields at once and queues the update.
   *
   * @param fields New values of `title`, `description`, `tags` and/or `archived`.
   * @throws UnknownItemError Unknown thread.
   * @throws InvalidOperationError No fields, or a field that cannot be updated.
   */
  queueThreadUpdate(
    threadId: string,
    fields: ThreadFields,
    options: QueueOnVersionOptions = {},
  ): PendingOp {
    const view = this.state.threads.byId.get(threadId);
    if (view === undefined) throw new UnknownItemError(`unknown thread ${JSON.stringify(threadId)}`);
    const names = Object.keys(fields).filter(
      (k) => (fields as Record<string, unknown>)[k] !== undefined,
    );
    if (!names.length || names.some((k) => !THREAD_UPDATE_FIELDS.has(k))) {
      throw new InvalidOperationError(
        `thread fields must be some of ${JSON.stringify([...THREAD_UPDATE_FIELDS].sort())}`,
      );
    }
    const values: ThreadFields = {};
    if (fields.title !== undefined) values.title = fields.title;
    if (fields.description !== undefined) values.description = fields.description;
    if (fields.tags !== undefined) values.tags = Object.freeze([...fields.tags]);
    if (fields.archived !== undefined) values.archived = fields.archived;
    const op = new PendingOp({
      opId: options.opId || newOpId(),
      kind: OpKind.UPDATE_THREAD,
      threadId,
      targetId: threadId,
      fields: values,
      baseVersion: options.baseVersion ?? Number(view.server.version),
    });
    return this.queueOnTarget(op);
  }

  /**
   * Moves the read marker forward at once and queues it; null if it would not move.
   * @throws UnknownItemError Unknown thread.
   */
  queueMarkRead(threadId: string, readSeq: number, options: QueueOptions = {}): PendingOp | null {
    const view = this.state.threads.byId.get(threadId);
    if (view === undefined) throw new UnknownItemError(`unknown thread ${JSON.stringify(threadId)}`);
    if (readSeq <= view.readSeq) return null; // markers only move forward: nothing to send
    const op = new PendingOp({
      opId: options.opId || newOpId(),
      kind: OpKind.MARK_READ,
      threadId,
      targetId: threadId,
      readSeq,
    });
    return this.queueOnTarget(op);
  }

  /** Queues a thread creation (not shown until the server confirms it). */
  queueCreateThread(
    title: string,
    participantIds: Iterable<string> = [],
    options: CreateThreadOptions = {},
  ): PendingOp {
    const op = new PendingOp({
      opId: options.opId || newOpId(),
      kind: OpKind.CREATE_THREAD,
      threadId: "",
      fields: {
        title,
        description: options.description ?? "",
        tags: Object.freeze([...(options.tags ?? [])]),
      },
      participantIds: Object.freeze([...participantIds]),
    });
    this.addOp(op);
    this.commitAlways(new Delta(), ChangeKind.LOCAL);
    return op;
  }

  private queueOnTarget(op: PendingOp): PendingOp {
    this.addOp(op);
    const delta = new Delta();
    this.refreshTarget(op, delta);
    this.commitAlways(delta, ChangeKind.LOCAL);
    return op;
  }

  // -- sending, failure and retry ---------------------------------------------------------

  /** Records that an operation is being sent (its outcome is unknown until answered). */
  markSent(opId: string): void {
    const op = this.opsById.get(opId);
    if (op !== undefined) {
      op.sent = true;
      op.attempts += 1;
    }
  }

  /** Keeps a pending operation after a retryable rejection; resend after `delay` seconds. */
  defer(opId: string, delay: number, error: OpError): void {
    const op = this.opsById.get(opId);
    if (op === undefined) return;
    op.notBefore = this.monotonic() + delay;
    op.error = error;
    this.commitAlways(new Delta(), ChangeKind.RESULT);
  }

  /** Fails a pending operation locally (e.g. retries exhausted), as if rejected. */
  fail(opId: string, error: OpError): void {
    const op = this.opsById.get(opId);
    if (op === undefined) return;
    const delta = new Delta();
    this.reject(op, error, delta);
    this.commit(delta, ChangeKind.RESULT);
  }

  /**
   * Queues a failed operation again with its original `client_op_id`.
   *
   * @param localId The failed message's `localId` (which is the op id), or any failed op id.
   * @throws UnknownItemError No failed operation has this id.
   */
  retry(localId: string): PendingOp {
    const failed = this.state.ops.failed;
    const op = failed.get(localId);
    if (op === undefined) throw new UnknownItemError(`no failed operation ${JSON.stringify(localId)}`);
    failed.delete(localId);
    op.error = null;
    op.attempts = 0;
    op.notBefore = 0;
    const delta = new Delta();
    const records = this.state.messages.failed.filter((m) => m.localId === localId);
    for (const record of records) {
      this.state.messages.failed.splice(this.state.messages.failed.indexOf(record), 1);
      delta.drop(record);
    }
    this.addOp(op);
    if (op.kind === OpKind.SEND_MESSAGE) {
      // The failed message itself goes back (same object, same local id) as pending.
      const msg =
        records[0] ??
        new LocalMessage({
          localId: op.localId,
          threadId: op.threadId,
          authorId: this.state.user.id,
          text: op.text,
          clientOpId: op.opId,
        });
      msg.op = OpKind.SEND_MESSAGE;
      msg.status = MessageStatus.PENDING;
      msg.error = null;
      this.messagesById.set(op.localId, msg);
      const byThread = this.state.messages.byThread;
      const items = byThread.get(op.threadId);
      if (items === undefined) byThread.set(op.threadId, [msg]);
      else items.push(msg);
      this.recomputeMessage(msg);
      delta.touch(msg);
    } else {
      this.refreshTarget(op, delta);
    }
    this.commitAlways(delta, ChangeKind.LOCAL);
    return op;
  }

  /** Forgets a failed operation and its failed record (the user gave up on it). */
  dismissFailed(localId: string): void {
    this.state.ops.failed.delete(localId);
    const delta = new Delta();
    for (const record of this.state.messages.failed.filter((m) => m.localId === localId)) {
      this.state.messages.failed.splice(this.state.messages.failed.indexOf(record), 1);
      delta.drop(record);
    }
    this.commitAlways(delta, ChangeKind.LOCAL);
  }
}
