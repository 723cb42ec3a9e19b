/**
 * Bearer tokens: providers, expiry-aware caching and the auth interceptor.
 *
 * The server authenticates every call from `authorization: Bearer <JWT>`. The SDK asks the app's
 * provider for a token (e.g. Clerk's `session.getToken()`), caches it, and asks again shortly
 * before its `exp`. The JWT payload is read without verifying it: the client only needs the
 * expiry, verification is the server's job.
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { fromConnectError, makeError, ThreadlineError } from "./errors.js";

/** Returns a bearer token, synchronously or as a promise. Called again near expiry. */
export type TokenProvider = () => string | Promise<string>;

/** Seconds before `exp` at which a token counts as stale (short tokens: a third of their life). */
export const DEFAULT_REFRESH_MARGIN = 20;

/** A clock in Unix seconds; injectable so tests never depend on the machine's speed. */
export interface Clock {
  now(): number;
}
export const systemClock: Clock = { now: () => Date.now() / 1000 };

export interface TokenClaims {
  expiresAt: number | null;
  issuedAt: number | null;
}

/** The `exp` and `iat` claims of a JWT, read without verifying it; null if it is not a JWT. */
export function decodeJwtClaims(token: string): TokenClaims | null {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const json = new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)));
    const payload: unknown = JSON.parse(json);
    if (typeof payload !== "object" || payload === null) return null;
    const claims = payload as Record<string, unknown>;
    const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);
    return { expiresAt: num(claims["exp"]), issuedAt: num(claims["iat"]) };
  } catch {
    return null;
  }
}

/** How long before `expiresAt` a token should be replaced: `margin`, or a third of its life. */
export function refreshMargin(expiresAt: number, issuedAt: number | null, margin = DEFAULT_REFRESH_MARGIN): number {
  if (issuedAt === null) return margin;
  return Math.min(margin, Math.max(0, expiresAt - issuedAt) / 3);
}

/** Caches the provider's token and asks again when it is within its refresh margin of expiry. */
export class TokenCache {
  private token: string | null = null;
  private claims: TokenClaims | null = null;
  private obtainedAt = 0;
  private inflight: Promise<string> | null = null;

  constructor(
    private readonly provider: TokenProvider,
    private readonly clock: Clock = systemClock,
    private readonly margin = DEFAULT_REFRESH_MARGIN,
  ) {}

  /** The cached token's expiry (Unix seconds), or null. */
  get expiresAt(): number | null {
    return this.claims?.expiresAt ?? null;
  }

  /** When the cached token becomes stale, or null if it never does. */
  refreshAt(): number | null {
    const exp = this.expiresAt;
    if (exp === null) return null;
    return exp - refreshMargin(exp, this.claims?.issuedAt ?? this.obtainedAt, this.margin);
  }

  isStale(): boolean {
    if (this.token === null) return true;
    const due = this.refreshAt();
    return due !== null && this.clock.now() >= due;
  }

  /**
   * A usable token, asking the provider when there is none, it is stale, or `force` is set
   * (after the server said TOKEN_EXPIRED, or to refresh a stream). Concurrent callers share one
   * provider call. A failing provider rejects with UNAUTHENTICATED.
   */
  async get(force = false): Promise<string> {
    if (!force && !this.isStale() && this.token !== null) return this.token;
    if (this.inflight) return this.inflight;
    let call: Promise<string> | null = null;
    call = (async () => {
      // Yield first: a provider that throws at once must still reach `finally` after `inflight`
      // is set, or `inflight` would keep the rejection for every later call.
      await null;
      try {
        const token = await this.provider();
        if (typeof token !== "string") throw new TypeError(`token provider returned ${typeof token}`);
        this.token = token;
        this.claims = decodeJwtClaims(token);
        this.obtainedAt = this.clock.now();
        return token;
      } catch (error) {
        if (error instanceof ThreadlineError) throw error;
        throw makeError("UNAUTHENTICATED", `token provider failed: ${String(error)}`, undefined, error);
      } finally {
        if (this.inflight === call) this.inflight = null;
      }
    })();
    this.inflight = call;
    return call;
  }
}

/**
 * Adds `authorization: Bearer <token>` to every call. A unary call refused with an expired or
 * revoked token is sent once more with a freshly forced token (the provider may have a new one).
 */
export function bearerAuth(tokens: TokenCache): Interceptor {
  return (next) => async (req) => {
    const attempt = async (force: boolean) => {
      let token: string;
      try {
        token = await tokens.get(force);
      } catch (error) {
        // A ConnectError, so the call rejects UNAUTHENTICATED (anything else becomes UNKNOWN).
        const message = error instanceof ThreadlineError ? error.rawMessage : String(error);
        throw new ConnectError(message, Code.Unauthenticated, undefined, undefined, error);
      }
      if (token) req.header.set("authorization", `Bearer ${token}`);
      return next(req);
    };
    try {
      return await attempt(false);
    } catch (error) {
      // Inspected, not converted: Connect-ES re-wraps anything but a ConnectError thrown here.
      const failure = fromConnectError(error);
      const renewable = failure.reason === "TOKEN_EXPIRED" || failure.reason === "TOKEN_NOT_YET_VALID";
      if (req.stream || failure.code !== "UNAUTHENTICATED" || !renewable) throw error;
      return attempt(true);
    }
  };
}
