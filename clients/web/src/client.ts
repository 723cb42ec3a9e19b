/**
 * `ThreadlineClient`: typed clients for every Threadline service over one grpc-web transport.
 *
 * Each service is a Connect-ES client generated from protos/ (`client.threads.listThreads(...)`,
 * `client.uploads.createUpload(...)`, ...), so every RPC has a typed helper without hand-written
 * wrappers to drift from the contract. What the SDK adds sits in interceptors: the bearer token
 * (refreshed before expiry), retries of idempotent calls on UNAVAILABLE with capped backoff and
 * full jitter, and errors as `ThreadlineError` with the server's decoded details.
 */
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { MethodOptions_IdempotencyLevel } from "@bufbuild/protobuf/wkt";
import { AdminService } from "../../../gen/ts/threadline/v1/admin_service_pb.js";
import { RealtimeService } from "../../../gen/ts/threadline/v1/realtime_service_pb.js";
import { ThreadService } from "../../../gen/ts/threadline/v1/thread_service_pb.js";
import { UploadService } from "../../../gen/ts/threadline/v1/upload_service_pb.js";
import { UserService } from "../../../gen/ts/threadline/v1/user_service_pb.js";
import { bearerAuth, systemClock, TokenCache, type Clock, type TokenProvider } from "./auth.js";
import { Backoff } from "./backoff.js";
import { fromConnectError } from "./errors.js";

export interface ClientOptions {
  /** The grpc-web edge, e.g. `http://127.0.0.1:8090` (from the server's `/app-config.json`). */
  baseUrl: string;
  /** A token, or a provider called whenever a fresh token is needed. */
  token: string | TokenProvider;
  /** A transport to use instead of grpc-web (e.g. one from @connectrpc/connect-node in tests). */
  transport?: Transport;
  /** Retries of idempotent calls answered UNAVAILABLE (default 4 after the first attempt). */
  maxRetries?: number;
  /** Retry delays (default 0.25 s growing to 5 s, full jitter). */
  backoff?: Backoff;
  /** Default deadline of unary calls, in ms (default 30 000). */
  timeoutMs?: number;
  clock?: Clock;
  /** Waits `seconds`; injectable for tests. */
  sleep?: (seconds: number) => Promise<void>;
  /** The `fetch` to use (default: globalThis.fetch). */
  fetch?: typeof globalThis.fetch;
}

export const sleepSeconds = (seconds: number): Promise<void> =>
  new Promise((resolve) => setTimeout(resolve, Math.max(0, seconds) * 1000));

/** Maps every failure to a ThreadlineError, after retrying idempotent unary calls. */
function retryIdempotent(maxRetries: number, backoff: Backoff, sleep: (s: number) => Promise<void>): Interceptor {
  return (next) => async (req) => {
    const idempotent =
      req.method.idempotency === MethodOptions_IdempotencyLevel.NO_SIDE_EFFECTS ||
      req.method.idempotency === MethodOptions_IdempotencyLevel.IDEMPOTENT;
    for (let attempt = 0; ; attempt++) {
      try {
        return await next(req);
      } catch (error) {
        const failure = fromConnectError(error);
        const again = !req.stream && idempotent && failure.code === "UNAVAILABLE" && attempt < maxRetries;
        if (!again || req.signal.aborted) throw failure;
        await sleep(backoff.delay(attempt, failure.retryAfter));
      }
    }
  };
}

export class ThreadlineClient {
  readonly tokens: TokenCache;
  readonly transport: Transport;
  readonly threads: Client<typeof ThreadService>;
  readonly users: Client<typeof UserService>;
  readonly uploads: Client<typeof UploadService>;
  readonly realtime: Client<typeof RealtimeService>;
  readonly admin: Client<typeof AdminService>;
  readonly clock: Clock;
  readonly sleep: (seconds: number) => Promise<void>;

  constructor(options: ClientOptions) {
    const provider = typeof options.token === "string" ? ((token: string) => () => token)(options.token) : options.token;
    this.clock = options.clock ?? systemClock;
    this.sleep = options.sleep ?? sleepSeconds;
    this.tokens = new TokenCache(provider, this.clock);
    const interceptors = [
      retryIdempotent(options.maxRetries ?? 4, options.backoff ?? new Backoff({ initial: 0.25, maximum: 5 }), this.sleep),
      bearerAuth(this.tokens),
    ];
    this.transport =
      options.transport ??
      createGrpcWebTransport({
        baseUrl: options.baseUrl,
        useBinaryFormat: true,
        interceptors,
        defaultTimeoutMs: options.timeoutMs ?? 30_000,
        ...(options.fetch ? { fetch: options.fetch } : {}),
      });
    this.threads = createClient(ThreadService, this.transport);
    this.users = createClient(UserService, this.transport);
    this.uploads = createClient(UploadService, this.transport);
    this.realtime = createClient(RealtimeService, this.transport);
    this.admin = createClient(AdminService, this.transport);
  }
}
