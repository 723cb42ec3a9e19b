// grpc-web clients for bench/edge_bench.py: N subscribers, each a `Subscribe` (server stream)
// opened with a Hello through the Envoy edge, and one sender posting with unary `Submit`, all
// over Connect-ES's createGrpcWebTransport (the transport the TypeScript SDK uses; browsers
// have no client streaming over grpc-web). Run by the bench, not by hand:
//
//   node_modules/.bin/tsx bench/web/edge_clients.ts
//
// stdin, one JSON object a line: first the Config, then Commands; stdout, one JSON object a
// line: {"event":"ready"} once every subscriber has had Welcome and SyncComplete, then one
// PhaseResult per phase command. Diagnostics go to stderr.
//
// The scheme matches bench/edge_bench.py's native clients exactly: participant 0 sends (and is
// subscribed too, so each message is N deliveries); a message's text starts with its sequence
// number and its send time (µs on this process's monotonic clock), which the subscriber that
// receives it subtracts from its own clock.

import { setMaxListeners } from "node:events";
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { EventKind, type ServerFrame } from "../../gen/ts/threadline/v1/realtime_pb.js";
import { RealtimeService } from "../../gen/ts/threadline/v1/realtime_service_pb.js";

interface Config {
  baseUrl: string;
  threadId: string;
  tokens: string[]; // one per participant; tokens[0] is the sender's
  filler: string; // the text after the "<seq> <µs> " header
  opPrefix: string;
}

interface PhaseCommand {
  cmd: "phase";
  name: string;
  rate: number; // messages/s on a fixed schedule; 0 with `window` > 0: closed loop
  count: number; // messages (fixed-rate phases)
  seconds: number; // how long a closed-loop phase keeps sending
  window: number; // closed loop: messages not yet delivered to every subscriber, at most
  firstSeq: number;
  timeoutS: number;
}

/** The bare hop: `count` Submit{ping} calls one at a time (no session: no ping cap, no DB). */
interface PingCommand {
  cmd: "ping";
  name: string;
  count: number;
  timeoutS: number;
}

/** Everything connected, nothing sent, for `seconds`: the idle cost. */
interface IdleCommand {
  cmd: "idle";
  name: string;
  seconds: number;
}

interface ExitCommand {
  cmd: "exit";
}

type Command = PhaseCommand | PingCommand | IdleCommand | ExitCommand;

interface PhaseResult {
  event: "done";
  name: string;
  messages: number;
  deliveries: number;
  frames: number;
  offered_s: number;
  acked_s: number;
  delivered_s: number;
  wall_s: number;
  ack_ms: number[];
  deliver_ms: number[];
  client_cpu_s: number;
  error: string;
}

const SEQ_DIGITS = 8;
const TIME_DIGITS = 13;

function emit(obj: object): void {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function log(msg: string): void {
  process.stderr.write(`edge_clients: ${msg}\n`);
}

function nowUs(): number {
  return Math.round(performance.now() * 1000);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits for `p` or `ms`, whichever comes first, leaving no timer behind. */
async function race(p: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([p, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Deliveries as the subscribers see them, for the current phase. */
class Tracker {
  expectPerMessage: number;
  counts = new Map<number, number>();
  deliveries = 0;
  frames = 0;
  latenciesMs: number[] = [];
  last = 0; // performance.now() of the last delivery
  failed = "";
  expect = Number.POSITIVE_INFINITY; // total deliveries the phase waits for
  /** Resolves once the run has failed (a stream ended, a send was refused, a timeout). */
  readonly failure: Promise<void>;
  private resolveFailure: () => void = () => undefined;
  private waiters: (() => void)[] = [];
  private completeWaiters: (() => void)[] = [];

  constructor(subscribers: number) {
    this.expectPerMessage = subscribers;
    this.failure = new Promise<void>((r) => {
      this.resolveFailure = r;
    });
  }

  reset(): void {
    this.counts.clear();
    this.deliveries = 0;
    this.frames = 0;
    this.latenciesMs = [];
    this.last = 0;
    this.expect = Number.POSITIVE_INFINITY;
  }

  fail(why: string): void {
    if (!this.failed) this.failed = why;
    this.resolveFailure();
    this.wake();
    this.wakeComplete();
  }

  /** One subscriber got message `seq`. */
  deliver(seq: number, sentUs: number, now: number): void {
    this.latenciesMs.push(now - sentUs / 1000);
    this.deliveries++;
    this.last = now;
    const got = (this.counts.get(seq) ?? 0) + 1;
    if (got >= this.expectPerMessage) {
      this.counts.delete(seq);
      this.wakeComplete();
    } else {
      this.counts.set(seq, got);
    }
    if (this.deliveries >= this.expect) this.wake();
  }

  /** Messages sent but not yet delivered to every subscriber (for the closed loop). */
  get incomplete(): number {
    return this.counts.size;
  }

  async allDelivered(timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    while (this.deliveries < this.expect && !this.failed) {
      const left = deadline - performance.now();
      if (left <= 0) {
        this.fail(`timed out with ${this.deliveries} of ${this.expect} deliveries`);
        break;
      }
      await race(new Promise<void>((r) => this.waiters.push(r)), left);
    }
  }

  /** Resolves when some message completes (or the phase fails). */
  nextComplete(): Promise<void> {
    return new Promise<void>((r) => this.completeWaiters.push(r));
  }

  private wake(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w();
  }

  private wakeComplete(): void {
    const ws = this.completeWaiters;
    this.completeWaiters = [];
    for (const w of ws) w();
  }
}

type Realtime = Client<typeof RealtimeService>;

function bearer(token: string): Record<string, string> {
  return { authorization: `Bearer ${token}` };
}

/** One subscriber: Subscribe with a Hello, then every pushed frame until aborted. */
async function subscribe(
  client: Realtime,
  token: string,
  tracker: Tracker,
  signal: AbortSignal,
  onReady: (sessionId: string) => void,
): Promise<void> {
  let sessionId = "";
  let synced = false;
  try {
    const stream = client.subscribe(
      { hello: { clientName: "edge-bench", clientVersion: "1" } },
      { headers: bearer(token), signal },
    );
    for await (const response of stream) {
      const now = performance.now();
      const frame: ServerFrame | undefined = response.frame;
      if (frame === undefined) continue;
      const kind = frame.kind;
      switch (kind.case) {
        case "welcome":
          sessionId = kind.value.sessionId;
          break;
        case "syncComplete":
          if (!synced) {
            synced = true;
            onReady(sessionId);
          }
          break;
        case "events":
          if (!synced) break; // the snapshot
          {
            let counted = false; // frames that carry message events (not presence alone)
            for (const event of kind.value.events) {
              if (event.kind !== EventKind.MESSAGE_CREATED || event.payload.case !== "message") {
                continue;
              }
              if (!counted) {
                tracker.frames++;
                counted = true;
              }
              const text = event.payload.value.text;
              const seq = Number.parseInt(text.slice(0, SEQ_DIGITS), 10);
              const sent = Number.parseInt(
                text.slice(SEQ_DIGITS + 1, SEQ_DIGITS + 1 + TIME_DIGITS),
                10,
              );
              tracker.deliver(seq, sent, now);
            }
          }
          break;
        case "resyncRequired":
        case "error":
          tracker.fail(`a subscriber got ${kind.case}: ${JSON.stringify(kind.value)}`);
          break;
        default:
          break;
      }
    }
    if (!signal.aborted) tracker.fail("a subscriber stream ended");
  } catch (err) {
    if (signal.aborted || (err instanceof ConnectError && err.code === Code.Canceled)) return;
    tracker.fail(`a subscriber stream failed: ${String(err)}`);
  }
}

class Sender {
  ackMs: number[] = [];
  lastAck = 0;
  inFlight = 0;
  private idle: (() => void)[] = [];

  constructor(
    private readonly client: Realtime,
    private readonly config: Config,
    private readonly sessionId: string,
    private readonly tracker: Tracker,
  ) {}

  reset(): void {
    this.ackMs = [];
    this.lastAck = 0;
  }

  /** Submits message `seq` without waiting for its answer. */
  send(seq: number): void {
    const sentUs = nowUs();
    const header = `${String(seq).padStart(SEQ_DIGITS, "0")} ${String(sentUs).padStart(TIME_DIGITS, "0")} `;
    this.inFlight++;
    const done = this.client
      .submit(
        {
          sessionId: this.sessionId,
          frame: {
            requestId: String(seq),
            kind: {
              case: "sendMessage",
              value: {
                clientOpId: `${this.config.opPrefix}-${seq}`,
                threadId: this.config.threadId,
                text: header + this.config.filler,
              },
            },
          },
        },
        { headers: bearer(this.config.tokens[0] ?? "") },
      )
      .then((response) => {
        const now = performance.now();
        const kind = response.frame?.kind;
        if (kind?.case !== "operationResult" || kind.value.outcome.case !== "confirmed") {
          this.tracker.fail(`send ${seq} failed: ${JSON.stringify(response.frame)}`);
          return;
        }
        this.ackMs.push(now - sentUs / 1000);
        this.lastAck = Math.max(this.lastAck, now);
      })
      .catch((err: unknown) => {
        this.tracker.fail(`send ${seq} failed: ${String(err)}`);
      })
      .finally(() => {
        this.inFlight--;
        if (this.inFlight === 0) {
          const ws = this.idle;
          this.idle = [];
          for (const w of ws) w();
        }
      });
    void done;
  }

  /** Waits until no Submit is in flight, or `timeoutMs` has passed (then fails the run). */
  async drained(timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    while (this.inFlight > 0) {
      const left = deadline - performance.now();
      if (left <= 0) {
        this.tracker.fail(`${this.inFlight} sends still unanswered`);
        return;
      }
      await race(new Promise<void>((r) => this.idle.push(r)), left);
    }
  }
}

async function runIdle(cmd: IdleCommand, tracker: Tracker): Promise<PhaseResult> {
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  await sleep(cmd.seconds * 1000);
  const cpu = process.cpuUsage(cpu0);
  const wall = (performance.now() - start) / 1000;
  return {
    event: "done",
    name: cmd.name,
    messages: 0,
    deliveries: 0,
    frames: 0,
    offered_s: wall,
    acked_s: 0,
    delivered_s: 0,
    wall_s: wall,
    ack_ms: [],
    deliver_ms: [],
    client_cpu_s: (cpu.user + cpu.system) / 1e6,
    error: tracker.failed,
  };
}

async function runPings(
  cmd: PingCommand,
  client: Realtime,
  token: string,
  tracker: Tracker,
): Promise<PhaseResult> {
  tracker.reset();
  const rtts: number[] = [];
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  let error = "";
  for (let i = 0; i < cmd.count; i++) {
    const sent = performance.now();
    try {
      const response = await client.submit(
        { frame: { requestId: `ping-${i}`, kind: { case: "ping", value: {} } } },
        { headers: bearer(token), timeoutMs: cmd.timeoutS * 1000 },
      );
      if (response.frame?.kind.case !== "pong") {
        error = `ping ${i} answered ${JSON.stringify(response.frame)}`;
        break;
      }
    } catch (err) {
      error = `ping ${i} failed: ${String(err)}`;
      break;
    }
    rtts.push(performance.now() - sent);
  }
  const end = performance.now();
  const cpu = process.cpuUsage(cpu0);
  const round = (v: number): number => Math.round(v * 1000) / 1000;
  return {
    event: "done",
    name: cmd.name,
    messages: rtts.length,
    deliveries: 0,
    frames: 0,
    offered_s: (end - start) / 1000,
    acked_s: (end - start) / 1000,
    delivered_s: 0,
    wall_s: (end - start) / 1000,
    ack_ms: rtts.map(round),
    deliver_ms: [],
    client_cpu_s: (cpu.user + cpu.system) / 1e6,
    error: error || tracker.failed,
  };
}

async function runPhase(
  cmd: PhaseCommand,
  sender: Sender,
  tracker: Tracker,
  subscribers: number,
): Promise<PhaseResult> {
  tracker.reset();
  sender.reset();
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  let sent = 0;
  if (cmd.window > 0 && cmd.rate === 0) {
    // closed loop: at most `window` messages not yet delivered to every subscriber
    const stopAt = start + cmd.seconds * 1000;
    while (performance.now() < stopAt && !tracker.failed) {
      if (tracker.incomplete >= cmd.window) {
        await race(tracker.nextComplete(), cmd.timeoutS * 1000);
        if (tracker.incomplete >= cmd.window && !tracker.failed) {
          tracker.fail(`closed loop stalled with ${tracker.incomplete} messages undelivered`);
        }
        continue;
      }
      const seq = cmd.firstSeq + sent;
      tracker.counts.set(seq, 0);
      sender.send(seq);
      sent++;
    }
  } else {
    for (let i = 0; i < cmd.count && !tracker.failed; i++) {
      if (cmd.rate > 0) {
        const delay = start + (i * 1000) / cmd.rate - performance.now();
        if (delay > 0) await sleep(delay);
      }
      const seq = cmd.firstSeq + i;
      tracker.counts.set(seq, 0);
      sender.send(seq);
      sent++;
    }
  }
  const offered = performance.now();
  tracker.expect = sent * subscribers;
  await sender.drained(tracker.failed ? 2000 : cmd.timeoutS * 1000);
  await tracker.allDelivered(cmd.timeoutS * 1000);
  const end = performance.now();
  const cpu = process.cpuUsage(cpu0);
  const round = (v: number): number => Math.round(v * 1000) / 1000;
  return {
    event: "done",
    name: cmd.name,
    messages: sent,
    deliveries: tracker.deliveries,
    frames: tracker.frames,
    offered_s: (offered - start) / 1000,
    acked_s: sender.lastAck ? (sender.lastAck - start) / 1000 : 0,
    delivered_s: tracker.last ? (tracker.last - start) / 1000 : 0,
    wall_s: (end - start) / 1000,
    ack_ms: sender.ackMs.map(round),
    deliver_ms: tracker.latenciesMs.map(round),
    client_cpu_s: (cpu.user + cpu.system) / 1e6,
    error: tracker.failed,
  };
}

async function main(): Promise<void> {
  const lines = createInterface({ input: process.stdin, crlfDelay: Number.POSITIVE_INFINITY });
  const input = lines[Symbol.asyncIterator]();
  const first = await input.next();
  if (first.done === true) throw new Error("no config on stdin");
  const config = JSON.parse(first.value) as Config;
  const n = config.tokens.length;
  const transport = createGrpcWebTransport({ baseUrl: config.baseUrl, useBinaryFormat: true });
  const client = createClient(RealtimeService, transport);
  const tracker = new Tracker(n);
  const abort = new AbortController();
  setMaxListeners(n + 10, abort.signal); // one listener per Subscribe call
  const sessions: string[] = new Array<string>(n).fill("");
  let ready = 0;
  let allReady: () => void = () => undefined;
  const readyPromise = new Promise<void>((r) => {
    allReady = r;
  });
  const streams = config.tokens.map((token, i) =>
    subscribe(client, token, tracker, abort.signal, (sessionId) => {
      sessions[i] = sessionId;
      ready++;
      if (ready === n) allReady();
    }),
  );
  const giveUp = setTimeout(() => {
    tracker.fail(`only ${ready} of ${n} subscribers became ready`);
  }, 60_000);
  await Promise.race([readyPromise, tracker.failure]);
  clearTimeout(giveUp);
  if (tracker.failed) {
    emit({ event: "error", error: tracker.failed });
    abort.abort();
    process.exit(1);
  }
  emit({ event: "ready", subscribers: n });
  const sender = new Sender(client, config, sessions[0] ?? "", tracker);
  for (;;) {
    const next = await input.next();
    if (next.done === true) break;
    const cmd = JSON.parse(next.value) as Command;
    if (cmd.cmd === "exit") break;
    let result: PhaseResult;
    if (cmd.cmd === "ping") result = await runPings(cmd, client, config.tokens[0] ?? "", tracker);
    else if (cmd.cmd === "idle") result = await runIdle(cmd, tracker);
    else result = await runPhase(cmd, sender, tracker, n);
    emit(result);
    if (result.error) log(result.error);
  }
  abort.abort();
  await Promise.allSettled(streams);
  lines.close();
  process.exit(0);
}

main().catch((err: unknown) => {
  log(String(err instanceof Error ? (err.stack ?? err.message) : err));
  emit({ event: "error", error: String(err) });
  process.exit(1);
});
