/**
 * `ThreadlineClient`: typed clients for every Threadline service over one grpc-web transport.
 *
 * Each service is a Connect-ES client generated from protos/ (`client.threads.listThreads(...)`,
 * `client.uploads.createUpload(...)`, ...), so every RPC has a typed helper without hand-written
 * wrappers to drift from the contract. What the SDK adds sits in interceptors: the bearer token
 * (refreshed before expiry), retries of idempotent calls on UNAVAILABLE with capped backoff and
 * full jitter, and errors as `ThreadlineError` with the server's decoded details.
 */
import type { DescService } from "@bufbuild/protobuf";
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

/** Retries idempotent unary calls answered UNAVAILABLE (the error stays a ConnectError here:
 * Connect-ES re-wraps anything else an interceptor throws; `typedClient` maps it). */
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
        if (!again || req.signal.aborted) throw error;
        await sleep(backoff.delay(attempt, failure.retryAfter));
      }
    }
  };
}

async function* typedStream<T>(responses: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* responses;
  } catch (error) {
    throw fromConnectError(error);
  }
}

/** A Connect-ES client whose calls reject (and whose streams throw) `ThreadlineError`s. */
function typedClient<T extends DescService>(service: T, transport: Transport): Client<T> {
  const raw = createClient(service, transport) as unknown as Record<string, (...args: unknown[]) => unknown>;
  const typed: Record<string, unknown> = {};
  for (const [name, method] of Object.entries(service.method)) {
    const call = raw[name];
    if (!call) continue;
    if (method.methodKind === "unary") {
      typed[name] = async (...args: unknown[]) => {
        try {
          return await call(...args);
        } catch (error) {
          throw fromConnectError(error);
        }
      };
    } else if (method.methodKind === "server_streaming") {
      typed[name] = (...args: unknown[]) => typedStream(call(...args) as AsyncIterable<unknown>);
    } else {
      typed[name] = call; // client and bidi streaming: grpc-web cannot carry them anyway
    }
  }
  return typed as Client<T>;
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
    this.threads = typedClient(ThreadService, this.transport);
    this.users = typedClient(UserService, this.transport);
    this.uploads = typedClient(UploadService, this.transport);
    this.realtime = typedClient(RealtimeService, this.transport);
    this.admin = typedClient(AdminService, this.transport);
  }
}
