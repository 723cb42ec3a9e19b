/**
 * `ThreadlineSession`: a long-lived, self-healing realtime session that keeps a `ClientStore`
 * in sync — the TypeScript twin of the Python SDK's `ThreadlineSession`, with the same rules:
 *
 * - Connecting: a fresh session (no usable cursor) opens without a sync state and loads a
 *   snapshot with unary RPCs once SyncComplete names the cursor it covers; live events arriving
 *   meanwhile wait and are applied on top (the version rule makes the overlap harmless). A
 *   session with a cursor resumes: the server replays what was missed. ResyncRequired, or a
 *   resume the server could not honour, reloads the snapshot instead.
 * - Reconnecting: when the stream ends (server or edge restart, idle, slow consumer, network),
 *   wait a capped exponential backoff with full jitter (honouring the server's retry_after) and
 *   resume from the cursor. An UNAUTHENTICATED end forces a fresh token first.
 * - Operations change the store at once (optimistic) and are sent one at a time, in order, with
 *   their original `client_op_id`s once online; one whose outcome is unknown is sent again with
 *   the same id after reconnecting, and the server applies it once. Retryable rejections wait
 *   the server's delay.
 * - Conflicts: `resolver(conflict)` decides; the default keeps the server's value. Returning
 *   field values resubmits them as a new UPDATE based on the server's version.
 */
import { create } from "@bufbuild/protobuf";
import type { Message } from "../../../gen/ts/threadline/v1/message_pb.js";
import type { Event, ServerFrame, SyncComplete, Welcome } from "../../../gen/ts/threadline/v1/realtime_pb.js";
import { EventKind, ResyncReason } from "../../../gen/ts/threadline/v1/realtime_pb.js";
import {
  ListMessagesRequest_Direction,
  ListThreadsRequestSchema,
  ThreadFilter,
} from "../../../gen/ts/threadline/v1/thread_service_pb.js";
import type { ThreadSummary } from "../../../gen/ts/threadline/v1/thread_pb.js";
import { Backoff } from "./backoff.js";
import type { ThreadlineClient } from "./client.js";
import { isRetryable, makeError, ThreadlineError, type CodeName } from "./errors.js";
import {
  ClientStore,
  OpError,
  type Change,
  type ClientState,
  type ConflictInfo,
  type ConnectionState,
  type OpOutcome,
  type PendingOp,
  type Snapshot,
  type ThreadView,
} from "./state/index.js";
import { RealtimeStream } from "./stream.js";

/** Messages loaded per thread in a snapshot (the newest ones). */
export const DEFAULT_HISTORY = 50;

export type Resolution = Record<string, unknown> | null | undefined;
/** Decides a conflict: null keeps the server's value; field values are resubmitted. */
export type Resolver = (conflict: ConflictInfo) => Resolution | Promise<Resolution>;

/** The default resolver: keep the server's value (the store already shows it). */
export const acceptServer: Resolver = () => null;

// Stream ends that retrying the same way cannot fix: after a few in a row, go offline.
const NON_TRANSIENT: ReadonlySet<CodeName> = new Set([
  "UNAUTHENTICATED",
  "PERMISSION_DENIED",
  "INVALID_ARGUMENT",
  "FAILED_PRECONDITION",
  "UNIMPLEMENTED",
]);
// Closed for a newer stream of the same user: reconnecting would evict that one in turn.
const FINAL_REASONS: ReadonlySet<string> = new Set(["REPLACED"]);
const MAX_OUTCOMES = 1024;

export interface SessionOptions {
  store?: ClientStore;
  resolver?: Resolver;
  /** Reconnect and retry delays (default 0.5 s growing to 30 s, full jitter). */
  backoff?: Backoff;
  history?: number;
  /** Seconds online after which a later disconnect starts backoff afresh. */
  stableAfter?: number;
  /** Sends of an operation answered with retryable rejections before it fails. */
  maxOpAttempts?: number;
  /** Consecutive non-transient stream failures before going offline. */
  maxFinalFailures?: number;
  clientName?: string;
}

/** Loads the caller's threads (active and archived) and their recent messages. */
export async function loadSnapshot(client: ThreadlineClient, history = DEFAULT_HISTORY): Promise<Snapshot> {
  const summaries: ThreadSummary[] = [];
  let pageToken = "";
  do {
    const page = await client.threads.listThreads(
      create(ListThreadsRequestSchema, { filter: ThreadFilter.ALL, pageSize: 200, pageToken }),
    );
    summaries.push(...page.threads);
    pageToken = page.nextPageToken;
  } while (pageToken);
  const messages: Record<string, Message[]> = {};
  if (history > 0) {
    const withMessages = summaries.filter((s) => s.thread && s.thread.lastSeq > 0n);
    // Four at a time: enough to hide latency without a burst of hundreds of calls.
    for (let i = 0; i < withMessages.length; i += 4) {
      await Promise.all(
        withMessages.slice(i, i + 4).map(async (s) => {
          const id = s.thread?.id ?? "";
          const page = await client.threads.listMessages({
            threadId: id,
            direction: ListMessagesRequest_Direction.BACKWARD,
            pageSize: history,
          });
          messages[id] = [...page.messages].sort((a, b) => Number(a.seq - b.seq));
        }),
      );
    }
  }
  const me = await client.users.getMe({});
  return { summaries, messages, me };
}

interface StreamEnd {
  error: ThreadlineError | null;
  retryAfter: number | null;
  onlineFor: number;
}

export class ThreadlineSession {
  readonly store: ClientStore;
  resolver: Resolver;
  readonly backoff: Backoff;
  readonly history: number;
  /** Why the stream last ended (null after a clean end). */
  lastError: ThreadlineError | null = null;
  private readonly stableAfter: number;
  private readonly maxOpAttempts: number;
  private readonly maxFinalFailures: number;
  private readonly clientName: string;
  private running: Promise<void> | null = null;
  private stopping = false;
  private current: RealtimeStream | null = null;
  private wakeOps: (() => void) | null = null;
  private wakeSleep: (() => void) | null = null;
  private readonly waiters = new Map<string, ((outcome: OpOutcome) => void)[]>();
  private readonly outcomes = new Map<string, OpOutcome>();
  private acking = false;
  private ackAgain = false;

  constructor(
    readonly client: ThreadlineClient,
    options: SessionOptions = {},
  ) {
    this.store = options.store ?? new ClientStore({ clock: client.clock });
    this.resolver = options.resolver ?? acceptServer;
    this.backoff = options.backoff ?? new Backoff({ initial: 0.5, maximum: 30 });
    this.history = options.history ?? DEFAULT_HISTORY;
    this.stableAfter = options.stableAfter ?? 10;
    this.maxOpAttempts = options.maxOpAttempts ?? 8;
    this.maxFinalFailures = options.maxFinalFailures ?? 3;
    this.clientName = options.clientName ?? "threadline-web";
    this.store.subscribe((change) => this.onChange(change));
  }

  get state(): ClientState {
    return this.store.state;
  }

  get connection(): ConnectionState {
    return this.store.state.connection;
  }

  get stream(): RealtimeStream | null {
    return this.current;
  }

  // -- lifecycle ------------------------------------------------------------------------------

  /** Starts connecting in the background; returns at once (see `waitConnection`). */
  start(): void {
    if (this.running && this.stopping) {
      // A stop() still winding down: start again once it has.
      const pending = this.running;
      this.stopping = false;
      void pending.then(() => this.start());
      return;
    }
    if (this.running) return;
    this.stopping = false;
    this.running = this.run().finally(() => (this.running = null));
  }

  /** Closes the stream and stops reconnecting; state, cursor and queued operations stay. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.current?.close();
    this.wakeSleep?.();
    this.wakeOps?.();
    await this.running;
    this.store.setConnection("offline");
  }

  /** Resolves when `predicate(state)` holds (checked after every change); rejects on timeout. */
  waitUntil(predicate: (state: ClientState) => boolean, timeoutMs = 10_000): Promise<void> {
    if (predicate(this.state)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        unsubscribe();
        reject(makeError("DEADLINE_EXCEEDED", "condition not reached in time"));
      }, timeoutMs);
      const unsubscribe = this.store.subscribe(() => {
        if (!predicate(this.state)) return;
        clearTimeout(timer);
        unsubscribe();
        resolve();
      });
    });
  }

  waitConnection(connection: ConnectionState = "online", timeoutMs = 10_000): Promise<void> {
    return this.waitUntil((s) => s.connection === connection, timeoutMs);
  }

  /** Resolves with an operation's outcome (confirmed, rejected or conflict). */
  waitOp(opId: string, timeoutMs = 10_000): Promise<OpOutcome> {
    const known = this.outcomes.get(opId);
    if (known) return Promise.resolve(known);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const list = this.waiters.get(opId) ?? [];
        this.waiters.set(opId, list.filter((w) => w !== done));
        reject(makeError("DEADLINE_EXCEEDED", `no outcome for ${opId} in time`));
      }, timeoutMs);
      const done = (outcome: OpOutcome) => {
        clearTimeout(timer);
        resolve(outcome);
      };
      this.waiters.set(opId, [...(this.waiters.get(opId) ?? []), done]);
    });
  }

  // -- optimistic operations ------------------------------------------------------------------

  /** Shows a message as pending at once and queues it; returns its stable local id (= op id). */
  send(threadId: string, text: string, attachmentIds: string[] = []): string {
    return this.store.queueSend(threadId, text, { attachmentIds }).localId;
  }

  edit(messageId: string, text: string): string {
    return this.store.queueEdit(messageId, text).opId;
  }

  delete(messageId: string): string {
    return this.store.queueDelete(messageId).opId;
  }

  updateThread(threadId: string, fields: Record<string, unknown>): string {
    return this.store.queueThreadUpdate(threadId, fields).opId;
  }

  archive(threadId: string, archived = true): string {
    return this.updateThread(threadId, { archived });
  }

  /** Moves the read marker forward optimistically (to the newest message by default). */
  markRead(threadId: string, seq?: number): string | null {
    const view = this.store.thread(threadId);
    if (!view) throw new Error(`unknown thread ${threadId}`);
    const op = this.store.queueMarkRead(threadId, seq ?? view.lastSeq);
    return op ? op.opId : null;
  }

  /** Sends a failed operation again with its original op id. */
  retry(localId: string): string {
    this.outcomes.delete(localId);
    return this.store.retry(localId).opId;
  }

  dismissFailed(localId: string): void {
    this.store.dismissFailed(localId);
  }

  setActiveThread(threadId: string | null): void {
    this.store.setActiveThread(threadId);
  }

  /** Tells the thread's other participants this user is (or stopped) typing; best effort. */
  async typing(threadId: string, active: boolean): Promise<void> {
    const stream = this.current;
    if (!stream || stream.closed || this.connection !== "online") return;
    try {
      await stream.typing(threadId, active);
    } catch {
      // Advisory: a lost typing signal expires on the other side by itself.
    }
  }

  /** Creates a thread through the stream (queued like every operation) and waits for it. */
  async createThread(
    title: string,
    participantIds: string[] = [],
    options: { description?: string; tags?: string[]; timeoutMs?: number } = {},
  ): Promise<ThreadView> {
    const op = this.store.queueCreateThread(title, participantIds, {
      description: options.description ?? "",
      tags: options.tags ?? [],
    });
    const outcome = await this.waitOp(op.opId, options.timeoutMs ?? 30_000);
    if (outcome.status !== "confirmed" || !outcome.resource) {
      const error = outcome.error ?? new OpError("UNKNOWN", null, "thread not created");
      throw makeError(error.code as CodeName, error.message, error.reason ?? undefined);
    }
    const threadId = outcome.resource.resource.case === "thread" ? outcome.resource.resource.value.id : "";
    const view = this.store.thread(threadId);
    if (!view) throw makeError("NOT_FOUND", "thread not visible");
    return view;
  }

  /** Loads older messages of a thread (before the oldest known); resolves with how many. */
  async loadMore(threadId: string, pageSize?: number): Promise<number> {
    const known = (this.state.messages.byThread.get(threadId) ?? []).filter((m) => m.server).map((m) => m.seq);
    const oldest = known.length ? Math.min(...known) : 0;
    if (known.length && oldest <= 1) return 0;
    const key = `history:${threadId}`;
    this.store.setLoading(key, true);
    try {
      const page = await this.client.threads.listMessages({
        threadId,
        direction: ListMessagesRequest_Direction.BACKWARD,
        pageSize: pageSize ?? this.history,
        startSeq: BigInt(oldest),
      });
      this.store.applyHistory(threadId, page.messages);
      return page.messages.length;
    } finally {
      this.store.setLoading(key, false);
    }
  }

  // -- the connection loop --------------------------------------------------------------------

  private async run(): Promise<void> {
    let attempt = 0;
    let finalFailures = 0;
    let first = true;
    try {
      while (!this.stopping) {
        this.store.setConnection(first ? "connecting" : "reconnecting");
        first = false;
        const end = await this.connectOnce();
        if (this.stopping) break;
        this.lastError = end.error;
        if (end.onlineFor >= this.stableAfter) attempt = 0;
        const error = end.error;
        if (error) this.store.addError("connection", new OpError(error.code, error.reason, error.rawMessage, error.retryAfter, error.fieldViolations));
        if (error && (NON_TRANSIENT.has(error.code) || (error.reason && FINAL_REASONS.has(error.reason)))) {
          finalFailures += 1;
          if (finalFailures >= this.maxFinalFailures || (error.reason && FINAL_REASONS.has(error.reason))) break;
          if (error.code === "UNAUTHENTICATED") await this.client.tokens.get(true).catch(() => undefined);
        } else {
          finalFailures = 0;
        }
        this.store.setConnection("reconnecting");
        const delay = this.backoff.delay(attempt, end.retryAfter);
        attempt += 1;
        await this.interruptibleSleep(delay);
      }
    } finally {
      this.store.setConnection("offline");
    }
  }

  private interruptibleSleep(seconds: number): Promise<void> {
    return new Promise<void>((resolve) => {
      this.wakeSleep = resolve;
      void this.client.sleep(seconds).then(resolve);
    }).then(() => {
      this.wakeSleep = null;
    });
  }

  private async connectOnce(): Promise<StreamEnd> {
    const resume = this.store.resumeState() ?? undefined;
    const stream = new RealtimeStream(this.client, { resume, clientName: this.clientName });
    this.current = stream;
    let onlineAt: number | null = null;
    const end = (error: ThreadlineError | null): StreamEnd => {
      let retryAfter = error?.retryAfter ?? null;
      const hint = stream.streamError;
      if (retryAfter === null && hint?.retryAfter) {
        retryAfter = Number(hint.retryAfter.seconds) + hint.retryAfter.nanos / 1e9;
      }
      const onlineFor = onlineAt === null ? 0 : this.client.clock.now() - onlineAt;
      return { error, retryAfter, onlineFor };
    };
    let flusher: Promise<void> | null = null;
    try {
      const welcome = await stream.start();
      if (this.stopping) return end(null);
      this.store.applyWelcome(welcome);
      this.store.setConnection("syncing");
      let caughtUp = false;
      const buffered: Event[] = [];
      for await (const frame of stream.frames()) {
        const kind = frame.kind;
        if (kind.case === "events") {
          if (!resume && !caughtUp) {
            buffered.push(...kind.value.events);
            continue;
          }
          this.store.applyEvents(kind.value.events, { replay: kind.value.replay });
          this.fillJoined(kind.value.events);
          if (caughtUp) this.ack(stream);
        } else if (kind.case === "syncComplete") {
          const complete = kind.value;
          if (complete.wasRecovering && complete.recovered && this.state.sync.synced) {
            this.store.applySyncComplete(complete);
          } else {
            await this.reload(complete, welcome);
            if (buffered.length) {
              this.store.applyEvents(buffered.splice(0));
            }
          }
          caughtUp = true;
          onlineAt = this.client.clock.now();
          this.store.setConnection("online");
          this.ack(stream);
          flusher = this.flush(stream);
        } else if (kind.case === "resyncRequired") {
          // A slow consumer's stream ends next with its cursor still good: resume from it.
          if (kind.value.reason !== ResyncReason.SLOW_CONSUMER) this.store.noteResync(kind.value);
        } else if (kind.case === "operationResult") {
          this.handleResult(kind.value);
        }
      }
      return end(stream.closedError);
    } catch (error) {
      if (error instanceof ThreadlineError) return end(error);
      // A bug must not kill the session for good: report it and reconnect with backoff.
      console.error("threadline: session stream failed", error);
      return end(makeError("UNKNOWN", `session error: ${String(error)}`));
    } finally {
      this.current = null;
      stream.close();
      this.wakeOps?.();
      await flusher;
    }
  }

  private async reload(complete: SyncComplete, welcome: Welcome): Promise<void> {
    this.store.setLoading("snapshot", true);
    try {
      const snapshot = await loadSnapshot(this.client, this.history);
      this.store.applySnapshot(snapshot, { epoch: complete.epoch || welcome.epoch, changeSeq: complete.changeSeq });
    } finally {
      this.store.setLoading("snapshot", false);
    }
  }

  /**
   * Tells the server the cursor, one Ack in flight at a time (the latest cursor goes next), so
   * a busy thread costs one extra call per round trip, not one per events frame. Best effort: a
   * lost Ack only means the next connection reports the cursor itself.
   */
  private ack(stream: RealtimeStream): void {
    if (this.acking) {
      this.ackAgain = true;
      return;
    }
    this.acking = true;
    void stream
      .ack(BigInt(this.state.sync.changeSeq))
      .catch(() => undefined)
      .finally(() => {
        this.acking = false;
        if (this.ackAgain && !stream.closed) {
          this.ackAgain = false;
          this.ack(stream);
        }
      });
  }

  // -- sending --------------------------------------------------------------------------------

  /**
   * Sends pending operations one at a time, oldest first, while the stream lives: one in flight
   * keeps the server's order equal to the user's whatever the server runs concurrently.
   */
  private async flush(stream: RealtimeStream): Promise<void> {
    while (!stream.closed && !this.stopping) {
      const op = this.store.nextOp();
      const now = this.client.clock.now();
      if (!op || op.notBefore > now) {
        await new Promise<void>((resolve) => {
          this.wakeOps = resolve;
          if (op) void this.client.sleep(op.notBefore - now).then(resolve);
        });
        this.wakeOps = null;
        continue;
      }
      this.store.markSent(op.opId);
      let result;
      try {
        result = await this.submit(stream, op);
      } catch (error) {
        if (stream.closed || this.stopping) return; // the stream ended: resend after reconnecting
        // One Submit failed while the stream lives (a deadline, the edge refusing a call, the
        // network): the outcome is unknown, so resend with the same op id after a backoff.
        const failure = error instanceof ThreadlineError ? error : makeError("UNKNOWN", String(error));
        await this.client.sleep(this.backoff.delay(Math.max(op.attempts - 1, 0), failure.retryAfter));
        continue;
      }
      this.handleResult(result);
    }
  }

  private submit(stream: RealtimeStream, op: PendingOp) {
    const payload = op.toProto();
    if (payload.$typeName === "threadline.v1.SendMessage") {
      return stream.sendMessage(payload.threadId, payload.text, payload.clientOpId, payload.attachmentIds);
    }
    return stream.operation(payload);
  }

  private handleResult(result: Parameters<ClientStore["applyResult"]>[0]): void {
    const op = this.store.pendingOp(result.clientOpId);
    if (op && result.outcome.case === "rejected") {
      const error = OpError.fromStatus(result.outcome.value);
      const retryable = isRetryable(makeErrorFromOp(error));
      if (retryable && op.attempts < this.maxOpAttempts) {
        const delay = this.backoff.delay(Math.max(op.attempts - 1, 0), error.retryAfter);
        this.store.defer(op.opId, delay, error);
        this.wakeOps?.();
        return;
      }
    }
    this.store.applyResult(result);
  }

  // -- store notifications --------------------------------------------------------------------

  private onChange(change: Change): void {
    if (change.kind === "local") this.wakeOps?.();
    for (const outcome of change.outcomes) {
      this.outcomes.set(outcome.op.opId, outcome);
      while (this.outcomes.size > MAX_OUTCOMES) {
        const oldest = this.outcomes.keys().next().value;
        if (oldest === undefined) break;
        this.outcomes.delete(oldest);
      }
      for (const waiter of this.waiters.get(outcome.op.opId) ?? []) waiter(outcome);
      this.waiters.delete(outcome.op.opId);
      if (outcome.conflict) void this.resolve(outcome.conflict);
    }
  }

  /** A thread the user was added to arrives bare: fetch what a snapshot would have had for it. */
  private fillJoined(events: Event[]): void {
    for (const event of events) {
      if (event.kind === EventKind.THREAD_CREATED && event.payload.case === "thread" && event.payload.value.lastSeq > 0n) {
        void this.loadJoined(event.payload.value.id);
      }
    }
  }

  private async loadJoined(threadId: string): Promise<void> {
    const backoff = new Backoff({ initial: 0.2, maximum: 5 });
    for (let attempt = 0; !this.stopping; attempt++) {
      if (!this.state.threads.byId.has(threadId)) return;
      try {
        const response = await this.client.threads.getThread({ threadId });
        const page = await this.client.threads.listMessages({
          threadId,
          direction: ListMessagesRequest_Direction.BACKWARD,
          pageSize: this.history,
        });
        // GetThreadResponse.thread is the ThreadSummary (the thread with the caller's read state).
        if (response.thread) this.store.applyJoined(response.thread, page.messages);
        return;
      } catch (error) {
        if (!(error instanceof ThreadlineError) || !error.retryable) return; // removed again meanwhile
        await this.client.sleep(backoff.delay(attempt, error.retryAfter));
      }
    }
  }

  private async resolve(info: ConflictInfo): Promise<void> {
    let value: Resolution;
    try {
      value = await this.resolver(info);
    } catch (error) {
      console.error("threadline: conflict resolver failed; keeping the server's value", error);
      return;
    }
    if (!value) return;
    const op = info.op;
    const base = info.serverVersion;
    try {
      if (op.kind === "edit_message") this.store.queueEdit(op.targetId, String(value["text"]), { baseVersion: base });
      else if (op.kind === "delete_message") this.store.queueDelete(op.targetId, { baseVersion: base });
      else if (op.kind === "update_thread") this.store.queueThreadUpdate(op.targetId, value, { baseVersion: base });
    } catch (error) {
      console.warn("threadline: conflict resolution for a resource no longer here", error);
    }
  }
}

function makeErrorFromOp(error: OpError): ThreadlineError {
  const failure = makeError(error.code as CodeName, error.message, error.reason ?? undefined);
  failure.retryAfter = error.retryAfter;
  return failure;
}

export type { ServerFrame };
