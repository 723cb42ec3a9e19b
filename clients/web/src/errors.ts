/**
 * Typed SDK errors, decoded from gRPC statuses and their `google.rpc` error details.
 *
 * Every SDK call rejects with a `ThreadlineError`, never a raw `ConnectError`. The server puts a
 * `google.rpc.Status` in the `grpc-status-details-bin` trailer (and in `OperationResult.rejected`
 * and `StreamError.status` on the stream); its `ErrorInfo.reason` is the stable value to branch
 * on, and `BadRequest`, `RetryInfo` and the ErrorInfo metadata become typed fields. The same
 * shape as the Python SDK's `threadline_client.errors`.
 */
import { create, fromBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { anyUnpack, durationMs } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
  type BadRequest,
  type ErrorInfo,
  type RetryInfo,
} from "../../../gen/ts/google/rpc/error_details_pb.js";
import type { Status } from "../../../gen/ts/google/rpc/status_pb.js";

/** gRPC status code names, as the Python SDK and the server's docs spell them. */
export const CODE_NAMES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
] as const;
export type CodeName = (typeof CODE_NAMES)[number];

/** The name of a numeric gRPC code (unknown numbers are UNKNOWN, as in grpc). */
export function codeName(code: number): CodeName {
  return CODE_NAMES[code] ?? "UNKNOWN";
}

/** A decoded `google.rpc` detail the SDK knows; other details are kept raw. */
export type Detail =
  | { type: "google.rpc.ErrorInfo"; value: ErrorInfo }
  | { type: "google.rpc.RetryInfo"; value: RetryInfo }
  | { type: "google.rpc.BadRequest"; value: BadRequest }
  | { type: string; value: Uint8Array };

const KNOWN: readonly DescMessage[] = [ErrorInfoSchema, RetryInfoSchema, BadRequestSchema];

/** A failed Threadline call: a status code, a message and decoded error details. */
export class ThreadlineError extends Error {
  override name = "ThreadlineError";
  /** The gRPC status code name, e.g. `PERMISSION_DENIED`. */
  readonly code: CodeName;
  /** The status message, for people (never branch on it). */
  readonly rawMessage: string;
  /** The stable `ErrorInfo.reason` (e.g. `TOKEN_EXPIRED`), or null without an ErrorInfo. */
  readonly reason: string | null;
  /** `threadline.dev` for the server's own errors, or null. */
  readonly domain: string | null;
  /** The `ErrorInfo.metadata` (e.g. `current_version`, `budget`). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Seconds to wait before retrying, from `RetryInfo`, or null. */
  retryAfter: number | null;
  /** `[field, description]` pairs from `BadRequest` (INVALID_ARGUMENT). */
  readonly fieldViolations: readonly (readonly [string, string])[];
  /** ABORTED conflicts: the resource's version now, from ErrorInfo metadata, or null. */
  readonly currentVersion: number | null;
  readonly details: readonly Detail[];

  constructor(code: CodeName, message: string, details: readonly Detail[] = [], cause?: unknown) {
    super(`${code}: ${message}`, cause === undefined ? undefined : { cause });
    this.code = code;
    this.rawMessage = message;
    this.details = details;
    const info = find(details, "google.rpc.ErrorInfo") as ErrorInfo | undefined;
    this.reason = info?.reason ? info.reason : null;
    this.domain = info?.domain ? info.domain : null;
    this.metadata = { ...(info?.metadata ?? {}) };
    const retry = find(details, "google.rpc.RetryInfo") as RetryInfo | undefined;
    this.retryAfter = retry?.retryDelay ? durationMs(retry.retryDelay) / 1000 : null;
    const bad = find(details, "google.rpc.BadRequest") as BadRequest | undefined;
    this.fieldViolations = (bad?.fieldViolations ?? []).map((v) => [v.field, v.description]);
    const version = Number(this.metadata["current_version"]);
    this.currentVersion = this.metadata["current_version"] !== undefined && Number.isFinite(version) ? version : null;
    if (this.reason) this.message = `${this.message} [${this.reason}]`;
  }

  /** Whether the same request may be repeated (writes with the same `client_op_id`). */
  get retryable(): boolean {
    return isRetryable(this);
  }
}

function find(details: readonly Detail[], type: string): unknown {
  return details.find((d) => d.type === type)?.value;
}

/**
 * UNAVAILABLE and DEADLINE_EXCEEDED are transient. RESOURCE_EXHAUSTED is retryable only with a
 * RetryInfo delay (a message over the size limit would fail the same way again).
 */
export function isRetryable(error: unknown): boolean {
  if (!(error instanceof ThreadlineError)) return false;
  if (error.code === "UNAVAILABLE" || error.code === "DEADLINE_EXCEEDED") return true;
  return error.code === "RESOURCE_EXHAUSTED" && error.retryAfter !== null;
}

function decodeDetail(type: string, value: Uint8Array): Detail {
  for (const desc of KNOWN) {
    if (desc.typeName === type) {
      try {
        return { type, value: fromBinary(desc, value) } as Detail;
      } catch {
        break; // a detail that does not decode is kept raw rather than failing the mapping
      }
    }
  }
  return { type, value };
}

/** A `ThreadlineError` from a `google.rpc.Status` (`OperationResult.rejected`, `StreamError`). */
export function fromStatus(status: Status): ThreadlineError {
  const details = status.details.map((any) => {
    for (const desc of KNOWN) {
      const value = anyUnpack(any, desc);
      if (value !== undefined) return { type: desc.typeName, value } as Detail;
    }
    return { type: any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1), value: any.value };
  });
  return new ThreadlineError(codeName(status.code), status.message, details);
}

/** Maps anything a Connect-ES call throws to a `ThreadlineError` (idempotent). */
export function fromConnectError(error: unknown): ThreadlineError {
  if (error instanceof ThreadlineError) return error;
  const connect = ConnectError.from(error);
  const details: Detail[] = connect.details.map((d) =>
    "desc" in d ? { type: d.desc.typeName, value: new Uint8Array() } : decodeDetail(d.type, d.value),
  );
  return new ThreadlineError(codeName(connect.code), connect.rawMessage, details, error);
}

/** A local error with a code, e.g. for a token provider that failed. */
export function makeError(code: CodeName, message: string, reason?: string, cause?: unknown): ThreadlineError {
  const details: Detail[] = reason
    ? [{ type: "google.rpc.ErrorInfo", value: create(ErrorInfoSchema, { reason }) }]
    : [];
  return new ThreadlineError(code, message, details, cause);
}

/** Finds the first detail of a schema among a ThreadlineError's decoded details. */
export function detail<Desc extends DescMessage>(error: ThreadlineError, desc: Desc): MessageShape<Desc> | undefined {
  return find(error.details, desc.typeName) as MessageShape<Desc> | undefined;
}

