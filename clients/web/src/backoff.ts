/**
 * Reconnect and retry delays: capped exponential backoff with full jitter.
 *
 * Full jitter (a uniformly random delay between 0 and the capped exponential) spreads a crowd of
 * clients out after a server restart; plain exponential backoff brings them all back in lockstep.
 * The same policy as the Python SDK's `Backoff`.
 */

// Past this many doublings every realistic cap is reached; it also keeps `multiplier ** n` finite.
const MAX_EXPONENT = 64;

export interface BackoffOptions {
  /** Cap of the first delay, in seconds (default 0.5). */
  initial?: number;
  /** Cap of every delay, in seconds (default 30). */
  maximum?: number;
  /** Growth of the cap per attempt (default 2). */
  multiplier?: number;
  /** Random source in [0, 1); pass a seeded one for reproducible tests. */
  random?: () => number;
}

export class Backoff {
  readonly initial: number;
  readonly maximum: number;
  readonly multiplier: number;
  private readonly random: () => number;

  constructor(options: BackoffOptions = {}) {
    this.initial = options.initial ?? 0.5;
    this.maximum = options.maximum ?? 30;
    this.multiplier = options.multiplier ?? 2;
    this.random = options.random ?? Math.random;
    if (!(this.initial > 0) || this.maximum < this.initial || this.multiplier < 1) {
      throw new RangeError("need 0 < initial <= maximum and multiplier >= 1");
    }
  }

  /** The upper bound of the delay for attempt `n` (0-based): `min(maximum, initial * multiplier**n)`. */
  cap(attempt: number): number {
    const exponent = Math.min(Math.max(attempt, 0), MAX_EXPONENT);
    return Math.min(this.maximum, this.initial * this.multiplier ** exponent);
  }

  /**
   * The delay before attempt `attempt`, in seconds: uniform in `[0, cap(attempt)]`, or, when the
   * server named a delay (RetryInfo, StreamError.retry_after), that delay plus up to 20% so
   * clients told the same delay do not all return at the same instant.
   */
  delay(attempt: number, retryAfter?: number | null): number {
    if (retryAfter != null && retryAfter > 0) return retryAfter * (1 + 0.2 * this.random());
    return this.random() * this.cap(attempt);
  }
}
