import { create, toBinary } from "@bufbuild/protobuf";
import { anyPack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, test } from "vitest";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "../../../gen/ts/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../../gen/ts/google/rpc/status_pb.js";
import { decodeJwtClaims, refreshMargin, TokenCache } from "../src/auth.js";
import { Backoff } from "../src/backoff.js";
import { fromConnectError, fromStatus, isRetryable, makeError } from "../src/errors.js";

function jwt(claims: Record<string, unknown>): string {
  const encode = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${encode({ alg: "RS256" })}.${encode(claims)}.signature`;
}

describe("Backoff", () => {
  test("full jitter stays within the capped exponential", () => {
    const high = new Backoff({ initial: 0.5, maximum: 4, random: () => 0.999999 });
    expect([0, 1, 2, 3, 10, 1000].map((n) => high.cap(n))).toEqual([0.5, 1, 2, 4, 4, 4]);
    expect(high.delay(3)).toBeCloseTo(4, 4);
    expect(new Backoff({ random: () => 0 }).delay(5)).toBe(0);
  });

  test("a server delay wins, spread by up to 20%", () => {
    const backoff = new Backoff({ random: () => 0.5 });
    expect(backoff.delay(0, 10)).toBeCloseTo(11);
  });

  test("rejects nonsense", () => {
    expect(() => new Backoff({ initial: 0 })).toThrow(RangeError);
    expect(() => new Backoff({ initial: 5, maximum: 1 })).toThrow(RangeError);
  });
});

describe("tokens", () => {
  test("claims are read without verification; non-JWTs give null", () => {
    expect(decodeJwtClaims(jwt({ exp: 2000, iat: 1000 }))).toEqual({ expiresAt: 2000, issuedAt: 1000 });
    expect(decodeJwtClaims("opaque-token")).toBeNull();
    expect(decodeJwtClaims("a.!!!.c")).toBeNull();
  });

  test("short tokens refresh at a third of their life, long ones 20 s early", () => {
    expect(refreshMargin(1030, 1000)).toBe(10);
    expect(refreshMargin(4600, 1000)).toBe(20);
    expect(refreshMargin(4600, null)).toBe(20);
  });

  test("the cache asks again only when stale or forced, and shares one call", async () => {
    let now = 1000;
    let calls = 0;
    const cache = new TokenCache(
      async () => jwt({ exp: 1600, iat: now, n: ++calls }),
      { now: () => now },
    );
    const [a, b] = await Promise.all([cache.get(), cache.get()]);
    expect(a).toBe(b);
    expect(calls).toBe(1);
    now = 1500;
    await cache.get();
    expect(calls).toBe(1);
    now = 1581; // within 20 s of exp 1600
    await cache.get();
    expect(calls).toBe(2);
    await cache.get(true);
    expect(calls).toBe(3);
  });

  test("a failing provider is UNAUTHENTICATED, and asked again on the next call", async () => {
    let calls = 0;
    const cache = new TokenCache(() => {
      calls += 1;
      if (calls === 1) throw new Error("signed out"); // synchronously, as a plain function may
      return jwt({ exp: 2000, iat: 1000 });
    }, { now: () => 1000 });
    await expect(cache.get()).rejects.toMatchObject({ code: "UNAUTHENTICATED" });
    await expect(cache.get()).resolves.toContain(".");
    expect(calls).toBe(2);
  });
});

describe("errors", () => {
  const status = create(StatusSchema, {
    code: Code.InvalidArgument,
    message: "bad request",
    details: [
      anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason: "VALIDATION_FAILED", domain: "threadline.dev", metadata: { a: "1" } })),
      anyPack(BadRequestSchema, create(BadRequestSchema, { fieldViolations: [{ field: "thread.title", description: "too long" }] })),
    ],
  });

  test("a google.rpc.Status decodes to typed fields", () => {
    const error = fromStatus(status);
    expect(error.code).toBe("INVALID_ARGUMENT");
    expect(error.reason).toBe("VALIDATION_FAILED");
    expect(error.domain).toBe("threadline.dev");
    expect(error.metadata).toEqual({ a: "1" });
    expect(error.fieldViolations).toEqual([["thread.title", "too long"]]);
    expect(error.retryable).toBe(false);
  });

  test("a ConnectError's grpc-status-details-bin details decode the same way", () => {
    const retry = create(RetryInfoSchema, { retryDelay: durationFromMs(1500) });
    const info = create(ErrorInfoSchema, { reason: "RATE_LIMITED", metadata: { budget: "messages" } });
    const wire = new ConnectError("slow down", Code.ResourceExhausted);
    wire.details.push(
      { type: RetryInfoSchema.typeName, value: toBinary(RetryInfoSchema, retry) },
      { type: ErrorInfoSchema.typeName, value: toBinary(ErrorInfoSchema, info) },
      { type: "example.Unknown", value: new Uint8Array([1]) },
    );
    const error = fromConnectError(wire);
    expect(error.code).toBe("RESOURCE_EXHAUSTED");
    expect(error.retryAfter).toBe(1.5);
    expect(error.reason).toBe("RATE_LIMITED");
    expect(error.metadata["budget"]).toBe("messages");
    expect(error.details.at(-1)?.type).toBe("example.Unknown");
    expect(isRetryable(error)).toBe(true);
    expect(fromConnectError(error)).toBe(error);
  });

  test("transient codes are retryable; RESOURCE_EXHAUSTED only with a delay", () => {
    expect(isRetryable(makeError("UNAVAILABLE", "x"))).toBe(true);
    expect(isRetryable(makeError("DEADLINE_EXCEEDED", "x"))).toBe(true);
    expect(isRetryable(makeError("RESOURCE_EXHAUSTED", "too big"))).toBe(false);
    expect(isRetryable(makeError("PERMISSION_DENIED", "x"))).toBe(false);
    expect(isRetryable(new Error("x"))).toBe(false);
  });
});
