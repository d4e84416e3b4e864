// A deploy ends no game (issue 17): on SIGTERM a relay hands each room to another
// machine of its region, and the players follow it. Real relay processes on the
// loopback Fly cluster (test/multi-cluster.ts), each scenario with its own cluster:
//
//   main:   h1 127.0.0.2, h2 127.0.0.3 (ams)   x1 127.0.0.4 (nrt, alone in its region)
//   refuse: r1 127.0.0.5 (ams, secret)   r2 127.0.0.6 (ams, another secret)   r3 127.0.0.7 (ams, no secret)
//   faults: f1 127.0.0.8, f2 127.0.0.9 (ams, same secret)
//
// Timings are shrunk by env (HANDOFF_TIMEOUT_MS, MOVING_GRACE_MS) so the suite stays fast;
// every wait is for an event or a condition, bounded, and says what it waited for.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createRoom, joinRoom, type Room } from "../client.ts";
import { generateRoomCode } from "../regions.ts";
import { PEER_SECRET_HEADER } from "../server.ts";
import { type Frame, TestClient, within } from "./helpers.ts";
import { startCluster, type Cluster, type ClusterMachine } from "./multi-cluster.ts";

const SECRET = `secret-${crypto.randomUUID()}`;
const FAST = { HANDOFF_TIMEOUT_MS: "800", MOVING_GRACE_MS: "5000", DRAIN_TIMEOUT_MS: "30000", LOG_LEVEL: "info" };
const WAIT_MS = 8000;
const SEND_EVERY_MS = 50; // 20 Hz, as the issue asks
/** Client timings: fast retries, so a fallback costs little wall time. */
const CLIENT = { retryInitialMs: 50, retryMaxMs: 200, connectTimeoutMs: 3000 };

// ------------------------------------------------------------------ helpers

/** Wakes waiters whenever something they may be waiting for changed. */
class Changes {
  private waiters = new Set<() => void>();
  notify(): void {
    for (const wake of [...this.waiters]) wake();
  }
  /** Resolves once `cond()` holds, re-checked on every change; bounded. */
  until(cond: () => boolean, what: string, ms = WAIT_MS): Promise<void> {
    return within(
      new Promise<void>((resolve) => {
        const check = () => {
          if (!cond()) return;
          this.waiters.delete(check);
          resolve();
        };
        this.waiters.add(check);
        check();
      }),
      what,
      ms,
    );
  }
}

/** A condition on state no event announces (another process's log): checked every 25 ms, bounded. */
async function eventually(cond: () => boolean, what: string, ms = WAIT_MS): Promise<void> {
  const tick = new Changes();
  const timer = setInterval(() => tick.notify(), 25);
  try {
    await tick.until(cond, what, ms);
  } finally {
    clearInterval(timer);
  }
}

const changes = new Changes();

/** A game member that streams `{k: name, i: 1, 2, …}` at 20 Hz and records what it receives. */
interface Streamer {
  name: string;
  sent: number;
  /** Per sender name, the numbers received in arrival order. */
  got: Map<string, number[]>;
  arrivals: number[];
  /** Starts sending (once everyone is in: a number sent before a member joined never reaches it). */
  start(): void;
  stop(): void;
}

function stream(name: string, send: (data: unknown) => void, ready: () => boolean = () => true): Streamer {
  let timer: Timer | undefined;
  const s: Streamer = {
    name,
    sent: 0,
    got: new Map(),
    arrivals: [],
    start() {
      timer ??= setInterval(() => {
        if (!ready()) return;
        s.sent++;
        send({ k: name, i: s.sent });
      }, SEND_EVERY_MS);
    },
    stop: () => clearInterval(timer),
  };
  return s;
}

function received(s: Streamer, data: unknown): void {
  const d = data as { k?: unknown; i?: unknown };
  if (typeof d?.k !== "string" || typeof d.i !== "number") return;
  const list = s.got.get(d.k) ?? [];
  list.push(d.i);
  s.got.set(d.k, list);
  s.arrivals.push(performance.now());
  changes.notify();
}

/** A /client.js member (the module the relay serves as /client.js, run in Bun). */
interface Member extends Streamer {
  room: Room;
  /** ms from `reconnecting` (cause moved) to `reconnected`, per move. */
  moves: number[];
  errors: string[];
}

function member(name: string, room: Room): Member {
  const m = stream(name, (data) => room.send(data)) as Member;
  Object.assign(m, { room, moves: [], errors: [] });
  let movedAt = 0;
  room.addEventListener("message", (e) => received(m, e.detail.data));
  room.addEventListener("reconnecting", (e) => {
    if (e.detail.cause === "moved") movedAt = performance.now();
    changes.notify();
  });
  room.addEventListener("reconnected", () => {
    if (movedAt) m.moves.push(performance.now() - movedAt);
    movedAt = 0;
    changes.notify();
  });
  room.addEventListener("error", (e) => m.errors.push(e.detail.code));
  room.addEventListener("closed", () => changes.notify());
  return m;
}

/**
 * A Party-Sockets 2.x-style client: a bare WebSocket that knows none of our additions. On any
 * close but 4000/4001 it reconnects after its own short delay, pinned to the machine it last
 * joined (`/<code>?instance=<id>`), and rejoins with its clientId (no resume).
 */
class PartySocketsClient {
  readonly clientId = `raw-${crypto.randomUUID()}`;
  instance = "";
  index = -1;
  joined = false;
  joins = 0;
  closes: number[] = [];
  /** Sends the relay refused with `moving` (never silently lost; a 2.x client does not know which ones). */
  refused = 0;
  /** Which socket (its join count) each number went out on, and the sockets the relay closed with 4005. */
  readonly socketOf = new Map<number, number>();
  readonly movedSockets = new Set<number>();
  private ws!: WebSocket;
  readonly streamer: Streamer;

  constructor(private readonly cluster: Cluster, readonly code: string) {
    this.streamer = stream(
      "raw",
      (data) => {
        this.socketOf.set((data as { i: number }).i, this.joins);
        this.ws.send(JSON.stringify({ type: "send", data }));
      },
      () => this.joined,
    );
    this.connect(`/${code}`);
  }

  private connect(path: string): void {
    const ws = new WebSocket(this.cluster.proxy.wsUrl + path);
    this.ws = ws;
    ws.onopen = () => ws.send(JSON.stringify({ type: "join", clientId: this.clientId, room: this.code }));
    ws.onmessage = (e) => {
      const f = JSON.parse(String(e.data)) as Frame;
      if (f.type === "joined") {
        Object.assign(this, { instance: f.instance, index: f.index, joined: true });
        this.joins++;
      } else if (f.type === "message") {
        received(this.streamer, f.data);
      } else if (f.type === "error" && f.code === "moving") {
        this.refused++;
      }
      changes.notify();
    };
    ws.onclose = (e) => {
      if (ws !== this.ws) return;
      this.joined = false;
      this.closes.push(e.code);
      if (e.code === 4005) this.movedSockets.add(this.joins);
      changes.notify();
      if (e.code === 4000 || e.code === 4001 || this.stopped) return;
      setTimeout(() => this.connect(`/${this.code}?instance=${this.instance}`), 100);
    };
  }

  stopped = false;
  close(): void {
    this.stopped = true;
    this.streamer.stop();
    this.ws.close();
  }
}

/** A raw host pinned (by Fly's own header) to one machine: creates the room and can close it. */
async function rawHost(cluster: Cluster, machine: string): Promise<{ host: TestClient; code: string }> {
  const host = await TestClient.connect(cluster.proxy.wsUrl + "/", { "fly-force-instance-id": machine });
  host.send({ type: "create", clientId: `host-${crypto.randomUUID()}`, maxClients: 8 });
  const created = await host.next("created");
  expect(created.instance).toBe(machine);
  return { host, code: created.room };
}

function lines(cluster: Cluster, id: string): Record<string, unknown>[] {
  return (cluster.logs.get(id) ?? []).map((l) => JSON.parse(l) as Record<string, unknown>);
}
const logged = (cluster: Cluster, id: string, event: string, fields: Record<string, unknown> = {}) =>
  lines(cluster, id).some((l) => l.event === event && Object.entries(fields).every(([k, v]) => l[k] === v));

/** A raw client's numbers at a member: none twice, in order, and each one sent either arrived or was answered `moving`. */
function expectRawAccounted(at: Streamer, raw: PartySocketsClient): number[] {
  const got = at.got.get("raw") ?? [];
  expect(got.every((n, i) => i === 0 || n > got[i - 1]!)).toBe(true);
  const arrived = new Set(got);
  const missing = Array.from({ length: raw.streamer.sent }, (_, i) => i + 1).filter((n) => !arrived.has(n));
  // Refused with `moving`, or still in flight when the relay closed that socket with 4005 (as
  // with any close a relay starts: a 2.x client has no acknowledgement): the tail of that socket.
  const socket = (n: number) => raw.socketOf.get(n)!;
  const tailOfMoved = (n: number) => raw.movedSockets.has(socket(n)) && got.every((g) => socket(g) !== socket(n) || g < n);
  expect(missing.length).toBeGreaterThanOrEqual(raw.refused);
  expect(missing.length === raw.refused || missing.every(tailOfMoved)).toBe(true);
  return missing;
}

/** Every number 1..last, once each, in order. */
function exactlyOnceInOrder(got: number[] | undefined, last: number): boolean {
  return got !== undefined && got.length === last && got.every((n, i) => n === i + 1);
}

async function exitCode(cluster: Cluster, id: string): Promise<number> {
  return within(cluster.procs.get(id)!.exited, `${id} to exit`, WAIT_MS);
}

function machine(id: string, region: string, host: string, env?: Record<string, string>): ClusterMachine {
  return { id, region, host, env };
}

const percentile = (values: number[], p: number) => [...values].sort((a, b) => a - b)[Math.min(values.length - 1, Math.floor(p * values.length))]!;

/** A valid v1 transfer of a new ams room, for the endpoint tests. */
function transferBody(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    v: 1,
    transfer: crypto.randomUUID(),
    source: "elsewhere",
    code: generateRoomCode("ams", () => false),
    maxClients: 4,
    origin: "https://party.example",
    slots: [{ clientId: "t-host", since: 0 }, { clientId: "t-player", since: 0 }],
    state: '{"type":"state","seq":2,"data":{"round":3}}',
    seq: 2,
    frames: [
      { seq: 1, ageMs: 10, from: 0, to: -1, frame: '{"type":"message","from":0,"seq":1,"data":"hello"}' },
      { seq: 2, ageMs: 5, from: 0, to: -1, frame: '{"type":"state","seq":2,"data":{"round":3}}' },
    ],
    lost: { broadcastSeq: 0, broadcastFrom: -1, broadcastOtherSeq: 0, targeted: [] },
    ...overrides,
  };
}

// ----------------------------------------------------------------- main cluster

describe("SIGTERM hands each room to the region's other machine", () => {
  let cluster: Cluster;
  const address = (id: string) => `http://${{ h1: "127.0.0.2", h2: "127.0.0.3", x1: "127.0.0.4" }[id]}:${cluster.port}`;
  const post = (id: string, body: unknown, headers: Record<string, string> = { [PEER_SECRET_HEADER]: SECRET }) =>
    fetch(`${address(id)}/peer/rooms`, { method: "POST", headers, body: typeof body === "string" ? body : JSON.stringify(body) });

  beforeAll(async () => {
    cluster = await startCluster({
      app: "ps-handoff",
      machines: [machine("h1", "ams", "127.0.0.2"), machine("h2", "ams", "127.0.0.3"), machine("x1", "nrt", "127.0.0.4")],
      edgeRegion: "ams",
      env: { ...FAST, PEER_SECRET: SECRET },
    });
  }, 30_000);
  afterAll(() => cluster?.stop());

  describe("the transfer endpoint", () => {
    test("needs the secret: none or a wrong one is 401, and adopts nothing", async () => {
      const body = transferBody();
      expect((await post("h2", body, {})).status).toBe(401);
      expect((await post("h2", body, { [PEER_SECRET_HEADER]: SECRET + "x" })).status).toBe(401);
      expect((await post("h2", body, { [PEER_SECRET_HEADER]: "" })).status).toBe(401);
      expect((await fetch(`${address("h2")}/room/${body.code}`)).status).toBe(404);
    });

    test("a valid transfer is adopted (201) under its code; the same transfer again is 200, another one for that code 409", async () => {
      const body = transferBody();
      const first = await post("h2", body);
      expect(first.status).toBe(201);
      expect(await first.json()).toEqual({ room: body.code, transfer: body.transfer });
      expect((await post("h2", body)).status).toBe(200);
      expect((await post("h2", { ...body, transfer: crypto.randomUUID() })).status).toBe(409);
      const info = await fetch(`${address("h2")}/room/${body.code}`);
      expect(info.status).toBe(200);
      expect(await info.json()).toMatchObject({ clients: 0, maxClients: 4, origin: "https://party.example" });
    });

    test("an adopted room keeps its slots, state, seq, resume ring and each slot's highest n: a member reclaims its slot and resumes", async () => {
      const body = transferBody({ slots: [{ clientId: "t-host", since: 0 }, { clientId: "t-player", since: 0, received: 7 }] });
      expect((await post("h2", body)).status).toBe(201);
      const player = await TestClient.connect(`ws://127.0.0.3:${cluster.port}/${body.code}`);
      player.send({ type: "join", clientId: "t-player", room: body.code, resume: 0 });
      expect(await player.next("joined")).toMatchObject({ index: 1, seq: 2, resumed: true, peers: [], received: 7 });
      expect(await player.next("message")).toEqual({ type: "message", from: 0, seq: 1, data: "hello" });
      expect(await player.next("state")).toEqual({ type: "state", seq: 2, data: { round: 3 } });
      const stranger = await TestClient.connect(`ws://127.0.0.3:${cluster.port}/${body.code}`);
      stranger.send({ type: "join", clientId: "someone-new", room: body.code });
      expect((await stranger.next("joined")).index).toBe(2);
      player.close();
      stranger.close();
    });

    const hostile: [string, () => unknown, number][] = [
      ["not JSON", () => "{not json", 400],
      ["an array", () => [], 400],
      ["no version", () => ({ ...transferBody(), v: undefined }), 400],
      ["an unknown version", () => transferBody({ v: 2 }), 422],
      ["a version from the future", () => transferBody({ v: 99 }), 422],
      ["no transfer id", () => transferBody({ transfer: "" }), 400],
      ["a bad source", () => transferBody({ source: "a b" }), 400],
      ["a malformed code", () => transferBody({ code: "ABC" }), 400],
      ["a code of another region", () => transferBody({ code: generateRoomCode("nrt", () => false) }), 400],
      ["maxClients 0", () => transferBody({ maxClients: 0 }), 400],
      ["maxClients past MAX_ROOM_CLIENTS", () => transferBody({ maxClients: 100_000 }), 400],
      ["an http url", () => transferBody({ url: "http://x.example/" }), 400],
      ["no slots", () => transferBody({ slots: [] }), 400],
      ["slots not a list", () => transferBody({ slots: { 0: "x" } }), 400],
      ["a clientId too long", () => transferBody({ slots: [{ clientId: "x".repeat(129), since: 0 }] }), 400],
      ["a clientId not a string", () => transferBody({ slots: [{ clientId: 7, since: 0 }] }), 400],
      ["duplicate clientIds", () => transferBody({ slots: [{ clientId: "a", since: 0 }, { clientId: "a", since: 0 }] }), 400],
      ["a slot from the future", () => transferBody({ slots: [{ clientId: "a", since: 99 }] }), 400],
      ["too many slots", () => transferBody({ slots: Array.from({ length: 5000 }, (_, i) => ({ clientId: `c${i}`, since: 0 })) }), 400],
      ["a negative seq", () => transferBody({ seq: -1 }), 400],
      ["a state that is not a state frame", () => transferBody({ state: '{"type":"message","seq":1}' }), 400],
      ["frames out of order", () => transferBody({ frames: [...(transferBody().frames as unknown[])].reverse() }), 400],
      ["a frame that is not JSON", () => transferBody({ frames: [{ seq: 1, ageMs: 0, from: 0, to: -1, frame: "{" }] }), 400],
      ["a frame whose seq disagrees", () => transferBody({ frames: [{ seq: 1, ageMs: 0, from: 0, to: -1, frame: '{"type":"message","from":0,"seq":2}' }] }), 400],
      ["a frame to a slot that does not exist", () => transferBody({ frames: [{ seq: 1, ageMs: 0, from: 0, to: 7, frame: '{"type":"message","from":0,"seq":1}' }] }), 400],
      ["a frame from a slot that does not exist", () => transferBody({ frames: [{ seq: 1, ageMs: 0, from: 9, to: -1, frame: '{"type":"message","from":9,"seq":1}' }] }), 400],
      ["a malformed lost record", () => transferBody({ lost: { broadcastSeq: "x" } }), 400],
      ["a host grace past HOST_GRACE_MS", () => transferBody({ hostGraceMs: 10 ** 9 }), 400],
      ["a highest n that is not a frame number", () => transferBody({ slots: [{ clientId: "a", since: 0, received: 1.5 }] }), 400],
      ["a kicked host", () => transferBody({ slots: [{ clientId: "a", since: 0, kicked: true }] }), 400],
      ["a kicked flag not a boolean", () => transferBody({ slots: [{ clientId: "a", since: 0 }, { clientId: "b", since: 0, kicked: 1 }] }), 400],
    ];
    test.each(hostile)("%s is refused (4xx)", async (_, body, status) => {
      const res = await post("h2", body());
      expect(res.status).toBe(status);
      // The reason names a field, never a value (clientIds are secrets).
      expect(await res.text()).not.toContain("xxxxxxxx");
    });

    test("300 seeded mutants of a valid transfer: never a 5xx, never a crash, and the peer keeps serving", async () => {
      let seed = 17;
      const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
      const pick = <T,>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;
      const oddValues = [null, -1, 0, 1.5, 2 ** 60, "", "x".repeat(300), [], {}, true, [-1], [0, 0], "{", '{"type":"state","seq":1}'];
      /** Replaces one value somewhere in the body (any depth) with an odd one, or deletes it. */
      const mutate = (node: unknown): unknown => {
        if (Array.isArray(node) && node.length > 0 && random() < 0.7) {
          const at = Math.floor(random() * node.length);
          return node.map((v, i) => (i === at ? mutate(v) : v));
        }
        if (node && typeof node === "object" && !Array.isArray(node) && random() < 0.8) {
          const key = pick(Object.keys(node));
          const copy: Record<string, unknown> = { ...(node as Record<string, unknown>) };
          if (random() < 0.15) delete copy[key];
          else copy[key] = mutate(copy[key]);
          return copy;
        }
        return pick(oddValues);
      };
      const statuses = new Map<number, number>();
      for (let i = 0; i < 300; i++) {
        const res = await post("h2", mutate(transferBody()));
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        expect(res.status).toBeLessThan(500);
      }
      expect(statuses.get(400)).toBeGreaterThan(100);
      expect((await fetch(`${address("h2")}/health`)).status).toBe(200);
    });

    test("a body past the bound is 413, declared or streamed, and the peer keeps serving", async () => {
      const huge = JSON.stringify(transferBody({ origin: "x".repeat(8 * 1024 * 1024) }));
      expect((await post("h2", huge)).status).toBe(413);
      const chunks = new ReadableStream<Uint8Array>({
        start(controller) {
          for (let i = 0; i < 64; i++) controller.enqueue(new Uint8Array(128 * 1024).fill(32));
          controller.close();
        },
      });
      const streamed = await fetch(`${address("h2")}/peer/rooms`, { method: "POST", headers: { [PEER_SECRET_HEADER]: SECRET }, body: chunks });
      expect(streamed.status).toBe(413);
      expect((await fetch(`${address("h2")}/health`)).status).toBe(200);
      const { host } = await rawHost(cluster, "h2");
      host.close();
    });

    test("only POST: another method with the secret is 405", async () => {
      expect((await fetch(`${address("h2")}/peer/rooms`, { headers: { [PEER_SECRET_HEADER]: SECRET } })).status).toBe(405);
    });
  });

  /** One hand-off with a host, two /client.js players and a raw Party-Sockets client; returns the pauses seen. */
  async function runHandOff(run: number): Promise<{ pauses: number[]; gaps: number[] }> {
    const host = member("host", await createRoom(cluster.proxy.url, { maxClients: 8, ...CLIENT }));
    const code = host.room.code;
    const from = host.room.instance;
    const to = from === "h1" ? "h2" : "h1";
    const p1 = member("p1", await joinRoom(cluster.proxy.url, code, CLIENT));
    const p2 = member("p2", await joinRoom(cluster.proxy.url, code, CLIENT));
    const raw = new PartySocketsClient(cluster, code);
    const members = [host, p1, p2];
    const everyone = [...members, raw.streamer];
    const slotsBefore = members.map((m) => m.room.index);
    await changes.until(() => raw.joined, "the raw client's join");
    for (const s of everyone) s.start();

    // In the first run a second room stays behind: its code is already held by the peer (a
    // forged transfer), so the peer refuses it (409) and the old machine keeps draining it
    // while it answers for the moved room with a fly-replay.
    let stay: { host: TestClient; code: string } | undefined;
    let kicked: string | undefined;
    if (run === 0) {
      stay = await rawHost(cluster, from);
      expect((await post(to, transferBody({ code: stay.code }))).status).toBe(201);
      // A kicked slot stays barred on the new machine.
      kicked = `kicked-${crypto.randomUUID()}`;
      const victim = await TestClient.connect(`${cluster.proxy.wsUrl}/${code}`);
      victim.send({ type: "join", clientId: kicked, room: code });
      host.room.kick((await victim.next("joined")).index);
      expect((await victim.closeCode()).code).toBe(4004);
    }

    const streamed = (n: number) => () => everyone.every((r) => everyone.every((s) => s === r || (r.got.get(s.name)?.length ?? 0) >= n));
    await changes.until(streamed(5), "5 numbers from every sender at every member");

    cluster.procs.get(from)!.kill("SIGTERM");
    await changes.until(() => members.every((m) => m.moves.length === 1) && raw.joins >= 2 && raw.joined, "every member to follow the room");
    expect(members.map((m) => m.room.instance)).toEqual([to, to, to]);
    expect(members.map((m) => m.room.code)).toEqual([code, code, code]);
    expect(members.map((m) => m.room.index)).toEqual(slotsBefore);
    expect(raw.instance).toBe(to);
    expect(raw.closes).toEqual([4005]);
    // `moved` named the peer: /client.js went straight there, pinned.
    expect(cluster.proxy.hops.filter((h) => h.path === `/${code}?instance=${to}` && h.via === "edge").length).toBeGreaterThanOrEqual(3);
    if (kicked) {
      const again = await TestClient.connect(`${cluster.proxy.wsUrl}/${code}`);
      again.send({ type: "join", clientId: kicked, room: code });
      expect((await again.error("kicked")).code).toBe("kicked");
      again.close();
    }

    if (stay) {
      // The old machine is alive (draining the room that stayed) and sends the moved code on.
      await eventually(() => logged(cluster, from, "room_moved", { room: code, peer: to }), "room_moved on the old machine");
      const answer = await fetch(`${address(from)}/room/${code}`);
      expect(answer.status).toBe(409);
      expect(answer.headers.get("fly-replay")).toBe(`instance=${to};timeout=5s;fallback=force_self`);
      expect(logged(cluster, from, "handoff_failed", { room: stay.code, peer: to, reason: "409" })).toBe(true);
      // ...and the room it kept still serves, pinned or not, from its own holder.
      const pinned = await fetch(`${cluster.proxy.url}/room/${stay.code}?instance=${to}`, { headers: { "fly-force-instance-id": from } });
      expect(pinned.headers.get("x-instance-id")).toBe(from);
      stay.host.send({ type: "close_room" });
    }

    const counts = new Map(everyone.map((s) => [s.name, s.sent + 10]));
    await changes.until(() => everyone.every((s) => s.sent >= counts.get(s.name)!), "10 more numbers from everyone on the peer");
    for (const s of everyone) s.stop();
    raw.streamer.stop();
    const last = new Map(everyone.map((s) => [s.name, s.sent]));
    // The raw client's last number went out on its new socket: once it is in, all that will arrive has.
    await changes.until(
      () => members.every((r) => members.every((s) => s === r || (r.got.get(s.name)?.length ?? 0) >= last.get(s.name)!) && r.got.get("raw")?.at(-1) === last.get("raw")),
      "every number at every /client.js member",
    ).catch((err) => {
      const seen = members.map((r) => `${r.name}: ${[...r.got].map(([k, v]) => `${k} ${v.length}/${last.get(k)} [${v.slice(-4)}] dup=${v.length - new Set(v).size}`).join(", ")}`);
      throw new Error(`${err.message}; refused raw ${raw.refused}; ${seen.join(" | ")}`);
    });
    let rawLost = 0;
    for (const r of members) {
      for (const s of members) if (s !== r) expect(exactlyOnceInOrder(r.got.get(s.name), last.get(s.name)!)).toBe(true);
      rawLost = expectRawAccounted(r, raw).length;
      expect(r.errors).toEqual([]);
    }

    const info = await fetch(`${cluster.proxy.url}/room/${code}`);
    expect(info.status).toBe(200);
    expect(info.headers.get("x-instance-id")).toBe(to);
    expect(await exitCode(cluster, from)).toBe(0);
    expect(logged(cluster, to, "room_adopted", { room: code, peer: from })).toBe(true);
    expect(await (await fetch(`${address(to)}/metrics`)).text()).toMatch(/party_sockets_rooms_adopted_total\{[^}]*\} [1-9]/);
    // ClientIds are bearer secrets: never in a log line, on either machine.
    for (const id of [from, to]) expect(cluster.logs.get(id)!.filter((line) => line.includes(raw.clientId) || line.includes("t-player"))).toEqual([]);

    const pauses = members.map((m) => m.moves[0]!);
    const gaps = members.map((m) => Math.max(...m.arrivals.slice(1).map((t, i) => t - m.arrivals[i]!)));
    console.log(`hand-off run ${run + 1} ${from} -> ${to}: reconnect ${pauses.map((p) => p.toFixed(0)).join("/")} ms, longest gap between messages ${gaps.map((g) => g.toFixed(0)).join("/")} ms, raw client: ${raw.refused} send(s) refused with moving, ${rawLost} missing in all (refused, or in flight at the 4005)`);
    for (const m of members) m.room.leave();
    raw.close();
    await cluster.restart(from);
    return { pauses, gaps };
  }

  test("host, two /client.js players and a raw Party-Sockets client end on the peer: same code and slots, every number once and in order; the old process exits 0", async () => {
    const pauses: number[] = [];
    const gaps: number[] = [];
    for (let run = 0; run < 3; run++) {
      const seen = await runHandOff(run);
      pauses.push(...seen.pauses);
      gaps.push(...seen.gaps);
    }
    const summary = (values: number[]) => `p50 ${percentile(values, 0.5).toFixed(0)} ms, max ${Math.max(...values).toFixed(0)} ms`;
    console.log(`pause a /client.js member saw over ${pauses.length} moves: moved -> reconnected ${summary(pauses)}; longest gap between messages (20 Hz senders) ${summary(gaps)}`);
  }, 60_000);

  test("no peer in the region (x1 is alone in nrt): the room stays and drains as before, nothing lost", async () => {
    const { host, code } = await rawHost(cluster, "x1");
    const p1 = member("p1", await joinRoom(cluster.proxy.url, code, CLIENT));
    const p2 = member("p2", await joinRoom(cluster.proxy.url, code, CLIENT));
    for (const p of [p1, p2]) p.start();
    await changes.until(() => (p1.got.get("p2")?.length ?? 0) >= 3 && (p2.got.get("p1")?.length ?? 0) >= 3, "numbers both ways");
    cluster.procs.get("x1")!.kill("SIGTERM");
    await eventually(() => logged(cluster, "x1", "handoff_failed", { room: code, reason: "no_peer" }), "handoff_failed no_peer");
    const after = p1.sent + 5;
    await changes.until(() => (p2.got.get("p1")?.length ?? 0) >= after, "the game going on while x1 drains");
    for (const m of [p1, p2]) m.stop();
    await changes.until(() => exactlyOnceInOrder(p2.got.get("p1"), p1.sent) && exactlyOnceInOrder(p1.got.get("p2"), p2.sent), "every number both ways");
    expect(p1.room.instance).toBe("x1");
    host.send({ type: "close_room" });
    expect(await exitCode(cluster, "x1")).toBe(0);
  }, 30_000);
});

// ------------------------------------------------------------ refusing peers

interface Game {
  cluster: Cluster;
  machine: string;
  host: TestClient;
  code: string;
  players: Member[];
  raw: PartySocketsClient;
}

/** A room on `machine` (raw host), two /client.js players and a raw client, all streaming. */
async function startGame(cluster: Cluster, machine: string): Promise<Game> {
  const { host, code } = await rawHost(cluster, machine);
  const players = [member("p1", await joinRoom(cluster.proxy.url, code, CLIENT)), member("p2", await joinRoom(cluster.proxy.url, code, CLIENT))];
  const raw = new PartySocketsClient(cluster, code);
  await changes.until(() => raw.joined, "the raw client's join");
  for (const s of [...players, raw.streamer]) s.start();
  await changes.until(() => players.every((p) => (p.got.get(p.name === "p1" ? "p2" : "p1")?.length ?? 0) >= 3), "the game under way");
  return { cluster, machine, host, code, players, raw };
}

/**
 * The hand-off failed: the game goes on where it was. Every /client.js number arrives once, in
 * order (sends refused with `moving` were sent again, without an error event); each raw number
 * either arrived or was answered with `moving`. Then the host ends the room and the machine exits 0.
 */
async function finishGame(game: Game): Promise<{ refused: number }> {
  const [p1, p2] = game.players as [Member, Member];
  const { raw } = game;
  const after = p1.sent + 5;
  await changes.until(() => (p2.got.get("p1")?.length ?? 0) >= after, "the game going on after the failed hand-off");
  for (const s of [p1, p2, raw.streamer]) s.stop();
  await changes.until(
    () => exactlyOnceInOrder(p2.got.get("p1"), p1.sent) && exactlyOnceInOrder(p1.got.get("p2"), p2.sent) && [p1, p2].every((p) => p.got.get("raw")?.at(-1) === raw.streamer.sent),
    "every number at both players, sends refused with moving included",
  );
  for (const p of [p1, p2]) {
    expectRawAccounted(p, raw);
    expect(p.errors).toEqual([]);
    expect(p.room.instance).toBe(game.machine);
  }
  expect(raw.closes).toEqual([]);
  game.host.send({ type: "close_room" });
  expect(await exitCode(game.cluster, game.machine)).toBe(0);
  return { refused: raw.refused };
}

describe("peers that refuse: another secret (401), no secret (hand-off off)", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster({
      app: "ps-handoff-refuse",
      machines: [
        machine("r1", "ams", "127.0.0.5", { PEER_SECRET: SECRET }),
        machine("r2", "ams", "127.0.0.6", { PEER_SECRET: "another-secret" }),
        machine("r3", "ams", "127.0.0.7"),
      ],
      edgeRegion: "ams",
      env: FAST,
    });
  }, 30_000);
  afterAll(() => cluster?.stop());

  test("without PEER_SECRET, /peer/rooms is an unknown path like any other (the status page)", async () => {
    const base = `http://127.0.0.7:${cluster.port}`;
    const unknown = await fetch(`${base}/no-such-path`);
    const peer = await fetch(`${base}/peer/rooms`, { method: "POST", headers: { [PEER_SECRET_HEADER]: SECRET }, body: JSON.stringify(transferBody()) });
    expect(peer.status).toBe(unknown.status);
    expect(await peer.text()).toBe(await unknown.text());
  });

  test("both peers refuse (401, and a status page that names no transfer): the room drains where it is, nothing lost", async () => {
    const game = await startGame(cluster, "r1");
    cluster.procs.get("r1")!.kill("SIGTERM");
    for (const reason of ["401", "200", "no_peer"]) {
      await eventually(() => logged(cluster, "r1", "handoff_failed", { room: game.code, reason }), `handoff_failed ${reason}`);
    }
    await finishGame(game);
  }, 30_000);
});

describe("faults: a frozen peer (timeout), then a draining peer (503)", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster({
      app: "ps-handoff-faults",
      machines: [machine("f1", "ams", "127.0.0.8"), machine("f2", "ams", "127.0.0.9")],
      edgeRegion: "ams",
      env: { ...FAST, PEER_SECRET: SECRET, MOVING_GRACE_MS: "1500" },
    });
  }, 30_000);
  afterAll(() => cluster?.stop());

  test("a peer frozen mid-transfer (SIGSTOP) times out: the room, frozen meanwhile, thaws and plays on; refused sends are resent (client) or answered (raw)", async () => {
    const stays = await startGame(cluster, "f2");
    const other = await startGame(cluster, "f1");
    cluster.procs.get("f1")!.kill("SIGSTOP");
    cluster.procs.get("f2")!.kill("SIGTERM");
    await eventually(() => logged(cluster, "f2", "handoff_failed", { room: stays.code, reason: "timeout" }), "f2's offer to the frozen f1 timing out", 5000);
    await eventually(() => logged(cluster, "f2", "handoff_failed", { room: stays.code, reason: "no_peer" }), "f2 keeping its room");
    cluster.procs.get("f1")!.kill("SIGCONT");

    // f1 drains too while f2 still does: f2 refuses with 503, so no room passes back and forth.
    cluster.procs.get("f1")!.kill("SIGTERM");
    await eventually(() => logged(cluster, "f1", "handoff_failed", { room: other.code, peer: "f2", reason: "503" }), "f2 refusing f1's room");
    await eventually(() => logged(cluster, "f1", "handoff_failed", { room: other.code, reason: "no_peer" }), "f1 keeping its room");
    expect(logged(cluster, "f2", "room_adopted")).toBe(false);
    const metrics = await (await fetch(`http://127.0.0.9:${cluster.port}/metrics`)).text();
    expect(metrics).toMatch(/party_sockets_handoffs_total\{[^}]*result="failed"\} [1-9]/);
    expect(metrics).toMatch(/party_sockets_handoffs_total\{[^}]*result="no_peer"\} [1-9]/);
    expect(metrics).toMatch(/party_sockets_errors_total\{[^}]*code="moving"\} [1-9]/);

    // The room on f2 was frozen for the whole timeout while everyone streamed at 20 Hz.
    const { refused } = await finishGame(stays);
    expect(refused).toBeGreaterThan(0);
    await finishGame(other);
  }, 40_000);
});
