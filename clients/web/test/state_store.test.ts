// Unit tests of the TypeScript ClientStore for what the shared cases cannot express: object
// identity, notifications, the changes() iterator, toProto() payloads, OpError decoding details,
// snapshotView, and the store's own defaults.

import { create, equals } from "@bufbuild/protobuf";
import { anyPack, DurationSchema, FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import { describe, expect, test, vi } from "vitest";
import { ErrorInfoSchema, RetryInfoSchema } from "../../../gen/ts/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../../gen/ts/google/rpc/status_pb.js";
import { ResourceSnapshotSchema } from "../../../gen/ts/threadline/v1/errors_pb.js";
import { MessageSchema } from "../../../gen/ts/threadline/v1/message_pb.js";
import type { Message } from "../../../gen/ts/threadline/v1/message_pb.js";
import {
  EventKind,
  EventSchema,
  OperationKind,
  OperationResultSchema,
  OperationSchema,
  SendMessageSchema,
} from "../../../gen/ts/threadline/v1/realtime_pb.js";
import type { Event, Operation, SendMessage } from "../../../gen/ts/threadline/v1/realtime_pb.js";
import { ReadMarkerSchema, ThreadSchema, ThreadSummarySchema } from "../../../gen/ts/threadline/v1/thread_pb.js";
import type { Thread } from "../../../gen/ts/threadline/v1/thread_pb.js";
import {
  ChangeKind,
  ClientStore,
  MessageStatus,
  newOpId,
  OpError,
  PendingOp,
  snapshotView,
} from "../src/state/index.js";
import type { Change, Snapshot } from "../src/state/index.js";

const clock = { now: () => 1000 };

function thread(version = 1, lastSeq = 0, title = "Lunch"): Thread {
  return create(ThreadSchema, {
    id: "t1",
    title,
    participantIds: ["bob", "alice"],
    creatorId: "alice",
    lastSeq: BigInt(lastSeq),
    version: BigInt(version),
  });
}

function message(seq: number, text: string, opts: { version?: number; author?: string; deleted?: boolean } = {}): Message {
  return create(MessageSchema, {
    id: `m${seq}`,
    threadId: "t1",
    seq: BigInt(seq),
    authorId: opts.author ?? "bob",
    text,
    version: BigInt(opts.version ?? 1),
    deleted: opts.deleted ?? false,
  });
}

function messageEvent(changeSeq: number, m: Message, opId = "", kind = EventKind.MESSAGE_CREATED): Event {
  return create(EventSchema, {
    changeSeq: BigInt(changeSeq),
    kind,
    threadId: m.threadId,
    clientOpId: opId,
    payload: { case: "message", value: m },
  });
}

function snapshotOf(messages: Message[], t: Thread = thread(1, messages.length)): Snapshot {
  return {
    summaries: [create(ThreadSummarySchema, { thread: t })],
    messages: { t1: messages }, // a plain record, as the session builds it
  };
}

function loaded(...messages: Message[]): ClientStore {
  const store = new ClientStore({ userId: "alice", clock });
  store.applySnapshot(snapshotOf(messages), { epoch: "e1", changeSeq: 10 });
  return store;
}

describe("identity", () => {
  test("a confirmed send is the same object, updated in place", () => {
    const store = loaded(message(1, "hi"));
    const pending = store.queueSend("t1", "hello", { opId: "s1" });
    expect(pending.status).toBe(MessageStatus.PENDING);
    store.applyEvents([messageEvent(11, message(2, "hello", { author: "alice" }), "s1")]);
    const items = store.state.messages.byThread.get("t1") ?? [];
    expect(items[1]).toBe(pending);
    expect(store.message("m2")).toBe(pending);
    expect(store.message("s1")).toBe(pending);
    expect([pending.localId, pending.id, pending.seq, pending.status]).toEqual(["s1", "m2", 2, "sent"]);
  });

  test("messages and thread views survive a reload as the same objects", () => {
    const store = loaded(message(1, "a"), message(2, "b"));
    const first = store.message("m1");
    const view = store.thread("t1");
    store.applySnapshot(snapshotOf([message(1, "a!", { version: 2 }), message(2, "b")], thread(2, 2)), {
      epoch: "e1",
      changeSeq: 12n, // a SyncComplete cursor may be passed as it comes (bigint)
    });
    expect(store.message("m1")).toBe(first);
    expect(first?.text).toBe("a!");
    expect(store.thread("t1")).toBe(view);
    expect(store.state.sync.changeSeq).toBe(12);
  });

  test("a failed send is retried as the same object", () => {
    const store = loaded();
    const pending = store.queueSend("t1", "x", { opId: "s1" });
    store.applyResult(
      create(OperationResultSchema, {
        clientOpId: "s1",
        outcome: { case: "rejected", value: create(StatusSchema, { code: 3, message: "too long" }) },
      }),
    );
    expect(store.state.messages.failed[0]).toBe(pending);
    expect(store.retry("s1").opId).toBe("s1");
    expect(store.state.messages.byThread.get("t1")?.[0]).toBe(pending);
    expect(pending.status).toBe("pending");
  });
});

describe("notifications", () => {
  test("subscribers get each change once, in order, until they unsubscribe", () => {
    const store = loaded();
    const seen: Change[] = [];
    const unsubscribe = store.subscribe((c) => seen.push(c));
    store.queueSend("t1", "a", { opId: "s1" });
    store.setActiveThread("t1");
    expect(seen.map((c) => c.kind)).toEqual([ChangeKind.LOCAL, ChangeKind.UI]);
    expect(Object.isFrozen(seen[0])).toBe(true);
    unsubscribe();
    unsubscribe(); // harmless twice
    store.setActiveThread(null);
    expect(seen).toHaveLength(2);
  });

  test("ignored input notifies nothing and returns null", () => {
    const store = loaded(message(1, "a"));
    const callback = vi.fn();
    store.subscribe(callback);
    expect(store.applyEvents([messageEvent(10, message(2, "dup"))])).toBeNull();
    expect(store.applyEvents([messageEvent(11, message(1, "stale"))])).toBeNull();
    expect(callback).not.toHaveBeenCalled();
  });

  test("a failing subscriber is reported and does not stop the others", () => {
    const errors: unknown[] = [];
    const store = new ClientStore({ clock, onSubscriberError: (e) => errors.push(e) });
    const after = vi.fn();
    store.subscribe(() => {
      throw new Error("boom");
    });
    store.subscribe(after);
    store.setLoading("snapshot", true);
    expect(after).toHaveBeenCalledOnce();
    expect(String(errors[0])).toContain("boom");
  });

  test("changes() buffers every change from its first next() and is released on return()", async () => {
    const store = new ClientStore({ clock });
    const changes = store.changes();
    const first = changes.next();
    store.setLoading("a", true);
    store.setConnection("online");
    expect((await first).value?.kind).toBe(ChangeKind.UI);
    const second = await changes.next();
    expect(second.value?.connection).toBe("online");
    const pendingNext = changes.next();
    await changes.return?.();
    expect((await pendingNext).done).toBe(true);
    store.setLoading("b", true);
    expect((await changes.next()).done).toBe(true);
  });

  test("concurrent next() calls each get their own change, in order", async () => {
    const store = new ClientStore({ clock });
    const changes = store.changes();
    const a = changes.next();
    const b = changes.next();
    store.setActiveThread("t1");
    store.setConnection("online");
    expect([(await a).value?.kind, (await b).value?.kind]).toEqual(["ui", "connection"]);
  });

  test("for await over changes() ends when the loop breaks", async () => {
    const store = new ClientStore({ clock });
    const kinds: string[] = [];
    const loop = (async () => {
      for await (const change of store.changes()) {
        kinds.push(change.kind);
        if (kinds.length === 2) break;
      }
    })();
    await Promise.resolve(); // let the loop register its buffer
    store.setActiveThread("t1");
    store.setConnection("syncing");
    await loop;
    expect(kinds).toEqual(["ui", "connection"]);
  });
});

describe("toProto", () => {
  const store = () => {
    const s = loaded(message(1, "hi", { author: "alice" }));
    return s;
  };

  test("a send is a SendMessage", () => {
    const s = store();
    s.queueSend("t1", "hello", { opId: "s1" });
    const payload = s.pendingOp("s1")?.toProto() as SendMessage;
    expect(equals(SendMessageSchema, payload, create(SendMessageSchema, { clientOpId: "s1", threadId: "t1", text: "hello" }))).toBe(true);
  });

  test("edits, deletes, thread updates, creates and mark-reads are Operations", () => {
    const s = store();
    const edit = s.queueEdit("m1", "new", { opId: "e1" }).toProto() as Operation;
    expect(
      equals(
        OperationSchema,
        edit,
        create(OperationSchema, {
          clientOpId: "e1",
          kind: OperationKind.UPDATE,
          baseVersion: 1n,
          updateMask: create(FieldMaskSchema, { paths: ["text"] }),
          resource: { case: "message", value: create(MessageSchema, { id: "m1", threadId: "t1", text: "new" }) },
        }),
      ),
    ).toBe(true);

    const del = s.queueDelete("m1", { opId: "d1", baseVersion: 7 }).toProto() as Operation;
    expect(del.kind).toBe(OperationKind.DELETE);
    expect(del.baseVersion).toBe(7n);
    expect(del.updateMask).toBeUndefined();
    expect(del.resource).toEqual({ case: "message", value: create(MessageSchema, { id: "m1", threadId: "t1" }) });

    const update = s.queueThreadUpdate("t1", { title: "T", tags: ["x"], archived: true }, { opId: "u1" }).toProto() as Operation;
    expect(update.kind).toBe(OperationKind.UPDATE);
    expect(update.updateMask?.paths).toEqual(["archived", "tags", "title"]);
    expect(
      equals(ThreadSchema, update.resource.value as Thread, create(ThreadSchema, { id: "t1", title: "T", tags: ["x"], archived: true })),
    ).toBe(true);

    const read = s.queueMarkRead("t1", 1, { opId: "r1" })?.toProto() as Operation;
    expect(read.updateMask?.paths).toEqual(["read_seq"]);
    expect(read.baseVersion).toBe(0n);
    expect(read.resource).toEqual({ case: "readMarker", value: create(ReadMarkerSchema, { threadId: "t1", readSeq: 1n }) });

    const made = s.queueCreateThread("Trip", ["bob"], { description: "d", tags: ["go"], opId: "c1" }).toProto() as Operation;
    expect(made.kind).toBe(OperationKind.CREATE);
    expect(made.updateMask).toBeUndefined();
    expect(
      equals(
        ThreadSchema,
        made.resource.value as Thread,
        create(ThreadSchema, { title: "Trip", description: "d", tags: ["go"], participantIds: ["bob"] }),
      ),
    ).toBe(true);
  });

  test("PendingOp can be built directly", () => {
    const op = new PendingOp({ opId: "x", kind: "mark_read", threadId: "t9", readSeq: 4 });
    expect((op.toProto() as Operation).resource.value).toEqual(create(ReadMarkerSchema, { threadId: "t9", readSeq: 4n }));
  });
});

describe("errors and sync", () => {
  test("OpError.fromStatus decodes packed details; toString names code and reason", () => {
    const status = create(StatusSchema, {
      code: 8,
      message: "slow down",
      details: [
        anyPack(RetryInfoSchema, create(RetryInfoSchema, { retryDelay: create(DurationSchema, { seconds: 2n, nanos: 500_000_000 }) })),
        anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason: "RATE_LIMITED", domain: "threadline.dev" })),
      ],
    });
    const error = OpError.fromStatus(status);
    expect([error.code, error.reason, error.retryAfter]).toEqual(["RESOURCE_EXHAUSTED", "RATE_LIMITED", 2.5]);
    expect(String(error)).toBe("RESOURCE_EXHAUSTED: slow down [RATE_LIMITED]");
    expect(String(new OpError("UNKNOWN", null, "x"))).toBe("UNKNOWN: x");
  });

  test("syncState() carries the cursor, thread seqs, sent op ids and the sync time", () => {
    const store = new ClientStore({ userId: "alice", clock: { now: () => 1700000000.25 } });
    store.applySnapshot(snapshotOf([message(1, "a"), message(2, "b")]), { epoch: "e1", changeSeq: 10 });
    const sent = store.queueSend("t1", "x", { opId: "s1" });
    store.markSent(sent.localId);
    const state = store.syncState();
    expect([state.epoch, state.changeSeq, state.threadSeqs, state.pendingOpIds]).toEqual(["e1", 10n, { t1: 2n }, ["s1"]]);
    // As Python's Timestamp.FromNanoseconds(int(t * 1e9)): the float product, truncated.
    expect([state.lastSyncedAt?.seconds, state.lastSyncedAt?.nanos]).toEqual([1700000000n, 249_999_872]);
    store.invalidateSync();
    expect(store.resumeState()).toBeNull();
  });

  test("a conflict's info exposes the resources and fields", () => {
    const store = loaded();
    const op = store.queueThreadUpdate("t1", { title: "Mine" }, { opId: "u1" });
    const change = store.applyResult(
      create(OperationResultSchema, {
        clientOpId: "u1",
        outcome: {
          case: "conflict",
          value: {
            base: create(ResourceSnapshotSchema, { resource: { case: "thread", value: thread() } }),
            server: create(ResourceSnapshotSchema, { resource: { case: "thread", value: thread(2, 0, "Theirs") } }),
            client: create(ResourceSnapshotSchema, { resource: { case: "thread", value: thread(1, 0, "Mine") } }),
            serverVersion: 2n,
            fields: ["title"],
          },
        },
      }),
    );
    const info = change?.outcomes[0]?.conflict;
    expect(info?.op).toBe(op);
    expect([info?.resource, info?.fields, info?.serverVersion]).toEqual(["thread", ["title"], 2]);
    expect((info?.server as Thread).title).toBe("Theirs");
    expect((info?.client as Thread).title).toBe("Mine");
    expect((info?.base as Thread).version).toBe(1n);
  });
});

describe("views and defaults", () => {
  test("snapshotView of a caught-up client equals that of a fresh snapshot", () => {
    const store = loaded(message(1, "a"));
    store.applyEvents([
      messageEvent(11, message(2, "b")),
      messageEvent(12, message(1, "", { version: 2, deleted: true }), "", EventKind.MESSAGE_DELETED),
      create(EventSchema, { changeSeq: 13n, kind: EventKind.THREAD_UPDATED, threadId: "t1", payload: { case: "thread", value: thread(2, 2, "Renamed") } }),
    ]);
    store.queueSend("t1", "pending only"); // overlays are not part of the view
    const fresh: Snapshot = {
      summaries: [create(ThreadSummarySchema, { thread: thread(2, 2, "Renamed") })],
      messages: new Map([["t1", [message(1, "", { version: 2, deleted: true }), message(2, "b")]]]),
    };
    expect(snapshotView(store.state)).toEqual(snapshotView(fresh));
    expect(snapshotView(fresh).messages.get("t1")).toEqual([
      { id: "m1", seq: 1, text: "", deleted: true, version: 2 },
      { id: "m2", seq: 2, text: "b", deleted: false, version: 1 },
    ]);
  });

  test("fresh op ids are 32 hex characters and differ", () => {
    const a = newOpId();
    expect(a).toMatch(/^[0-9a-f]{32}$/);
    expect(newOpId()).not.toBe(a);
    const store = loaded();
    expect(store.queueSend("t1", "x").localId).toMatch(/^[0-9a-f]{32}$/);
  });

  test("without a clock the store uses wall time", () => {
    const store = new ClientStore();
    const before = Date.now() / 1000;
    store.applySnapshot({ summaries: [], messages: {} }, { epoch: "", changeSeq: 0 });
    expect(store.state.sync.lastSyncedAt).toBeGreaterThanOrEqual(before - 1);
    expect(ClientStore.fromSnapshot(snapshotOf([]), { userId: "u", epoch: "e", changeSeq: 3 }).state.sync.changeSeq).toBe(3);
  });
});
