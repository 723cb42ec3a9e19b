/**
 * `RealtimeStream`: one realtime session over grpc-web.
 *
 * grpc-web has no client streaming, so a browser's session is a `Subscribe` server stream
 * (opened with the Hello) plus one `Submit` unary call per client frame, naming the session id
 * from Welcome. The server serves both through the same dispatcher as the bidirectional
 * `Connect`, so frames, answers and errors are the same. The stream sends heartbeats (Submit
 * ping) at the interval Welcome asks for, and replaces its token with `RefreshAuth` before it
 * expires, so a long-lived stream outlives any one token.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  ClientFrameSchema,
  SendMessageSchema,
  type Operation,
  type OperationResult,
  type ServerFrame,
  type StreamError,
  type SyncState,
  type Welcome,
} from "../../../gen/ts/threadline/v1/realtime_pb.js";
import { refreshMargin } from "./auth.js";
import { Backoff } from "./backoff.js";
import type { ThreadlineClient } from "./client.js";
import { fromConnectError, fromStatus, makeError, ThreadlineError } from "./errors.js";

export interface StreamOptions {
  /** Resume from this cursor (omit for a fresh session). */
  resume?: SyncState | undefined;
  clientName?: string;
  clientVersion?: string;
  /** Heartbeat interval in seconds; default: Welcome's `heartbeat_interval`. */
  heartbeatSeconds?: number;
}

// Token refresh attempts are never closer than this (seconds).
const MIN_REFRESH_GAP_S = 1;

type FrameInit = MessageInitShape<typeof ClientFrameSchema>["kind"];

/** A queue of frames the reader fills and `frames()` drains; `null` marks the end. */
class FrameQueue {
  private items: (ServerFrame | null)[] = [];
  private wake: (() => void) | null = null;

  push(item: ServerFrame | null): void {
    this.items.push(item);
    this.wake?.();
    this.wake = null;
  }

  async next(): Promise<ServerFrame | null> {
    while (this.items.length === 0) await new Promise<void>((resolve) => (this.wake = resolve));
    return this.items.shift() ?? null;
  }
}

export class RealtimeStream {
  private readonly abort = new AbortController();
  private readonly queue = new FrameQueue();
  private welcomeFrame: Welcome | null = null;
  private ended = false;
  private endError: ThreadlineError | null = null;
  private lastStreamError: StreamError | null = null;
  private timers: ReturnType<typeof setTimeout>[] = [];
  private requestCounter = 0;
  private token = "";
  private tokenExpiresAt: number | null = null;
  private tokenIssuedAt: number | null = null;
  private readonly closeListeners: ((error: ThreadlineError | null) => void)[] = [];

  constructor(
    private readonly client: ThreadlineClient,
    private readonly options: StreamOptions = {},
  ) {}

  /** Opens the stream and resolves with Welcome (rejects with the refusal's ThreadlineError). */
  async start(): Promise<Welcome> {
    this.token = await this.client.tokens.get();
    this.tokenIssuedAt = this.client.clock.now();
    const hello = {
      clientName: this.options.clientName ?? "threadline-web",
      clientVersion: this.options.clientVersion ?? "0.1.0",
      ...(this.options.resume ? { syncState: this.options.resume } : {}),
    };
    const responses = this.client.realtime.subscribe({ hello }, { signal: this.abort.signal, timeoutMs: 0 });
    const iterator = responses[Symbol.asyncIterator]();
    void this.read(iterator);
    const first = await this.queue.next();
    if (first === null || first.kind.case !== "welcome") {
      throw this.endError ?? makeError("UNKNOWN", "stream ended before welcome");
    }
    const welcome = first.kind.value;
    this.welcomeFrame = welcome;
    this.tokenExpiresAt = welcome.tokenExpireTime ? timestampDate(welcome.tokenExpireTime).getTime() / 1000 : null;
    const heartbeat =
      this.options.heartbeatSeconds ?? (welcome.heartbeatInterval ? durationMs(welcome.heartbeatInterval) / 1000 : 30);
    if (heartbeat > 0) this.every(heartbeat, () => void this.ping().catch(() => undefined));
    this.scheduleRefresh();
    return welcome;
  }

  get welcome(): Welcome {
    if (!this.welcomeFrame) throw new Error("stream not started");
    return this.welcomeFrame;
  }

  get sessionId(): string {
    return this.welcomeFrame?.sessionId ?? "";
  }

  get closed(): boolean {
    return this.ended;
  }

  /** Why the stream ended (null: still open, or a clean end). */
  get closedError(): ThreadlineError | null {
    return this.endError;
  }

  /** The StreamError frame the server sent before ending the stream, if any. */
  get streamError(): StreamError | null {
    return this.lastStreamError;
  }

  /** When the stream's token expires (Unix seconds), as the server last said. */
  get tokenExpires(): number | null {
    return this.tokenExpiresAt;
  }

  /** Calls `listener` once when the stream ends. */
  onClose(listener: (error: ThreadlineError | null) => void): void {
    if (this.ended) listener(this.endError);
    else this.closeListeners.push(listener);
  }

  /** Server frames after Welcome, in order, until the stream ends. */
  async *frames(): AsyncGenerator<ServerFrame> {
    for (;;) {
      const frame = await this.queue.next();
      if (frame === null) return;
      yield frame;
    }
  }

  // -- client frames (each one Submit call) ---------------------------------------------------

  /** Sends one client frame; resolves with the server's answering frame, if it sends one. */
  async submit(kind: FrameInit, timeoutMs = 30_000): Promise<ServerFrame | undefined> {
    if (this.ended) throw this.endedError();
    const frame = create(ClientFrameSchema, { requestId: `r${++this.requestCounter}`, kind });
    try {
      // Aborted with the stream: closing never waits for a Submit in flight.
      const response = await this.client.realtime.submit(
        { frame, sessionId: this.sessionId },
        { timeoutMs, signal: this.abort.signal },
      );
      return response.frame;
    } catch (error) {
      throw fromConnectError(error);
    }
  }

  async sendMessage(threadId: string, text: string, clientOpId: string, attachmentIds: string[] = []): Promise<OperationResult> {
    const value = create(SendMessageSchema, { threadId, text, clientOpId, attachmentIds });
    return this.expectResult(await this.submit({ case: "sendMessage", value }));
  }

  async operation(value: Operation): Promise<OperationResult> {
    return this.expectResult(await this.submit({ case: "operation", value }));
  }

  async typing(threadId: string, active: boolean): Promise<void> {
    await this.submit({ case: "typing", value: { threadId, active } });
  }

  async ack(changeSeq: bigint): Promise<void> {
    await this.submit({ case: "ack", value: { changeSeq } });
  }

  async ping(): Promise<void> {
    await this.submit({ case: "ping", value: { clientTime: timestampFromDate(new Date()) } });
  }

  /** Replaces the stream's token; resolves with the new expiry (Unix seconds). */
  async refreshAuth(token: string): Promise<number | null> {
    const answer = await this.submit({ case: "refreshAuth", value: { token } });
    if (answer?.kind.case === "operationResult" && answer.kind.value.outcome.case === "rejected") {
      throw fromStatus(answer.kind.value.outcome.value);
    }
    if (answer?.kind.case !== "authRefreshed") throw makeError("UNKNOWN", "no AuthRefreshed answer");
    this.token = token;
    this.tokenIssuedAt = this.client.clock.now();
    const expiry = answer.kind.value.tokenExpireTime;
    this.tokenExpiresAt = expiry ? timestampDate(expiry).getTime() / 1000 : null;
    return this.tokenExpiresAt;
  }

  /** Ends the stream (the server sees the call cancelled and cleans the session up). */
  close(): void {
    this.finish(null);
    this.abort.abort();
  }

  // -- internals ------------------------------------------------------------------------------

  private expectResult(frame: ServerFrame | undefined): OperationResult {
    if (frame?.kind.case === "operationResult") return frame.kind.value;
    throw makeError("UNKNOWN", `expected an operation result, got ${frame?.kind.case ?? "nothing"}`);
  }

  private async read(iterator: AsyncIterator<{ frame?: ServerFrame }>): Promise<void> {
    let error: ThreadlineError | null = null;
    try {
      for (;;) {
        const next = await iterator.next();
        if (next.done) break;
        const frame = next.value.frame;
        if (!frame) continue;
        if (frame.kind.case === "error") this.lastStreamError = frame.kind.value;
        this.queue.push(frame);
      }
    } catch (failure) {
      error = this.ended ? null : fromConnectError(failure);
    }
    this.finish(this.finalError(error));
  }

  /** The StreamError frame says why in full even when the call's own status is bare. */
  private finalError(error: ThreadlineError | null): ThreadlineError | null {
    const hint = this.lastStreamError;
    if (!hint?.status || hint.status.code === 0) return error;
    let result = error;
    const framed = fromStatus(hint.status);
    if (result === null || (result.code === framed.code && result.details.length === 0)) result = framed;
    if (result.retryAfter === null && hint.retryAfter) result.retryAfter = durationMs(hint.retryAfter) / 1000;
    return result;
  }

  private finish(error: ThreadlineError | null): void {
    if (this.ended) return;
    this.ended = true;
    this.endError = error;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers = [];
    this.queue.push(null);
    for (const listener of this.closeListeners.splice(0)) listener(error);
  }

  private endedError(): ThreadlineError {
    return this.endError ?? makeError("UNAVAILABLE", "stream closed", "STREAM_CLOSED");
  }

  /** A timer that forgets itself once it fires (so long streams do not accumulate them). */
  private later(seconds: number, action: () => void): void {
    const timer = setTimeout(() => {
      this.timers = this.timers.filter((t) => t !== timer);
      if (!this.ended) action();
    }, seconds * 1000);
    this.timers.push(timer);
  }

  private every(seconds: number, action: () => void): void {
    const tick = () => {
      action();
      this.later(seconds, tick);
    };
    this.later(seconds, tick);
  }

  /**
   * Arms one timer for the refresh margin before the token's expiry; re-arms after. Always at
   * least a second apart: a client clock ahead of the server's must not spin, and the server
   * (not this clock) decides when the stream's token has expired.
   */
  private scheduleRefresh(failures = 0): void {
    const expires = this.tokenExpiresAt;
    if (expires === null || this.ended) return;
    const due = expires - refreshMargin(expires, this.tokenIssuedAt);
    const delay = Math.max(MIN_REFRESH_GAP_S, due - this.client.clock.now());
    this.later(delay, () => {
      void this.refreshOnce().then(
        (refreshed) => this.scheduleRefresh(refreshed ? 0 : failures + 1),
        (error: unknown) => {
          if (this.ended) return;
          console.warn("threadline: stream token refresh failed", error);
          this.later(new Backoff({ initial: 1, maximum: 30 }).delay(failures), () => this.scheduleRefresh(failures + 1));
        },
      );
    });
  }

  /** Replaces the stream's token if the provider has a newer one; false when it has not. */
  private async refreshOnce(): Promise<boolean> {
    let token = await this.client.tokens.get();
    if (token === this.token) token = await this.client.tokens.get(true);
    if (token === this.token) {
      // The provider has nothing newer (a static token): ask again later, not in a loop.
      await this.client.sleep(Math.max(MIN_REFRESH_GAP_S, ((this.tokenExpiresAt ?? 0) - this.client.clock.now()) / 4));
      return false;
    }
    await this.refreshAuth(token);
    return true;
  }
}
