// The load generator: drives one scenario against one server and prints one JSON line.
//
//   bun run bench/loadgen.ts --url ws://127.0.0.1:9001 --scenario fanout-closed \
//     --server-pid 1234 --warmup 2 --duration 10
//
// It speaks RFC 6455 itself (bench/ws.ts) and never makes an object or a string per
// relayed message: every bench message is a prebuilt frame per client whose sequence
// number and send time are patched in place as fixed-width digits, and a received
// `message` is read by scanning its bytes for `"seq":`. Sequence numbers count per
// (sender, receiver) so the receiver sees every gap; the send time (µs since this
// process started) gives latency. Both servers are read the same way: ours delivers
// `{"type":"message","from":N,"data":{…}}`, the floor delivers the sender's frame unchanged.
//
// Scenarios
//   fanout-open      rooms × size clients, each broadcasting at --hz
//   fanout-busy      the same at BUSY_HZ (400 Hz per client): busy, yet below saturation
//   fanout-closed    the same, each client keeping --window messages outstanding
//                    (a message is outstanding until every peer has it)
//   targeted-open    each client sends `to: (slot+1) % size` at --hz
//   targeted-closed  the same, closed-loop (outstanding until the target has it)
//   churn            --lanes parallel loops of: connect, create, 3 joins, one broadcast, all close
//   idle             --idle-conns connections in rooms of --idle-room-size, then sit still

import { Conn, State, closeAll, payloadText, wsStats, type WsHandler } from "./ws.ts";
import { Histogram, benchFrame, nowUs, parsed, readBench, readBenchData, stampFrame, type Waiter } from "./msg.ts";
import { coreBusy, coreTicks, loadavg, processCpuUs, processRssBytes, type CoreTicks } from "./proc.ts";

// ------------------------------------------------------------------ options

export const SCENARIOS = ["fanout-open", "fanout-busy", "fanout-closed", "targeted-open", "targeted-closed", "churn", "idle"] as const;
/**
 * fanout-busy's rate per client: 1.12 M deliveries/s from 50 rooms of 8, below both servers'
 * saturation here, so both batch alike and the CPU per delivery compares the work alone.
 */
export const BUSY_HZ = 400;
export type Scenario = (typeof SCENARIOS)[number];

export interface LoadOptions {
  url: string;
  scenario: Scenario;
  rooms: number;
  size: number;
  hz: number;
  window: number;
  warmupS: number;
  durationS: number;
  drainS: number;
  lanes: number;
  idleConns: number;
  idleRoomSize: number;
  dataBytes: number;
  connectConcurrency: number;
  serverPid: number;
  genCore: number;
  serverCore: number;
  setupTimeoutS: number;
  /** Lossless sends: every bench frame carries `n` (`--numbered 1`). */
  numbered: boolean;
}

const DEFAULTS: LoadOptions = {
  url: "ws://127.0.0.1:8080",
  scenario: "fanout-closed",
  rooms: 50,
  size: 8,
  hz: 20,
  window: 16,
  warmupS: 2,
  durationS: 10,
  drainS: 5,
  lanes: 16,
  idleConns: 10_000,
  idleRoomSize: 4,
  dataBytes: 120,
  connectConcurrency: 128,
  serverPid: 0,
  genCore: -1,
  serverCore: -1,
  setupTimeoutS: 60,
  numbered: false,
};

function parseArgs(argv: string[]): LoadOptions {
  const o: LoadOptions = { ...DEFAULTS };
  const numeric: Record<string, keyof LoadOptions> = {
    "--rooms": "rooms", "--size": "size", "--hz": "hz", "--window": "window", "--warmup": "warmupS",
    "--duration": "durationS", "--drain": "drainS", "--lanes": "lanes", "--idle-conns": "idleConns",
    "--idle-room-size": "idleRoomSize", "--data-bytes": "dataBytes", "--connect-concurrency": "connectConcurrency",
    "--server-pid": "serverPid", "--gen-core": "genCore", "--server-core": "serverCore", "--setup-timeout": "setupTimeoutS",
  };
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i]!;
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`missing value for ${flag}`);
    if (flag === "--url") o.url = value;
    else if (flag === "--numbered") o.numbered = value === "1";
    else if (flag === "--scenario") {
      if (!(SCENARIOS as readonly string[]).includes(value)) throw new Error(`unknown scenario ${value}; one of ${SCENARIOS.join(", ")}`);
      o.scenario = value as Scenario;
    } else if (flag in numeric) {
      const n = Number(value);
      if (!Number.isFinite(n)) throw new Error(`${flag} needs a number, got ${value}`);
      (o as unknown as Record<string, number>)[numeric[flag]!] = n;
    } else throw new Error(`unknown flag ${flag}`);
  }
  return o;
}

// ------------------------------------------------------------------ state

const hist = new Histogram();
const stats = {
  measuring: false,
  stopping: false,
  sent: 0,
  delivered: 0,
  expected: 0, // deliveries the sends so far should produce
  gaps: 0,
  reordered: 0,
  slowFrames: 0,
  controlFrames: 0,
  unexpectedCloses: 0,
  errors: {} as Record<string, number>,
  closeCodes: {} as Record<string, number>,
};

interface BenchRoom {
  code: string;
  size: number;
  clients: (Conn<Client> | undefined)[];
}

class Client {
  slot = -1;
  room: BenchRoom | null = null;
  /** Next expected sequence number from each sender slot. */
  recv: Int32Array = new Int32Array(0);
  sent = 0;
  /** Targeted: the slot this client sends to; -1 for broadcast. */
  target = -1;
  bench: ReturnType<typeof benchFrame> | null = null;
  waiter: Waiter | null = null;
  onOpen: ((c: Conn<Client>) => void) | null = null;
  onClosed: ((c: Conn<Client>) => void) | null = null;
  /** Closing on purpose: the close is not counted as unexpected. */
  leaving = false;
  /** Set by the scenario: called for each relayed bench message this client receives. */
  onMessage: ((c: Conn<Client>, src: number, seq: number) => void) | null = null;
}

function count(map: Record<string, number>, key: string): void {
  map[key] = (map[key] ?? 0) + 1;
}

function sendBench(c: Conn<Client>, t: number): void {
  const u = c.user;
  const b = u.bench!;
  const at = c.appendFrame(b.frame); // may move outBuf: read it after
  stampFrame(c.outBuf, at, b, u.sent, t);
  u.sent++;
  stats.sent++;
  stats.expected += u.target >= 0 ? 1 : u.room!.size - 1;
}

/** A relayed bench message: count it, check its sequence, time it. */
function received(c: Conn<Client>, src: number, seq: number, ts: number, now: number): void {
  const u = c.user;
  stats.delivered++;
  const want = u.recv[src];
  if (want === undefined) {
    stats.reordered++;
    return;
  }
  if (seq !== want) {
    if (seq > want) stats.gaps += seq - want;
    else stats.reordered++;
  }
  u.recv[src] = seq + 1;
  if (stats.measuring) hist.add(now - ts);
  if (u.onMessage !== null) u.onMessage(c, src, seq);
}

// Per data callback the clock is read once: frames in one chunk arrived together.
let chunkNow = 0;
let chunkNowAt = -1;

const handler: WsHandler<Client> = {
  open(c) {
    const f = c.user.onOpen;
    c.user.onOpen = null;
    if (f) f(c);
  },
  text(c, buf, s, e) {
    // `{"type":"message",…` (ours) or `{"type":"send",…` (the floor): no string, no object.
    if (readBench(buf, s, e)) {
      if (chunkNowAt !== wsStats.chunks) {
        chunkNow = nowUs();
        chunkNowAt = wsStats.chunks;
      }
      received(c, parsed.src, parsed.seq, parsed.ts, chunkNow);
      return;
    }
    control(c, payloadText(buf, s, e));
  },
  closed(c, code) {
    count(stats.closeCodes, String(code));
    const u = c.user;
    if (!u.leaving) stats.unexpectedCloses++;
    if (u.waiter) {
      const w = u.waiter;
      u.waiter = null;
      w.reject(new Error(`socket closed (${code}) while waiting for ${w.type}`));
    }
    u.onOpen = null;
    u.onClosed?.(c);
  },
};

/** Everything that is not a fast-path bench message: parsed as JSON. */
function control(c: Conn<Client>, text: string): void {
  stats.controlFrames++;
  let msg: Record<string, unknown>;
  try {
    msg = JSON.parse(text) as Record<string, unknown>;
  } catch {
    count(stats.errors, "unparseable_frame");
    return;
  }
  const type = msg.type;
  if (type === "message" || type === "send") {
    // A relayed message in a layout the fast path does not know: slower, still counted.
    if (readBenchData(msg.data)) {
      stats.slowFrames++;
      received(c, parsed.src, parsed.seq, parsed.ts, nowUs());
    }
    return;
  }
  if (type === "error") count(stats.errors, String(msg.code));
  const w = c.user.waiter;
  if (w === null) return;
  if (type === w.type) {
    c.user.waiter = null;
    w.resolve(msg);
  } else if (type === "error") {
    c.user.waiter = null;
    w.reject(new Error(`${String(msg.code)}: ${String(msg.message)} (waiting for ${w.type})`));
  }
}

// ------------------------------------------------------------------ setup

let host = "127.0.0.1";
let port = 8080;

function openConn(user: Client): Promise<Conn<Client>> {
  return new Promise((resolve, reject) => {
    const c = new Conn<Client>(handler, user);
    user.onOpen = resolve;
    user.onClosed = () => reject(new Error(`connection failed or closed during upgrade (${c.closeReason || c.closeCode})`));
    c.connect(host, port);
  });
}

function expect(c: Conn<Client>, type: string): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    c.user.waiter = { type, resolve, reject };
  });
}

async function createRoom(maxClients: number): Promise<{ conn: Conn<Client>; code: string }> {
  const conn = await openConn(new Client());
  conn.user.onClosed = null;
  const answer = expect(conn, "created");
  conn.sendText(JSON.stringify({ type: "create", clientId: "bench-" + crypto.randomUUID(), maxClients }));
  const msg = await answer;
  conn.user.slot = Number(msg.index);
  return { conn, code: String(msg.room) };
}

async function joinRoom(code: string): Promise<Conn<Client>> {
  const conn = await openConn(new Client());
  conn.user.onClosed = null;
  const answer = expect(conn, "joined");
  conn.sendText(JSON.stringify({ type: "join", clientId: "bench-" + crypto.randomUUID(), room: code }));
  const msg = await answer;
  conn.user.slot = Number(msg.index);
  return conn;
}

async function setupRoom(size: number, maxClients: number): Promise<BenchRoom> {
  const { conn, code } = await createRoom(maxClients);
  const room: BenchRoom = { code, size, clients: [conn] };
  const joiners = await Promise.all(Array.from({ length: size - 1 }, () => joinRoom(code)));
  for (const j of joiners) room.clients[j.user.slot] = j;
  for (const c of [conn, ...joiners]) {
    c.user.room = room;
    c.user.recv = new Int32Array(size);
  }
  return room;
}

/** Run `count` tasks with at most `limit` in flight. */
async function pool<T>(count: number, limit: number, task: (i: number) => Promise<T>): Promise<T[]> {
  const results: T[] = new Array<T>(count);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) {
      const i = next++;
      results[i] = await task(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker));
  return results;
}

function withTimeout<T>(p: Promise<T>, seconds: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${seconds} s: ${what}`)), seconds * 1000);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------- measurement

interface Sample {
  t: number;
  serverCpuUs: number;
  selfCpuUs: number;
  cores: CoreTicks;
  delivered: number;
  sent: number;
  cycles: number;
}

let cycles = 0;

function sample(o: LoadOptions): Sample {
  const u = process.cpuUsage();
  return {
    t: performance.now(),
    serverCpuUs: o.serverPid > 0 ? processCpuUs(o.serverPid) : NaN,
    selfCpuUs: u.user + u.system,
    cores: coreTicks(),
    delivered: stats.delivered,
    sent: stats.sent,
    cycles,
  };
}

export interface LoadResult {
  scenario: Scenario;
  url: string;
  options: LoadOptions;
  loadavgAtStart: string;
  windowS: number;
  deliveries: number;
  deliveriesPerS: number;
  sentPerS: number;
  cycles: number;
  cyclesPerS: number;
  serverCpuPct: number;
  serverCpuUsPerDelivery: number;
  serverCpuUsPerCycle: number;
  genCpuPct: number;
  genCpuUsPerDelivery: number;
  /** Busy fraction of each core over the window, and the part not explained by server / generator. */
  coreBusyPct: number[];
  otherLoadPct: { genCore: number; serverCore: number };
  latencyP50Us: number;
  latencyP99Us: number;
  latencyMaxUs: number;
  /** Over the whole run after the drain: delivered / what the sends should have produced. */
  deliveryRatio: number;
  gaps: number;
  reordered: number;
  slowFrames: number;
  controlFrames: number;
  unexpectedCloses: number;
  errors: Record<string, number>;
  closeCodes: Record<string, number>;
  serverRssBytes: number;
  idle?: { conns: number; rssBaselineBytes: number; rssWarmBytes: number; warmConns: number; rssBytes: number; kbPerConn: number; kbPerConnMarginal: number; connectS: number; alive: number };
  ws: typeof wsStats;
}

function summarize(o: LoadOptions, a: Sample, b: Sample, loadAtStart: string): LoadResult {
  const dt = (b.t - a.t) / 1000;
  const deliveries = b.delivered - a.delivered;
  const serverUs = b.serverCpuUs - a.serverCpuUs;
  const selfUs = b.selfCpuUs - a.selfCpuUs;
  const cyc = b.cycles - a.cycles;
  const busy = coreBusy(a.cores, b.cores);
  const serverPct = (serverUs / (dt * 1e6)) * 100;
  const genPct = (selfUs / (dt * 1e6)) * 100;
  const busyPct = busy.map((x) => x * 100);
  return {
    scenario: o.scenario,
    url: o.url,
    options: o,
    loadavgAtStart: loadAtStart,
    windowS: dt,
    deliveries,
    deliveriesPerS: deliveries / dt,
    sentPerS: (b.sent - a.sent) / dt,
    cycles: cyc,
    cyclesPerS: cyc / dt,
    serverCpuPct: serverPct,
    serverCpuUsPerDelivery: deliveries > 0 ? serverUs / deliveries : NaN,
    serverCpuUsPerCycle: cyc > 0 ? serverUs / cyc : NaN,
    genCpuPct: genPct,
    genCpuUsPerDelivery: deliveries > 0 ? selfUs / deliveries : NaN,
    coreBusyPct: busyPct,
    otherLoadPct: {
      genCore: o.genCore >= 0 ? Math.max(0, (busyPct[o.genCore] ?? 0) - genPct) : NaN,
      serverCore: o.serverCore >= 0 ? Math.max(0, (busyPct[o.serverCore] ?? 0) - serverPct) : NaN,
    },
    latencyP50Us: hist.percentile(0.5),
    latencyP99Us: hist.percentile(0.99),
    latencyMaxUs: hist.percentile(1),
    deliveryRatio: stats.expected > 0 ? stats.delivered / stats.expected : NaN,
    gaps: stats.gaps,
    reordered: stats.reordered,
    slowFrames: stats.slowFrames,
    controlFrames: stats.controlFrames,
    unexpectedCloses: stats.unexpectedCloses,
    errors: stats.errors,
    closeCodes: stats.closeCodes,
    serverRssBytes: o.serverPid > 0 ? processRssBytes(o.serverPid) : NaN,
    ws: wsStats,
  };
}

/** Warm up, then measure one window; `stop` ends the load before the drain. */
async function measure(o: LoadOptions, loadAtStart: string, stop: () => void): Promise<LoadResult> {
  await sleep(o.warmupS * 1000);
  hist.clear();
  stats.measuring = true;
  const a = sample(o);
  await sleep(o.durationS * 1000);
  const b = sample(o);
  stats.measuring = false;
  stats.stopping = true;
  stop();
  // Drain: wait (bounded) for every delivery the sends should produce.
  const deadline = performance.now() + o.drainS * 1000;
  while (stats.delivered < stats.expected && performance.now() < deadline) await sleep(20);
  return summarize(o, a, b, loadAtStart);
}

// ---------------------------------------------------------------- scenarios

async function setupRooms(o: LoadOptions, size: number): Promise<BenchRoom[]> {
  return withTimeout(pool(o.rooms, Math.max(1, Math.floor(o.connectConcurrency / size)), () => setupRoom(size, size)), o.setupTimeoutS, `setting up ${o.rooms} rooms of ${size}`);
}

function prepareSenders(rooms: BenchRoom[], o: LoadOptions, targeted: boolean): Conn<Client>[] {
  const all: Conn<Client>[] = [];
  for (const r of rooms) {
    for (const c of r.clients) {
      if (c === undefined) throw new Error(`room ${r.code} has a hole in its slots`);
      const target = targeted ? (c.user.slot + 1) % r.size : -1;
      c.user.target = target;
      c.user.bench = benchFrame(c.user.slot, target, o.dataBytes, o.numbered);
      all.push(c);
    }
  }
  return all;
}

async function openLoop(o: LoadOptions, targeted: boolean, loadAtStart: string): Promise<LoadResult> {
  const rooms = await setupRooms(o, o.size);
  const clients = prepareSenders(rooms, o, targeted);
  const start = performance.now();
  const n = clients.length;
  const tick = (): void => {
    const elapsedS = (performance.now() - start) / 1000;
    const t = nowUs();
    for (let i = 0; i < n; i++) {
      const c = clients[i]!;
      const due = Math.floor(elapsedS * o.hz + i / n);
      while (c.user.sent < due) sendBench(c, t);
    }
  };
  const timer = setInterval(tick, 5);
  const result = await measure(o, loadAtStart, () => clearInterval(timer));
  await closeClients(clients);
  return result;
}

async function closedLoop(o: LoadOptions, targeted: boolean, loadAtStart: string): Promise<LoadResult> {
  const rooms = await setupRooms(o, o.size);
  const clients = prepareSenders(rooms, o, targeted);
  const w = o.window;
  // A receipt may free a window slot of its sender: refill it.
  const refill = (receiver: Conn<Client>, src: number): void => {
    if (stats.stopping) return;
    const room = receiver.user.room!;
    const sender = room.clients[src]!;
    const su = sender.user;
    let acked: number;
    if (su.target >= 0) {
      acked = receiver.user.recv[src]!;
    } else {
      acked = 0x7fffffff;
      for (let p = 0; p < room.size; p++) {
        if (p === src) continue;
        const r = room.clients[p]!.user.recv[src]!;
        if (r < acked) acked = r;
      }
    }
    if (su.sent - acked < w) {
      const t = nowUs();
      while (su.sent - acked < w) sendBench(sender, t);
    }
  };
  for (const c of clients) c.user.onMessage = refill;
  const t = nowUs();
  for (const c of clients) for (let i = 0; i < w; i++) sendBench(c, t);
  const result = await measure(o, loadAtStart, () => {});
  await closeClients(clients);
  return result;
}

async function churn(o: LoadOptions, loadAtStart: string): Promise<LoadResult> {
  const roomSize = 4;
  const lane = async (): Promise<void> => {
    while (!stats.stopping) {
      const began = performance.now();
      const room = await withTimeout(setupRoom(roomSize, roomSize), o.setupTimeoutS, "churn room setup");
      const host = room.clients[0]!;
      host.user.bench = benchFrame(0, -1, o.dataBytes);
      let got = 0;
      const all = room.clients as Conn<Client>[];
      await withTimeout(
        new Promise<void>((resolve) => {
          for (const c of all) c.user.onMessage = () => { if (++got === roomSize - 1) resolve(); };
          sendBench(host, nowUs());
        }),
        o.setupTimeoutS,
        "churn broadcast",
      );
      await closeClients(all);
      if (stats.measuring) {
        cycles++;
        hist.add(Math.round((performance.now() - began) * 1000));
      }
    }
  };
  const lanes = Array.from({ length: o.lanes }, lane);
  const result = await measure(o, loadAtStart, () => {});
  await withTimeout(Promise.all(lanes), o.setupTimeoutS, "churn lanes to finish");
  return result;
}

async function idle(o: LoadOptions, loadAtStart: string): Promise<LoadResult> {
  const size = o.idleRoomSize;
  const roomCount = Math.ceil(o.idleConns / size);
  const rssBaseline = processRssBytes(o.serverPid);
  const t0 = performance.now();
  // A first tenth warms the server's code paths and allocators; the rest gives the marginal cost.
  const warmRooms = Math.max(1, Math.floor(roomCount / 10));
  const perRoom = Math.max(1, Math.floor(o.connectConcurrency / size));
  const first = await withTimeout(pool(warmRooms, perRoom, () => setupRoom(size, size)), o.setupTimeoutS, "idle warm-up rooms");
  await sleep(500);
  const rssWarm = processRssBytes(o.serverPid);
  const rest = await withTimeout(pool(roomCount - warmRooms, perRoom, () => setupRoom(size, size)), o.setupTimeoutS * 4, `idle: ${roomCount} rooms`);
  const connectS = (performance.now() - t0) / 1000;
  const conns = [...first, ...rest].flatMap((r) => r.clients as Conn<Client>[]);
  // Settle, then the window measures what idle connections cost the server's CPU (heartbeats).
  const result = await measure(o, loadAtStart, () => {});
  const rss = processRssBytes(o.serverPid);
  const alive = conns.filter((c) => c.state === State.Open).length;
  result.idle = {
    conns: conns.length,
    rssBaselineBytes: rssBaseline,
    rssWarmBytes: rssWarm,
    warmConns: warmRooms * size,
    rssBytes: rss,
    kbPerConn: (rss - rssBaseline) / 1024 / conns.length,
    kbPerConnMarginal: (rss - rssWarm) / 1024 / (conns.length - warmRooms * size),
    connectS,
    alive,
  };
  result.serverRssBytes = rss;
  await closeClients(conns);
  return result;
}

/** Stops counting bench messages, then closes every connection (bounded). */
function closeClients(conns: Conn<Client>[]): Promise<void> {
  for (const c of conns) c.user.onMessage = null;
  return closeAll(conns);
}

// ---------------------------------------------------------------------- main

export async function runLoad(o: LoadOptions): Promise<LoadResult> {
  const url = new URL(o.url);
  host = url.hostname.replace(/^\[|\]$/g, "");
  port = Number(url.port || 80);
  const loadAtStart = loadavg();
  switch (o.scenario) {
    case "fanout-open": return openLoop(o, false, loadAtStart);
    case "fanout-busy": return openLoop({ ...o, hz: BUSY_HZ }, false, loadAtStart);
    case "targeted-open": return openLoop(o, true, loadAtStart);
    case "fanout-closed": return closedLoop(o, false, loadAtStart);
    case "targeted-closed": return closedLoop(o, true, loadAtStart);
    case "churn": return churn(o, loadAtStart);
    case "idle": return idle(o, loadAtStart);
  }
}

if (import.meta.main) {
  const o = parseArgs(process.argv.slice(2));
  try {
    const result = await runLoad(o);
    console.log(JSON.stringify(result));
    process.exit(0);
  } catch (err) {
    console.error(`loadgen ${o.scenario}: ${err instanceof Error ? err.message : String(err)}`);
    console.log(JSON.stringify({ scenario: o.scenario, error: String(err), errors: stats.errors, closeCodes: stats.closeCodes, ws: wsStats }));
    process.exit(1);
  }
}
