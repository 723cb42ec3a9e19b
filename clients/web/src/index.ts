/**
 * @threadline/client — the TypeScript SDK for Threadline over grpc-web.
 *
 * - `ThreadlineClient`: typed clients for every service (token, retries, typed errors).
 * - `RealtimeStream`: one Subscribe + Submit session (heartbeats, RefreshAuth before expiry).
 * - `ThreadlineSession`: keeps a `ClientStore` in sync: reconnect with backoff and full jitter,
 *   resume from the cursor, optimistic operations flushed in order with stable op ids, conflicts.
 * - `ClientStore` / `ClientState`: the reducer and the state a UI renders, shared in behaviour
 *   with the Python SDK (tests/cases/client_state).
 */
export * from "./auth.js";
export * from "./backoff.js";
export * from "./client.js";
export * from "./errors.js";
export * from "./session.js";
export * from "./state/index.js";
export * from "./stream.js";
