// The TypeScript SDK end to end in Node: real grpc-web through the Envoy edge to the real
// server (run by tests/e2e/test_web_sdk.py, which starts the server with short-lived tokens).
// Prints PASS, or fails with the first broken expectation.
import assert from "node:assert/strict";
import { ThreadlineClient, ThreadlineError, ThreadlineSession, type TokenProvider } from "../../clients/web/src/index.js";

const HTTP = process.env["HTTP_URL"] ?? "";
const EDGE = process.env["EDGE_URL"] ?? "";
const TOKEN_TTL_S = Number(process.env["TOKEN_TTL_S"] ?? "0");
const WAIT_MS = 60_000; // bounds a hung run only; nothing here races the clock

function devTokens(userId: string): TokenProvider {
  return async () => {
    const response = await fetch(`${HTTP}/auth/dev-token`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user_id: userId }),
    });
    assert.equal(response.status, 200, `dev token for ${userId}`);
    return ((await response.json()) as { token: string }).token;
  };
}

function session(userId: string): ThreadlineSession {
  return new ThreadlineSession(new ThreadlineClient({ baseUrl: EDGE, token: devTokens(userId) }), {
    clientName: "sdk-flow",
  });
}

async function expectError(call: Promise<unknown>, code: string): Promise<ThreadlineError> {
  try {
    await call;
  } catch (error) {
    assert.ok(error instanceof ThreadlineError, `a ThreadlineError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    return error;
  }
  throw new Error(`expected ${code}`);
}

function texts(s: ThreadlineSession, threadId: string): string[] {
  return (s.state.messages.byThread.get(threadId) ?? []).map((m) => m.text);
}

async function main(): Promise<void> {
  const alice = session("alice");
  const bob = session("bob");
  const carol = new ThreadlineClient({ baseUrl: EDGE, token: devTokens("carol") });
  alice.start();
  bob.start();
  await alice.waitConnection("online", WAIT_MS);
  await bob.waitConnection("online", WAIT_MS);

  // A thread through the stream; bob sees it appear.
  const thread = await alice.createThread("Plans", ["bob"]);
  await bob.waitUntil((s) => s.threads.byId.has(thread.id), WAIT_MS);

  // An optimistic send is confirmed in place: same object, same local id, now with a seq.
  const localId = alice.send(thread.id, "first");
  const pending = alice.store.message(localId);
  assert.equal(pending?.status, "pending");
  const outcome = await alice.waitOp(localId, WAIT_MS);
  assert.equal(outcome.status, "confirmed");
  assert.equal(alice.store.message(localId), pending, "confirmation keeps the object");
  assert.equal(pending?.status, "sent");
  assert.equal(pending?.seq, 1);
  await bob.waitUntil((s) => s.threads.byId.get(thread.id)?.unreadCount === 1, WAIT_MS);
  bob.markRead(thread.id);
  await bob.waitUntil((s) => s.threads.byId.get(thread.id)?.pending === false && s.threads.byId.get(thread.id)?.unreadCount === 0, WAIT_MS);

  // Typed errors from the server's google.rpc details, through grpc-web.
  const invalid = await expectError(alice.client.threads.createThread({ thread: { title: "x".repeat(5000) } }), "INVALID_ARGUMENT");
  assert.ok(invalid.fieldViolations.some(([field]) => field === "thread.title"), JSON.stringify(invalid.fieldViolations));
  assert.equal(invalid.reason, "FIELD_INVALID");
  const hidden = await expectError(carol.threads.getThread({ threadId: thread.id }), "NOT_FOUND");
  assert.ok(hidden.reason);

  // Offline: bob's sends queue in order; alice writes meanwhile. Back online, bob resumes from
  // his cursor (replay, not a reload) and his queued sends go out in order, each once.
  await bob.stop();
  const queued = ["b1", "b2", "b3"].map((text) => bob.send(thread.id, text));
  for (const text of ["a1", "a2"]) await alice.waitOp(alice.send(thread.id, text), WAIT_MS);
  bob.start();
  for (const id of queued) assert.equal((await bob.waitOp(id, WAIT_MS)).status, "confirmed");
  assert.equal(bob.state.sync.recovered, true, "resumed by replay");
  const expected = ["first", "a1", "a2", "b1", "b2", "b3"];
  await alice.waitUntil((s) => texts(alice, thread.id).length === expected.length, WAIT_MS);
  assert.deepEqual(texts(alice, thread.id), expected);
  assert.deepEqual(texts(bob, thread.id), expected);
  const seqs = queued.map((id) => bob.store.message(id)?.seq ?? 0);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "queued sends keep their order");

  // The stream outlives its token: RefreshAuth replaces it before expiry, no reconnect.
  const stream = bob.stream;
  assert.ok(stream);
  const firstExpiry = stream.tokenExpires ?? 0;
  let reconnects = 0;
  const unsubscribe = bob.store.subscribe((change) => {
    if (change.kind === "connection" && change.connection !== "online") reconnects += 1;
  });
  const deadline = Date.now() + WAIT_MS;
  while ((stream.tokenExpires ?? 0) <= firstExpiry && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
  assert.ok((stream.tokenExpires ?? 0) > firstExpiry, "the stream's token was refreshed");
  // Past the first token's expiry the same stream still works.
  while (Date.now() / 1000 < firstExpiry + 1) await new Promise((r) => setTimeout(r, 200));
  assert.equal(bob.stream, stream);
  assert.equal((await bob.waitOp(bob.send(thread.id, "after refresh"), WAIT_MS)).status, "confirmed");
  assert.equal(reconnects, 0, "no reconnect for a refresh");
  unsubscribe();
  assert.ok(TOKEN_TTL_S > 0);

  // A new device loads only the newest messages, then pages back through history in order.
  const late = new ThreadlineSession(new ThreadlineClient({ baseUrl: EDGE, token: devTokens("bob") }), { history: 3 });
  late.start();
  await late.waitConnection("online", WAIT_MS);
  const all = [...expected, "after refresh"];
  assert.deepEqual(texts(late, thread.id), all.slice(-3));
  while ((await late.loadMore(thread.id)) > 0);
  assert.deepEqual(texts(late, thread.id), all, "older pages merged in order, once");
  await late.stop();

  await alice.stop();
  await bob.stop();
  process.stdout.write("PASS\n");
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    process.exit(1);
  },
);
