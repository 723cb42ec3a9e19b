// The TypeScript driver of the language-neutral client-state cases (tests/cases/client_state):
// loads the case files, runs their steps against a ClientStore as the session drives it, and
// checks expectations with the projection. The Python driver (tests/unit/client_state_cases.py)
// runs the same files; see tests/cases/client_state/README.md for the format.

import { readdirSync, readFileSync } from "node:fs";
import { fromJson, createRegistry } from "@bufbuild/protobuf";
import type { JsonValue } from "@bufbuild/protobuf";
import { file_google_rpc_error_details } from "../../../gen/ts/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../../gen/ts/google/rpc/status_pb.js";
import { MessageSchema } from "../../../gen/ts/threadline/v1/message_pb.js";
import type { Message } from "../../../gen/ts/threadline/v1/message_pb.js";
import { ResyncReason, ServerFrameSchema } from "../../../gen/ts/threadline/v1/realtime_pb.js";
import { ThreadSummarySchema } from "../../../gen/ts/threadline/v1/thread_pb.js";
import { GetMeResponseSchema } from "../../../gen/ts/threadline/v1/user_service_pb.js";
import {
  ClientStore,
  ConnectionState,
  InvalidOperationError,
  OpError,
  UnknownItemError,
} from "../src/state/index.js";
import type { Change, Snapshot, StoreClock, ThreadFields } from "../src/state/index.js";
import { mismatches, project, projectChange, PROJECTION_KEYS, RUNNER_KEYS } from "./state_projection.js";
import type { Json } from "./state_projection.js";

export const CASES_DIR = new URL("../../../tests/cases/client_state/", import.meta.url);

/** Decodes the Any details of statuses (ErrorInfo, RetryInfo, BadRequest). */
const registry = createRegistry(file_google_rpc_error_details);

export const STEP_KINDS: ReadonlySet<string> = new Set([
  "server",
  "snapshot",
  "history",
  "joined",
  "local",
  "clock",
  "expect",
]);
const STEP_EXTRAS: Readonly<Record<string, readonly string[]>> = {
  snapshot: ["epoch", "change_seq"],
  local: ["raises"],
};
export const SERVER_KINDS: ReadonlySet<string> = new Set([
  "welcome",
  "events",
  "operation_result",
  "sync_complete",
  "resync_required",
]);
/** Action -> [required arguments, optional arguments]. */
export const LOCAL_ACTIONS: Readonly<Record<string, readonly [readonly string[], readonly string[]]>> = {
  send: [["thread_id", "text"], ["op_id", "attachment_ids"]],
  edit: [["message", "text"], ["base_version", "op_id"]],
  delete: [["message"], ["base_version", "op_id"]],
  update_thread: [["thread_id", "fields"], ["base_version", "op_id"]],
  mark_read: [["thread_id", "read_seq"], ["op_id"]],
  create_thread: [["title"], ["participant_ids", "description", "tags", "op_id"]],
  mark_sent: [["op_id"], []],
  defer: [["op_id", "delay", "error"], []],
  fail: [["op_id", "error"], []],
  retry: [["local_id"], []],
  dismiss_failed: [["local_id"], []],
  set_connection: [["connection"], []],
  set_active_thread: [["thread_id"], []],
  set_loading: [["key", "loading"], []],
  add_error: [["source", "error"], []],
  invalidate_sync: [[], []],
};
const RAISES: Readonly<Record<string, new (...args: never[]) => Error>> = {
  unknown: UnknownItemError,
  invalid: InvalidOperationError,
};
const CASE_KEYS = new Set(["name", "description", "user_id", "clock", "from_snapshot", "steps"]);
// JSON frame field (camelCase oneof case) -> the proto field name used by the cases and Python.
const FRAME_KINDS: Readonly<Record<string, string>> = {
  welcome: "welcome",
  events: "events",
  operationResult: "operation_result",
  syncComplete: "sync_complete",
  resyncRequired: "resync_required",
  pong: "pong",
  error: "error",
  authRefreshed: "auth_refreshed",
};

type JsonObject = { [key: string]: Json };

/** A case file that does not follow the format (never skipped: it fails the run). */
export class CaseError extends Error {
  override name = "CaseError";
}

export interface Case {
  readonly file: string;
  readonly name: string;
  readonly data: JsonObject;
}

function isObject(value: Json | undefined): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function asObject(value: Json | undefined, what: string): JsonObject {
  if (!isObject(value)) throw new CaseError(`${what} must be an object`);
  return value;
}

function asList(value: Json | undefined, what: string): Json[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new CaseError(`${what} must be a list`);
  return value;
}

function str(value: Json | undefined, what: string): string {
  if (typeof value !== "string") throw new CaseError(`${what} must be a string`);
  return value;
}

function num(value: Json | undefined, what: string): number {
  if (typeof value !== "number") throw new CaseError(`${what} must be a number`);
  return value;
}

function optStr(value: Json | undefined): string | undefined {
  return typeof value === "string" ? value : undefined;
}

function optNum(value: Json | undefined): number | undefined {
  return typeof value === "number" ? value : undefined;
}

function strings(value: Json | undefined, what: string): string[] {
  return asList(value, what).map((v) => str(v, what));
}

/** Every case of every `*.json` file in the cases directory, in file and case order. */
export function loadCases(): Case[] {
  const cases: Case[] = [];
  const files = readdirSync(CASES_DIR)
    .filter((f) => f.endsWith(".json"))
    .sort();
  for (const file of files) {
    const document = JSON.parse(readFileSync(new URL(file, CASES_DIR), "utf8")) as Json;
    if (!isObject(document) || !Array.isArray(document["cases"])) {
      throw new CaseError(`${file}: expected an object with a 'cases' list`);
    }
    for (const item of document["cases"]) {
      if (!isObject(item) || typeof item["name"] !== "string") {
        throw new CaseError(`${file}: every case needs a 'name'`);
      }
      cases.push({ file, name: item["name"], data: item });
    }
  }
  return cases;
}

// -- parsing --------------------------------------------------------------------------------------

function parseMessages(value: Json | undefined): Message[] {
  return asList(value, "messages").map((m) => fromJson(MessageSchema, m as JsonValue));
}

function parseSnapshot(value: Json | undefined): Snapshot {
  const snap = asObject(value, "a snapshot");
  const unknown = Object.keys(snap).filter((k) => !["summaries", "messages", "me"].includes(k));
  if (unknown.length) throw new CaseError(`unknown snapshot keys ${JSON.stringify(unknown)}`);
  const summaries = asList(snap["summaries"], "summaries").map((s) =>
    fromJson(ThreadSummarySchema, s as JsonValue),
  );
  const messages = new Map<string, Message[]>();
  for (const [tid, items] of Object.entries(asObject(snap["messages"] ?? {}, "messages"))) {
    messages.set(tid, parseMessages(items));
  }
  const me = snap["me"];
  return { summaries, messages, me: me ? fromJson(GetMeResponseSchema, me as JsonValue) : null };
}

function parseFrame(value: Json | undefined) {
  return fromJson(ServerFrameSchema, value as JsonValue, { registry });
}

function frameKind(caseName: string | undefined): string {
  return caseName === undefined ? "none" : (FRAME_KINDS[caseName] ?? caseName);
}

function opError(value: Json | undefined): OpError {
  return OpError.fromStatus(fromJson(StatusSchema, value as JsonValue, { registry }));
}

function checkStep(step: Json): [string, JsonObject] {
  const s = asObject(step, "a step");
  const kinds = Object.keys(s).filter((k) => STEP_KINDS.has(k));
  const kind = kinds[0];
  if (kinds.length !== 1 || kind === undefined) {
    throw new CaseError(`a step needs exactly one of ${JSON.stringify([...STEP_KINDS].sort())}`);
  }
  const allowed = new Set([kind, ...(STEP_EXTRAS[kind] ?? [])]);
  const extra = Object.keys(s).filter((k) => !allowed.has(k));
  if (extra.length) throw new CaseError(`unknown keys ${JSON.stringify(extra)} in a ${kind} step`);
  return [kind, s];
}

// -- the driver -----------------------------------------------------------------------------------

/** Runs one case's steps against a store, as the session would drive it. */
export class Driver {
  readonly store: ClientStore;
  private readonly changes: Change[] = [];
  private returned: Json = null;
  private now: number;

  constructor(readonly testCase: Case) {
    const data = testCase.data;
    const unknown = Object.keys(data).filter((k) => !CASE_KEYS.has(k));
    if (unknown.length) throw new CaseError(`unknown case keys ${JSON.stringify(unknown)}`);
    this.now = optNum(data["clock"]) ?? 1000;
    const clock: StoreClock = { now: () => this.now, monotonic: () => this.now };
    const userId = optStr(data["user_id"]) ?? "";
    const initial = data["from_snapshot"];
    if (initial !== undefined && initial !== null) {
      const init = asObject(initial, "from_snapshot");
      this.store = ClientStore.fromSnapshot(parseSnapshot(init["snapshot"]), {
        epoch: optStr(init["epoch"]) ?? "",
        changeSeq: optNum(init["change_seq"]) ?? 0,
        userId,
        clock,
      });
    } else {
      this.store = new ClientStore({ userId, clock });
    }
    this.store.subscribe((change) => this.changes.push(change));
  }

  run(): void {
    const steps = asList(this.testCase.data["steps"], "steps");
    if (!steps.length) throw new CaseError("a case needs a non-empty 'steps' list");
    steps.forEach((step, index) => {
      try {
        this.step(step);
      } catch (error) {
        const text = error instanceof Error ? error.message : String(error);
        const wrapped = new Error(`step ${index}: ${text}`);
        wrapped.name = error instanceof Error ? error.name : "Error";
        throw wrapped;
      }
    });
  }

  private step(step: Json): void {
    const [kind, s] = checkStep(step);
    const value = s[kind];
    const store = this.store;
    switch (kind) {
      case "server":
        return this.server(value);
      case "snapshot":
        store.applySnapshot(parseSnapshot(value), {
          epoch: optStr(s["epoch"]) ?? "",
          changeSeq: optNum(s["change_seq"]) ?? 0,
        });
        return;
      case "history": {
        const h = asObject(value, "history");
        store.applyHistory(str(h["thread_id"], "thread_id"), parseMessages(h["messages"]));
        return;
      }
      case "joined": {
        const j = asObject(value, "joined");
        store.applyJoined(fromJson(ThreadSummarySchema, j["summary"] as JsonValue), parseMessages(j["messages"]));
        return;
      }
      case "local":
        return this.local(value, s["raises"]);
      case "clock":
        this.now = num(value, "clock");
        return;
      default:
        return this.expect(value);
    }
  }

  private server(value: Json | undefined): void {
    const frame = parseFrame(value);
    const store = this.store;
    const k = frame.kind;
    switch (k.case) {
      case "welcome":
        return store.applyWelcome(k.value);
      case "events":
        store.applyEvents(k.value.events, { replay: k.value.replay });
        return;
      case "operationResult":
        store.applyResult(k.value);
        return;
      case "syncComplete":
        return store.applySyncComplete(k.value);
      case "resyncRequired":
        // As the session: a slow consumer resumes from its cursor; the others must reload.
        if (k.value.reason !== ResyncReason.SLOW_CONSUMER) store.noteResync(k.value);
        return;
      default:
        throw new CaseError(`server frame kind '${frameKind(k.case)}' does not reach the store`);
    }
  }

  private local(value: Json | undefined, raises: Json | undefined): void {
    const v = asObject(value, "a local step");
    const action = str(v["action"], "a local step's 'action'");
    const spec = LOCAL_ACTIONS[action];
    if (spec === undefined) throw new CaseError(`unknown local action '${action}'`);
    const [required, optional] = spec;
    const args: JsonObject = { ...v };
    delete args["action"];
    const missing = required.filter((k) => !Object.hasOwn(args, k));
    const unknown = Object.keys(args).filter((k) => !required.includes(k) && !optional.includes(k));
    if (missing.length || unknown.length) {
      throw new CaseError(`${action}: missing ${JSON.stringify(missing)}, unknown ${JSON.stringify(unknown)}`);
    }
    if (raises !== undefined && raises !== null) {
      const errorClass = RAISES[str(raises, "raises")];
      if (errorClass === undefined) throw new CaseError(`unknown 'raises' ${JSON.stringify(raises)}`);
      let thrown: unknown = undefined;
      try {
        this.act(action, args);
      } catch (error) {
        thrown = error;
      }
      if (!(thrown instanceof errorClass)) {
        throw new Error(`${action}: expected ${errorClass.name}, got ${String(thrown)}`);
      }
      this.returned = null;
      return;
    }
    this.returned = this.act(action, args);
  }

  private act(action: string, a: JsonObject): Json {
    const store = this.store;
    const opId = optStr(a["op_id"]);
    const baseVersion = optNum(a["base_version"]);
    switch (action) {
      case "send":
        return store.queueSend(str(a["thread_id"], "thread_id"), str(a["text"], "text"), {
          opId,
          attachmentIds: a["attachment_ids"] === undefined ? [] : strings(a["attachment_ids"], "attachment_ids"),
        }).localId;
      case "edit":
        return store.queueEdit(str(a["message"], "message"), str(a["text"], "text"), { baseVersion, opId }).opId;
      case "delete":
        return store.queueDelete(str(a["message"], "message"), { baseVersion, opId }).opId;
      case "update_thread": {
        // The case's object as given (unknown names included): the store validates it.
        const fields = asObject(a["fields"], "fields") as ThreadFields;
        return store.queueThreadUpdate(str(a["thread_id"], "thread_id"), fields, { baseVersion, opId }).opId;
      }
      case "mark_read":
        return store.queueMarkRead(str(a["thread_id"], "thread_id"), num(a["read_seq"], "read_seq"), { opId })?.opId ?? null;
      case "create_thread":
        return store.queueCreateThread(str(a["title"], "title"), strings(a["participant_ids"], "participant_ids"), {
          description: optStr(a["description"]) ?? "",
          tags: strings(a["tags"], "tags"),
          opId,
        }).opId;
      case "mark_sent":
        store.markSent(str(a["op_id"], "op_id"));
        return null;
      case "defer":
        store.defer(str(a["op_id"], "op_id"), num(a["delay"], "delay"), opError(a["error"]));
        return null;
      case "fail":
        store.fail(str(a["op_id"], "op_id"), opError(a["error"]));
        return null;
      case "retry":
        return store.retry(str(a["local_id"], "local_id")).opId;
      case "dismiss_failed":
        store.dismissFailed(str(a["local_id"], "local_id"));
        return null;
      case "set_connection": {
        const connection = str(a["connection"], "connection");
        const known: readonly string[] = Object.values(ConnectionState);
        if (!known.includes(connection)) throw new CaseError(`unknown connection '${connection}'`);
        store.setConnection(connection as ConnectionState);
        return null;
      }
      case "set_active_thread":
        store.setActiveThread(a["thread_id"] === null ? null : str(a["thread_id"], "thread_id"));
        return null;
      case "set_loading":
        store.setLoading(str(a["key"], "key"), Boolean(a["loading"]));
        return null;
      case "add_error":
        store.addError(str(a["source"], "source"), opError(a["error"]));
        return null;
      case "invalidate_sync":
        store.invalidateSync();
        return null;
      default:
        throw new CaseError(`unknown local action '${action}'`);
    }
  }

  private expect(value: Json | undefined): void {
    const expected = asObject(value, "'expect'");
    const actual = project(this.store);
    actual["changes"] = this.changes.map(projectChange);
    const last = this.changes[this.changes.length - 1];
    actual["change"] = last !== undefined ? projectChange(last) : null;
    actual["returned"] = this.returned;
    this.changes.length = 0;
    const problems = mismatches(expected, actual, "expect");
    if (problems.length) throw new Error(problems.join("\n"));
  }
}

/** Runs a case; throws on the first failing step. */
export function runCase(testCase: Case): void {
  new Driver(testCase).run();
}

// -- static checks --------------------------------------------------------------------------------

export interface Survey {
  steps: Set<string>;
  actions: Set<string>;
  frames: Set<string>;
}

/** Checks a case's structure without running it; throws CaseError on anything unknown. */
export function survey(testCase: Case): Survey {
  const id = `${testCase.file}::${testCase.name}`;
  const data = testCase.data;
  const unknown = Object.keys(data).filter((k) => !CASE_KEYS.has(k));
  if (unknown.length) throw new CaseError(`${id}: unknown case keys ${JSON.stringify(unknown)}`);
  const steps = asList(data["steps"], "steps");
  if (!steps.length) throw new CaseError(`${id}: a case needs a non-empty 'steps' list`);
  const initial = data["from_snapshot"];
  if (initial !== undefined && initial !== null) parseSnapshot(asObject(initial, "from_snapshot")["snapshot"]);
  const out: Survey = { steps: new Set(), actions: new Set(), frames: new Set() };
  steps.forEach((step, index) => {
    const where = `${id} step ${index}`;
    let kind: string;
    let s: JsonObject;
    try {
      [kind, s] = checkStep(step);
    } catch (error) {
      throw new CaseError(`${where}: ${error instanceof Error ? error.message : String(error)}`);
    }
    out.steps.add(kind);
    const value = s[kind];
    if (kind === "server") {
      const name = frameKind(parseFrame(value).kind.case);
      if (!SERVER_KINDS.has(name)) throw new CaseError(`${where}: server frame kind '${name}' is not handled`);
      out.frames.add(name);
    } else if (kind === "local") {
      const action = isObject(value) ? value["action"] : undefined;
      if (typeof action !== "string" || LOCAL_ACTIONS[action] === undefined) {
        throw new CaseError(`${where}: unknown local action ${JSON.stringify(action ?? null)}`);
      }
      out.actions.add(action);
      const raises = s["raises"];
      if (raises !== undefined && raises !== null && (typeof raises !== "string" || !(raises in RAISES))) {
        throw new CaseError(`${where}: unknown 'raises' ${JSON.stringify(raises)}`);
      }
    } else if (kind === "snapshot") {
      parseSnapshot(value);
    } else if (kind === "expect") {
      const keys = Object.keys(asObject(value, `${where}: 'expect'`));
      if (!keys.length) throw new CaseError(`${where}: 'expect' must be a non-empty object`);
      const bad = keys.filter((k) => !PROJECTION_KEYS.has(k) && !RUNNER_KEYS.has(k));
      if (bad.length) throw new CaseError(`${where}: unknown projection keys ${JSON.stringify(bad)}`);
    }
  });
  return out;
}
