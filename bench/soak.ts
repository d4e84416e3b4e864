// The soak (issue 4): thousands of connections and rooms for a minute, with churn and
// abusers mixed into the same rooms as well-behaved players, on loopback only.
//
//   bun run bench/soak.ts                 60 s against a relay it starts (server.ts, default limits)
//   bun run bench/soak.ts --duration 20   shorter
//
// Options: --duration S, --rooms N (rooms of --size well-behaved players at --hz),
// --idle N (idle connections in rooms of 4), --churn-lanes N, --oversize N, --flooders N,
// --bad N (abusers of each kind), --no-slow (skip the stopped receiver), --relay-env NAME=value
// (repeatable: extra env for the relay it starts), --url ws://… (use a running relay instead;
// its pid is then unknown, so no RSS/CPU).
//
// Well-behaved players number every message; at the end every receiver must hold every
// message of every well-behaved sender in its room (gaps + tail shortfall = lost, must be 0),
// and no well-behaved socket may have been closed. Abusers:
// - oversize: a frame past MAX_MESSAGE_BYTES (64 KiB; every 5th past Bun's own 4× hard stop),
//   expecting `message_too_large` then 1009, then rejoining (reclaiming its slot);
// - flood: 1000 frames/s against the 100/s limit, expecting at most one `rate_limited` a second;
// - bad: invalid JSON, wrong types, unknown types, binary, deep nesting, `__proto__` keys,
//   lone surrogates, each expecting its documented error (or none for valid oddities);
// - slow: a child process in a busy room that is SIGSTOPped (stops reading), expecting
//   4002 and no gap in what it did receive before the close.
// The relay runs with its default limits except MAX_CONNECTIONS_PER_IP / MAX_ROOMS_PER_IP,
// raised because every client here shares 127.0.0.1. Exit code 0 only if nothing was lost,
// no well-behaved socket closed, and the relay is alive at the end.

import { resolve } from "node:path";
import type { Subprocess } from "bun";
import { Conn, State, buildTextFrame, closeAll, payloadText, utf8, type WsHandler } from "./ws.ts";
import { benchFrame, nowUs, parsed, readBench, readBenchData, stampFrame, type BenchFrame, type Waiter } from "./msg.ts";
import { processCpuUs, processRssBytes } from "./proc.ts";

const REPO = resolve(import.meta.dir, "..");
const MAX_SLOTS = 256;
const MAX_MESSAGE_BYTES = 64 * 1024;

// ------------------------------------------------------------------ options

interface SoakOptions {
  durationS: number;
  rooms: number;
  size: number;
  hz: number;
  idle: number;
  churnLanes: number;
  oversize: number;
  flooders: number;
  bad: number;
  slow: boolean;
  url: string;
  relayEnv: Record<string, string>;
}

function parseArgs(argv: string[]): SoakOptions {
  const o: SoakOptions = { durationS: 60, rooms: 300, size: 8, hz: 5, idle: 2000, churnLanes: 4, oversize: 4, flooders: 4, bad: 4, slow: true, url: "", relayEnv: {} };
  const numeric: Record<string, keyof SoakOptions> = {
    "--duration": "durationS", "--rooms": "rooms", "--size": "size", "--hz": "hz", "--idle": "idle",
    "--churn-lanes": "churnLanes", "--oversize": "oversize", "--flooders": "flooders", "--bad": "bad",
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]!;
    if (flag === "--no-slow") {
      o.slow = false;
      continue;
    }
    const value = argv[++i];
    if (value === undefined) throw new Error(`missing value for ${flag}`);
    if (flag === "--url") o.url = value;
    else if (flag === "--relay-env") {
      const eq = value.indexOf("=");
      if (eq < 1) throw new Error(`--relay-env wants NAME=value, got ${value}`);
      o.relayEnv[value.slice(0, eq)] = value.slice(eq + 1);
    }
    else if (flag in numeric) (o as unknown as Record<string, number>)[numeric[flag]!] = Number(value);
    else throw new Error(`unknown flag ${flag} (see the comment at the top of bench/soak.ts)`);
  }
  return o;
}

// ------------------------------------------------------------------ clients

type Kind = "good" | "churn" | "idle" | "oversize" | "flood" | "bad" | "slow";

class Peer {
  slot = -1;
  room: SoakRoom | null = null;
  recv = new Int32Array(MAX_SLOTS);
  sent = 0;
  /** performance.now() when this player's next message is due. */
  nextAtMs = 0;
  target = -1;
  bench: BenchFrame | null = null;
  waiter: Waiter | null = null;
  onOpen: ((c: Conn<Peer>) => void) | null = null;
  onClosed: ((c: Conn<Peer>) => void) | null = null;
  onBench: ((c: Conn<Peer>, src: number) => void) | null = null;
  leaving = false;
  errors: Record<string, number> = {};
  lastRateLimitedMs = 0;
  constructor(
    readonly kind: Kind,
    readonly clientId: string = `soak-${kind}-${crypto.randomUUID()}`,
  ) {}
}

interface SoakRoom {
  code: string;
  /** Well-behaved members by slot. */
  good: Conn<Peer>[];
}

const totals = {
  delivered: 0,
  gaps: 0,
  reordered: 0,
  foreignMessages: 0,
  goodUnexpectedCloses: [] as string[],
  goodErrors: {} as Record<string, number>,
  goodErrorSample: [] as string[],
  gapSample: [] as string[],
  abuserErrors: {} as Record<string, number>,
  closes: {} as Record<string, number>,
  churnCycles: 0,
  churnFailures: [] as string[],
  oversize: { sent: 0, hardSent: 0, errorBeforeClose: 0, close1009: 0, otherCloses: {} as Record<string, number> },
  flood: { sent: 0, rateLimitedErrors: 0, errorsCloserThan950ms: 0 },
  bad: { sent: 0, expected: {} as Record<string, number>, got: {} as Record<string, number>, pongs: 0 },
};

const count = (m: Record<string, number>, k: string, by = 1): void => {
  m[k] = (m[k] ?? 0) + by;
};

let running = true;

const handler: WsHandler<Peer> = {
  open(c) {
    const f = c.user.onOpen;
    c.user.onOpen = null;
    f?.(c);
  },
  text(c, buf, s, e) {
    if (readBench(buf, s, e)) return benchMessage(c);
    control(c, payloadText(buf, s, e));
  },
  closed(c, code, reason) {
    const u = c.user;
    count(totals.closes, `${u.kind}:${code}`);
    if (!u.leaving && (u.kind === "good" || u.kind === "idle" || u.kind === "churn")) {
      totals.goodUnexpectedCloses.push(`${u.kind} slot ${u.slot}: ${code} ${reason}`);
    }
    if (u.waiter) {
      const w = u.waiter;
      u.waiter = null;
      w.reject(new Error(`closed ${code} ${reason} while waiting for ${w.type}`));
    }
    u.onOpen = null;
    u.onClosed?.(c);
  },
};

function benchMessage(c: Conn<Peer>): void {
  const u = c.user;
  const src = parsed.src;
  const seq = parsed.seq;
  totals.delivered++;
  // Abusers joined after the players started: they are not counted as receivers.
  if (u.kind === "flood" || u.kind === "bad" || u.kind === "oversize") return;
  if (src < 0 || src >= MAX_SLOTS) return void totals.reordered++;
  const want = u.recv[src]!;
  if (seq > want) {
    totals.gaps += seq - want;
    if (totals.gapSample.length < 10) {
      totals.gapSample.push(`${u.kind} slot ${u.slot} of ${u.room?.code ?? "?"}: from slot ${src} expected ${want}, got ${seq} at ${Math.round(performance.now() / 1000)} s`);
    }
  }
  else if (seq < want) totals.reordered++;
  u.recv[src] = seq + 1;
  u.onBench?.(c, src);
}

function control(c: Conn<Peer>, text: string): void {
  const u = c.user;
  let msg: Record<string, unknown>;
  try {
    msg = JSON.parse(text) as Record<string, unknown>;
  } catch {
    count(u.kind === "good" ? totals.goodErrors : totals.abuserErrors, "unparseable_frame_from_relay");
    return;
  }
  if (msg.type === "message") {
    if (readBenchData(msg.data)) return benchMessage(c);
    totals.foreignMessages++; // an abuser's send reached this member
    return;
  }
  if (msg.type === "error") {
    const code = String(msg.code);
    count(u.errors, code);
    if (u.kind === "bad") count(totals.bad.got, code);
    if (code === "rate_limited" && u.kind === "flood") {
      const now = Date.now();
      totals.flood.rateLimitedErrors++;
      if (now - u.lastRateLimitedMs < 950) totals.flood.errorsCloserThan950ms++;
      u.lastRateLimitedMs = now;
    }
    count(u.kind === "good" || u.kind === "idle" || u.kind === "churn" ? totals.goodErrors : totals.abuserErrors, `${u.kind}:${code}`);
    if (u.kind === "good" && totals.goodErrorSample.length < 10) {
      totals.goodErrorSample.push(`${code} to slot ${u.slot} of ${u.room?.code} at ${Math.round(performance.now() / 1000)} s, after ${u.sent} sent`);
    }
  }
  if (msg.type === "pong" && u.kind === "bad") totals.bad.pongs++;
  const w = u.waiter;
  if (w === null) return;
  if (msg.type === w.type) {
    u.waiter = null;
    w.resolve(msg);
  } else if (msg.type === "error" && (w.type === "created" || w.type === "joined")) {
    u.waiter = null;
    w.reject(new Error(`${String(msg.code)}: ${String(msg.message)}`));
  }
}

let host = "127.0.0.1";
let port = 0;

function openConn(user: Peer): Promise<Conn<Peer>> {
  return new Promise((resolve, reject) => {
    const c = new Conn<Peer>(handler, user);
    user.onOpen = (conn) => {
      user.onClosed = null;
      resolve(conn);
    };
    user.onClosed = () => reject(new Error(`connect failed (${c.closeReason || c.closeCode})`));
    c.connect(host, port);
  });
}

function expect(c: Conn<Peer>, type: string, timeoutMs = 10_000): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      c.user.waiter = null;
      reject(new Error(`no ${type} within ${timeoutMs} ms`));
    }, timeoutMs);
    c.user.waiter = {
      type,
      resolve: (m) => {
        clearTimeout(timer);
        resolve(m);
      },
      reject: (e) => {
        clearTimeout(timer);
        reject(e);
      },
    };
  });
}

async function create(user: Peer, maxClients: number): Promise<{ conn: Conn<Peer>; code: string }> {
  const conn = await openConn(user);
  const answer = expect(conn, "created");
  conn.sendText(JSON.stringify({ type: "create", clientId: user.clientId, maxClients }));
  const msg = await answer;
  user.slot = Number(msg.index);
  return { conn, code: String(msg.room) };
}

async function join(user: Peer, code: string): Promise<Conn<Peer>> {
  const conn = await openConn(user);
  const answer = expect(conn, "joined");
  conn.sendText(JSON.stringify({ type: "join", clientId: user.clientId, room: code }));
  const msg = await answer;
  user.slot = Number(msg.index);
  return conn;
}

/** A room of `size` members of `kind`, with room for `extra` abusers. */
async function room(kind: Kind, size: number, extra: number): Promise<SoakRoom> {
  const { conn, code } = await create(new Peer(kind), size + extra);
  const r: SoakRoom = { code, good: [conn] };
  const joiners = await Promise.all(Array.from({ length: size - 1 }, () => join(new Peer(kind), code)));
  for (const j of joiners) r.good[j.user.slot] = j;
  for (const c of r.good) c.user.room = r;
  return r;
}

async function pool<T>(n: number, limit: number, task: (i: number) => Promise<T>): Promise<T[]> {
  const out = new Array<T>(n);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, limit) }, async () => {
      while (next < n) {
        const i = next++;
        out[i] = await task(i);
      }
    }),
  );
  return out;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function sendBench(c: Conn<Peer>): void {
  const u = c.user;
  if (c.state !== State.Open) return;
  const at = c.appendFrame(u.bench!.frame);
  stampFrame(c.outBuf, at, u.bench!, u.sent++, nowUs());
}

// ---------------------------------------------------------------- abusers

async function oversizeAbuser(code: string): Promise<void> {
  const user = new Peer("oversize");
  let round = 0;
  while (running) {
    let conn: Conn<Peer>;
    try {
      conn = await join(user, code);
    } catch (e) {
      count(totals.oversize.otherCloses, `join failed: ${(e as Error).message}`);
      await sleep(1000);
      continue;
    }
    // Every 5th frame is past Bun's own hard stop (4× the limit): Bun closes it, no error.
    const hard = ++round % 5 === 0;
    const size = hard ? MAX_MESSAGE_BYTES * 4 + 4096 : MAX_MESSAGE_BYTES + 1024;
    const closed = new Promise<number>((done) => {
      user.onClosed = (c) => done(c.closeCode);
    });
    const errorsBefore = user.errors.message_too_large ?? 0;
    conn.sendText(`{"type":"send","data":"${"x".repeat(size)}"}`);
    if (hard) totals.oversize.hardSent++;
    else totals.oversize.sent++;
    const closeCode = await Promise.race([closed, sleep(5000).then(() => -1)]);
    if (!hard && (user.errors.message_too_large ?? 0) > errorsBefore) totals.oversize.errorBeforeClose++;
    if (closeCode === 1009) totals.oversize.close1009++;
    else count(totals.oversize.otherCloses, String(closeCode));
    if (closeCode === -1) conn.terminate();
    user.onClosed = null;
    await sleep(1000);
  }
}

async function flooder(code: string): Promise<Conn<Peer>> {
  const conn = await join(new Peer("flood"), code);
  const frame = buildTextFrame(utf8('{"type":"send","data":{"flood":1}}'));
  const timer = setInterval(() => {
    if (!running || conn.state !== State.Open) return clearInterval(timer);
    for (let i = 0; i < 10; i++) conn.appendFrame(frame);
    totals.flood.sent += 10;
  }, 10);
  return conn;
}

/** Hostile frames and the error each must get (null: valid, no error expected). */
const BAD_FRAMES: [string | Uint8Array, string | null][] = [
  ["not json", "invalid_json"],
  ["{", "invalid_json"],
  ["[]", "invalid_json"],
  ['"a string"', "invalid_json"],
  ["null", "invalid_json"],
  ["42", "invalid_json"],
  ["{}", "unknown_type"],
  ['{"type":"nope"}', "unknown_type"],
  ['{"type":7}', "unknown_type"],
  ['{"type":"send","to":-1,"data":1}', "target_not_found"],
  ['{"type":"send","to":"1","data":1}', "target_not_found"],
  ['{"type":"send","to":[],"data":1}', "target_not_found"],
  ['{"type":"send","to":1.5,"data":1}', "target_not_found"],
  ['{"type":"send","to":9999,"data":1}', "target_not_found"],
  ['{"type":"send","to":1e400,"data":1}', "target_not_found"],
  ['{"type":"create","clientId":"x","maxClients":8}', "already_in_room"],
  ['{"type":"create","clientId":5,"maxClients":8}', "invalid_client_id"],
  [`{"type":"create","clientId":"${"c".repeat(200)}","maxClients":8}`, "invalid_client_id"],
  ['{"type":"create","clientId":"x","maxClients":"8"}', "invalid_max_clients"],
  ['{"type":"create","clientId":"x","maxClients":100000}', "invalid_max_clients"],
  ['{"type":"join","clientId":"x"}', "invalid_room"],
  ['{"type":"join","clientId":"x","room":"ZZZZZZ"}', "already_in_room"],
  ['{"type":"set_state","data":1}', "not_host"],
  ['{"type":"set_state"}', "state_required"],
  ['{"type":"close_room"}', "not_host"],
  [new Uint8Array([1, 2, 3, 255]), "binary_unsupported"],
  ['{"type":"ping","id":{"__proto__":{"polluted":1}}}', null],
  ['{"__proto__":{"type":"create"},"type":"ping","constructor":{"prototype":{"x":1}}}', null],
  ['{"type":"send","data":{"__proto__":{"x":1},"constructor":"y"}}', null],
  ['{"type":"send","data":"\\ud800 lone surrogate \\udfff"}', null],
  ['{"type":"send","data":1e308,"to":[0,0,0]}', null],
  [`{"type":"send","data":${"[".repeat(5000)}${"]".repeat(5000)}}`, null],
  [`{"type":"send","data":${'{"a":'.repeat(3000)}1${"}".repeat(3000)}}`, null],
];

async function badSender(code: string): Promise<Conn<Peer>> {
  const conn = await join(new Peer("bad"), code);
  const frames = BAD_FRAMES.map(([f, want]) => [typeof f === "string" ? buildTextFrame(utf8(f)) : f, want, typeof f !== "string"] as const);
  let i = 0;
  const timer = setInterval(() => {
    if (!running || conn.state !== State.Open) return clearInterval(timer);
    const [frame, want, binary] = frames[i++ % frames.length]!;
    if (binary) conn.sendBinary(frame);
    else conn.appendFrame(frame);
    totals.bad.sent++;
    if (want) count(totals.bad.expected, want);
  }, 50);
  return conn;
}

// ------------------------------------------------------------ slow receiver

/** Child mode: join, then read nothing while SIGSTOPped; on SIGCONT report what arrived. */
async function slowReceiverChild(url: string, code: string): Promise<void> {
  const u = new URL(url);
  host = u.hostname;
  port = Number(u.port);
  const user = new Peer("slow");
  let first = -1;
  let received = 0;
  let gaps = 0;
  user.onBench = (_c, src) => {
    received++;
    if (first < 0 && src === 0) first = parsed.seq;
  };
  const conn = await join(user, code);
  const closed = new Promise<void>((done) => {
    user.onClosed = () => done();
  });
  console.log(JSON.stringify({ joined: true, slot: user.slot }));
  await closed;
  gaps = totals.gaps;
  console.log(JSON.stringify({ received, gaps, reordered: totals.reordered, firstSeq: first, closeCode: conn.closeCode, closeReason: conn.closeReason, errors: user.errors }));
  process.exit(0);
}

interface SlowReport {
  received: number;
  gaps: number;
  reordered: number;
  closeCode: number;
  closeReason: string;
}

async function startSlowReceiver(url: string, code: string): Promise<{ child: Subprocess<"ignore", "pipe", "inherit">; report: Promise<SlowReport | null> }> {
  const child = Bun.spawn(["bun", "run", import.meta.path, "--slow-receiver", url, code], { stdout: "pipe", stderr: "inherit" });
  const reader = child.stdout.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  const nextLine = async (): Promise<string | null> => {
    for (;;) {
      const nl = buffered.indexOf("\n");
      if (nl >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        return line;
      }
      const { done, value } = await reader.read();
      if (done) return null;
      buffered += decoder.decode(value);
    }
  };
  const joined = await Promise.race([nextLine(), sleep(15_000).then(() => null)]);
  if (!joined) throw new Error("slow receiver did not join");
  return { child, report: nextLine().then((l) => (l ? (JSON.parse(l) as SlowReport) : null)) };
}

// ------------------------------------------------------------------- main

async function main(): Promise<number> {
  const o = parseArgs(process.argv.slice(2));
  const t0 = Date.now();
  let relay: Subprocess | null = null;
  const watchdog = setTimeout(() => {
    console.error("soak: watchdog expired; giving up");
    relay?.kill("SIGKILL");
    process.exit(2);
  }, (o.durationS + 120) * 1000);
  watchdog.unref();

  let relayPid = 0;
  const relayLog: string[] = [];
  if (o.url === "") {
    const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    port = l.port;
    l.stop(true);
    const cores = (await import("node:os")).cpus().length;
    const pin = cores >= 2 ? "taskset -c 1 " : "";
    relay = Bun.spawn(["bash", "-c", `ulimit -n $(ulimit -Hn); exec ${pin}bun run server.ts`], {
      cwd: REPO,
      env: { ...process.env, PORT: String(port), LOG_LEVEL: "warn", MAX_CONNECTIONS_PER_IP: "100000", MAX_ROOMS_PER_IP: "100000", ...o.relayEnv },
      stdout: "pipe",
      stderr: "pipe",
    });
    relayPid = relay.pid;
    for (const stream of [relay.stdout, relay.stderr] as ReadableStream<Uint8Array>[]) {
      void (async () => {
        const r = stream.getReader();
        const d = new TextDecoder();
        for (;;) {
          const { done, value } = await r.read();
          if (done) return;
          relayLog.push(...d.decode(value).split("\n").filter(Boolean));
        }
      })();
    }
    const deadline = Date.now() + 15_000;
    for (;;) {
      try {
        if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) break;
      } catch {
        // not up yet
      }
      if (Date.now() > deadline || relay.exitCode !== null) throw new Error("relay did not start");
      await sleep(50);
    }
    o.url = `ws://127.0.0.1:${port}`;
  } else {
    const u = new URL(o.url);
    host = u.hostname;
    port = Number(u.port);
  }
  const httpBase = `http://${host}:${port}`;
  console.error(`soak: relay ${o.url}${relayPid ? ` (pid ${relayPid})` : ""}, ${o.durationS} s`);

  // ---- set up: well-behaved rooms (every 4th uses targeted sends), idle rooms, the busy room
  const abuserSeats = o.oversize + o.flooders + o.bad > 0 ? 3 : 0;
  const rooms = await pool(o.rooms, 16, () => room("good", o.size, abuserSeats));
  const good: Conn<Peer>[] = [];
  rooms.forEach((r, i) => {
    for (const c of r.good) {
      c.user.target = i % 4 === 3 ? (c.user.slot + 1) % o.size : -1;
      c.user.bench = benchFrame(c.user.slot, c.user.target, 120);
      good.push(c);
    }
  });
  const idleRooms = await pool(Math.ceil(o.idle / 4), 32, () => room("idle", 4, 0));
  const idle = idleRooms.flatMap((r) => r.good);
  console.error(`soak: ${good.length} players in ${rooms.length} rooms, ${idle.length} idle connections (${((Date.now() - t0) / 1000).toFixed(1)} s)`);

  // The busy room: 3 players sending 16 KB messages at 50 Hz, plus the stopped receiver.
  let busy: SoakRoom | null = null;
  let slow: Awaited<ReturnType<typeof startSlowReceiver>> | null = null;
  if (o.slow) {
    busy = await room("good", 3, 1);
    for (const c of busy.good) {
      c.user.bench = benchFrame(c.user.slot, -1, 16_000);
      good.push(c);
    }
    slow = await startSlowReceiver(o.url, busy.code);
    console.error(`soak: busy room ${busy.code} with a stopped receiver`);
    process.kill(slow.child.pid, "SIGSTOP");
  }

  // ---- traffic
  // At most one message per player per 10 ms tick, and never more than one period of
  // catch-up after a stall of this process: a well-behaved player never bursts past the
  // relay's rate limit (100/s, burst 200) because the load generator was late.
  const start = performance.now();
  const n = good.length;
  good.forEach((c, i) => {
    const periodMs = 1000 / (c.user.room === busy ? 50 : o.hz);
    c.user.nextAtMs = start + (periodMs * i) / n;
  });
  const sender = setInterval(() => {
    const now = performance.now();
    for (let i = 0; i < n; i++) {
      const c = good[i]!;
      const u = c.user;
      if (now < u.nextAtMs) continue;
      const periodMs = 1000 / (u.room === busy ? 50 : o.hz);
      sendBench(c);
      u.nextAtMs += periodMs;
      if (u.nextAtMs < now - periodMs) u.nextAtMs = now;
    }
  }, 10);

  // ---- abusers, spread over the first rooms
  const abuserTasks: Promise<unknown>[] = [];
  const abuserConns: Conn<Peer>[] = [];
  let k = 0;
  const nextRoom = () => rooms[k++ % rooms.length]!.code;
  for (let i = 0; i < o.oversize; i++) abuserTasks.push(oversizeAbuser(nextRoom()));
  for (let i = 0; i < o.flooders; i++) abuserConns.push(await flooder(nextRoom()));
  for (let i = 0; i < o.bad; i++) abuserConns.push(await badSender(nextRoom()));

  // ---- churn lanes
  const churnLane = async (): Promise<void> => {
    while (running) {
      try {
        const r = await room("churn", 4, 0);
        const h = r.good[0]!;
        h.user.bench = benchFrame(0, -1, 120);
        let got = 0;
        await new Promise<void>((done, fail) => {
          const timer = setTimeout(() => fail(new Error(`churn room ${r.code}: ${got}/3 receipts after 5 s`)), 5000);
          for (const c of r.good) c.user.onBench = () => { if (++got === 3) { clearTimeout(timer); done(); } };
          sendBench(h);
        });
        await closeAll(r.good);
        totals.churnCycles++;
      } catch (e) {
        totals.churnFailures.push((e as Error).message);
        await sleep(200);
      }
    }
  };
  const lanes = Array.from({ length: o.churnLanes }, churnLane);

  // ---- sample every 5 s
  const samples: { t: number; rssMB: number; heapMB: number; resumeBufferMB: number; relayCpuPct: number; soakCpuPct: number; delivered: number }[] = [];
  let lastCpu = relayPid ? processCpuUs(relayPid) : NaN;
  let lastSelf = process.cpuUsage();
  let lastT = performance.now();
  let lastDelivered = 0;
  /** One gauge from the relay's /metrics, in MB (NaN when absent). */
  const gaugeMB = (text: string, name: string): number => {
    const line = text.split("\n").find((l) => l.startsWith(name + "{"));
    return line ? Number(line.slice(line.lastIndexOf(" ") + 1)) / 2 ** 20 : NaN;
  };
  const sampler = setInterval(async () => {
    const now = performance.now();
    const cpu = relayPid ? processCpuUs(relayPid) : NaN;
    const self = process.cpuUsage(lastSelf);
    const metrics = await fetch(`${httpBase}/metrics`).then((r) => r.text()).catch(() => "");
    const s = {
      t: Math.round((now - start) / 1000),
      rssMB: relayPid ? processRssBytes(relayPid) / 2 ** 20 : NaN,
      heapMB: gaugeMB(metrics, "process_heap_used_bytes"),
      resumeBufferMB: gaugeMB(metrics, "party_sockets_resume_buffer_bytes"),
      relayCpuPct: ((cpu - lastCpu) / ((now - lastT) * 1000)) * 100,
      soakCpuPct: ((self.user + self.system) / ((now - lastT) * 1000)) * 100,
      delivered: totals.delivered,
    };
    samples.push(s);
    console.error(
      `soak: t=${s.t}s relay RSS ${s.rssMB.toFixed(0)} MB (heap ${s.heapMB.toFixed(0)} MB, resume buffer ${s.resumeBufferMB.toFixed(1)} MB) CPU ${s.relayCpuPct.toFixed(0)} %  soak CPU ${s.soakCpuPct.toFixed(0)} %  ` +
        `deliveries/s ${Math.round(((totals.delivered - lastDelivered) * 1000) / (now - lastT))}  gaps ${totals.gaps}  churn ${totals.churnCycles}`,
    );
    lastCpu = cpu;
    lastSelf = process.cpuUsage();
    lastT = now;
    lastDelivered = totals.delivered;
  }, 5000);

  await sleep(o.durationS * 1000);

  // ---- stop and drain
  running = false;
  clearInterval(sender);
  clearInterval(sampler);
  await Promise.race([Promise.all([...abuserTasks, ...lanes]), sleep(10_000)]);
  let shortfall = 0;
  const shortPairs: string[] = [];
  const pairsShort = (): number => {
    let missing = 0;
    shortPairs.length = 0;
    for (const r of [...rooms, ...(busy ? [busy] : [])]) {
      for (const s of r.good) {
        for (const rc of r.good) {
          if (rc === s || rc.state !== State.Open) continue;
          if (s.user.target >= 0 && s.user.target !== rc.user.slot) continue;
          const short = s.user.sent - rc.user.recv[s.user.slot]!;
          if (short <= 0) continue;
          missing += short;
          if (shortPairs.length < 10) {
            shortPairs.push(
              `room ${r.code}${r === busy ? " (busy)" : ""}: slot ${s.user.slot} sent ${s.user.sent}, slot ${rc.user.slot} has ${rc.user.recv[s.user.slot]}; ` +
                `sender unsent bytes ${s.pendingBytes}, sender errors ${JSON.stringify(s.user.errors)}`,
            );
          }
        }
      }
    }
    return missing;
  };
  const drainUntil = performance.now() + 10_000;
  while ((shortfall = pairsShort()) > 0 && performance.now() < drainUntil) await sleep(50);

  let slowReport: SlowReport | null = null;
  if (slow) {
    process.kill(slow.child.pid, "SIGCONT");
    slowReport = await Promise.race([slow.report, sleep(20_000).then(() => null)]);
    if (slowReport === null) slow.child.kill("SIGKILL");
  }

  const health = await fetch(`${httpBase}/health`).then((r) => r.status).catch((e: unknown) => String(e));
  const metricsText = await fetch(`${httpBase}/metrics`).then((r) => r.text()).catch(() => "");
  const metric = (re: RegExp): Record<string, number> => {
    const out: Record<string, number> = {};
    for (const line of metricsText.split("\n")) {
      const m = re.exec(line);
      if (m) out[m[1] ?? "value"] = Number(line.slice(line.lastIndexOf(" ") + 1));
    }
    return out;
  };
  const finalRss = relayPid ? processRssBytes(relayPid) / 2 ** 20 : NaN;
  const relayCpuS = relayPid ? processCpuUs(relayPid) / 1e6 : NaN;

  await closeAll([...good, ...idle, ...abuserConns]);
  const relayAlive = relay === null || relay.exitCode === null;
  if (relay) {
    relay.kill("SIGTERM");
    const exited = await Promise.race([relay.exited.then(() => true), sleep(10_000).then(() => false)]);
    if (!exited) relay.kill("SIGKILL");
  }

  const lost = totals.gaps + shortfall;
  const logEvents: Record<string, number> = {};
  for (const line of relayLog) {
    try {
      const j = JSON.parse(line) as { event?: string; reason?: string; level?: string };
      count(logEvents, `${j.level}:${j.event}${j.reason ? ":" + j.reason : ""}`);
    } catch {
      count(logEvents, "non-JSON line");
    }
  }
  const summary = {
    durationS: o.durationS,
    players: good.length,
    rooms: rooms.length + (busy ? 1 : 0),
    idleConnections: idle.length,
    delivered: totals.delivered,
    lostByWellBehaved: lost,
    gaps: totals.gaps,
    gapSample: totals.gapSample,
    tailShortfall: shortfall,
    tailShortfallSample: shortPairs,
    reordered: totals.reordered,
    wellBehavedUnexpectedCloses: totals.goodUnexpectedCloses.length,
    wellBehavedUnexpectedClosesSample: totals.goodUnexpectedCloses.slice(0, 10),
    wellBehavedErrors: totals.goodErrors,
    wellBehavedErrorSample: totals.goodErrorSample,
    churn: { cycles: totals.churnCycles, failures: totals.churnFailures.length, failureSample: totals.churnFailures.slice(0, 5) },
    oversize: totals.oversize,
    flood: { ...totals.flood, rateLimitedErrorsPerFlooderPerS: totals.flood.rateLimitedErrors / Math.max(1, o.flooders) / o.durationS },
    abuserMessagesRelayedToPlayers: totals.foreignMessages,
    bad: { ...totals.bad, mismatched: Object.keys({ ...totals.bad.expected, ...totals.bad.got }).filter((c) => (totals.bad.expected[c] ?? 0) !== (totals.bad.got[c] ?? 0)) },
    abuserErrors: totals.abuserErrors,
    closes: totals.closes,
    slowReceiver: slowReport,
    relay: {
      alive: relayAlive,
      health,
      rssMBMax: Math.max(...samples.map((s) => s.rssMB)),
      rssMBEnd: finalRss,
      cpuPctMean: samples.length ? samples.reduce((a, s) => a + s.relayCpuPct, 0) / samples.length : NaN,
      cpuSecondsTotal: relayCpuS,
      logEvents,
      errorsTotal: metric(/^party_sockets_errors_total\{.*code="([^"]+)".*\}/),
      closesTotal: metric(/^party_sockets_closes_total\{.*code="([^"]+)".*\}/),
      rateLimitedFrames: metric(/^party_sockets_rate_limited_frames_total\{/),
    },
    samples,
  };
  console.log(JSON.stringify(summary, null, 2));
  const ok = lost === 0 && totals.goodUnexpectedCloses.length === 0 && relayAlive && health === 200;
  console.error(
    `soak: ${ok ? "PASS" : "FAIL"} — lost by well-behaved clients: ${lost} (gaps ${totals.gaps}, tail ${shortfall}); ` +
      `unexpected closes of well-behaved sockets: ${totals.goodUnexpectedCloses.length}; relay alive: ${relayAlive}, /health ${health}; ` +
      `relay RSS max ${summary.relay.rssMBMax.toFixed(0)} MB, mean CPU ${summary.relay.cpuPctMean.toFixed(0)} %; ` +
      `slow receiver: ${slowReport ? `close ${slowReport.closeCode}, ${slowReport.received} received, ${slowReport.gaps} gaps` : "no report"}`,
  );
  return ok ? 0 : 1;
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  if (argv[0] === "--slow-receiver") {
    await slowReceiverChild(argv[1]!, argv[2]!);
  } else {
    process.exit(await main());
  }
}
