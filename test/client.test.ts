// The browser client's state machine, run in Bun against a real in-process relay (no mocks).
// A loopback TCP proxy between client and relay cuts, refuses or silently freezes connections,
// which is how a phone's network fails (no close frame), and records each upgrade request line
// so the tests can see where a reconnect was pinned.
//
//   bun test test/client.test.ts

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { startProxy, type Proxy } from "./tcp-proxy.ts";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  CLIENT_DEFAULTS,
  createRoom,
  joinRoom,
  retryDelayMs,
  Room,
  RoomError,
  type ClientIdStore,
  type CommonOptions,
  type RoomEventDetails,
  type RoomEventType,
} from "../client.ts";
import { startRelay, type Relay } from "../server.ts";
import type { Server } from "bun";

// ------------------------------------------------------------------ helpers

const WAIT_MS = 4000;

/** Fast retries so the suite stays quick; heartbeats stay at their defaults unless a test shrinks them. */
const FAST: Partial<CommonOptions> = { retryInitialMs: 20, retryMaxMs: 100, connectTimeoutMs: 3000 };

const EVENT_TYPES: RoomEventType[] = [
  "message",
  "peer_joined",
  "peer_left",
  "state",
  "reconnecting",
  "reconnected",
  "error",
  "closed",
];

type Recorded = { [K in RoomEventType]: { type: K; detail: RoomEventDetails[K]; atMs: number } }[RoomEventType];

/**
 * Records every event of a room from the moment it resolved; `next(type)` hands out that type's
 * events in order, waiting (bounded) for one that has not arrived yet.
 */
function record(room: Room) {
  const log: Recorded[] = [];
  const cursors = new Map<RoomEventType, number>();
  const waiters = new Set<() => void>();
  for (const type of EVENT_TYPES) {
    room.addEventListener(type, (event) => {
      log.push({ type, detail: (event as CustomEvent).detail, atMs: performance.now() } as Recorded);
      for (const wake of [...waiters]) wake();
    });
  }
  const of = <K extends RoomEventType>(type: K) =>
    log.filter((e) => e.type === type).map((e) => e.detail as RoomEventDetails[K]);
  return {
    log,
    of,
    types: () => log.map((e) => e.type),
    next<K extends RoomEventType>(type: K, timeoutMs = WAIT_MS): Promise<RoomEventDetails[K]> {
      const take = (): RoomEventDetails[K] | undefined => {
        const seen = of(type);
        const i = cursors.get(type) ?? 0;
        if (i >= seen.length) return undefined;
        cursors.set(type, i + 1);
        return seen[i];
      };
      const now = take();
      if (now !== undefined) return Promise.resolve(now);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiters.delete(wake);
          reject(new Error(`no "${type}" event within ${timeoutMs} ms; saw: ${log.map((e) => e.type).join(", ")}`));
        }, timeoutMs);
        const wake = () => {
          const got = take();
          if (got === undefined) return;
          clearTimeout(timer);
          waiters.delete(wake);
          resolve(got);
        };
        waiters.add(wake);
      });
    },
  };
}

/** Messages in arrival order until `count` have come (bounded wait). */
async function messages(rec: ReturnType<typeof record>, count: number): Promise<unknown[]> {
  const out: unknown[] = [];
  for (let i = 0; i < count; i++) out.push((await rec.next("message")).data);
  return out;
}

async function rejection(promise: Promise<unknown>): Promise<RoomError> {
  try {
    await promise;
  } catch (error) {
    return error as RoomError;
  }
  throw new Error("expected a rejection");
}

/** Polls a condition the client exposes only as a property, failing with what it waited for. */
async function waitFor(done: () => boolean, what: string, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await Bun.sleep(10);
  }
}

function memoryStorage(): ClientIdStore & { map: Map<string, string> } {
  const map = new Map<string, string>();
  return {
    map,
    getItem: (key) => map.get(key) ?? null,
    setItem: (key, value) => void map.set(key, value),
    removeItem: (key) => void map.delete(key),
  };
}


let relay: Relay;
const cleanups: (() => unknown)[] = [];

beforeAll(() => {
  relay = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "silent", instanceId: "inst-a", region: "test" });
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await relay.stop();
});

function proxy(): Proxy {
  const p = startProxy(relay.port);
  cleanups.push(() => p.stop());
  return p;
}

/** Rooms are left at the end so that one test's rooms do not leak into the next's counts. */
function track<T extends Room>(room: T): T {
  cleanups.push(() => room.leave());
  return room;
}

async function hostAndGuest(options: { guestVia?: Proxy; host?: Partial<CommonOptions>; guest?: Partial<CommonOptions> } = {}) {
  const host = track(await createRoom(relay.wsUrl, { maxClients: 8, ...FAST, ...options.host }));
  const hostEvents = record(host);
  const guestUrl = options.guestVia ? options.guestVia.wsUrl : relay.wsUrl;
  const guest = track(await joinRoom(guestUrl, host.code, { ...FAST, ...options.guest }));
  const guestEvents = record(guest);
  expect(await hostEvents.next("peer_joined")).toEqual({ index: guest.index });
  return { host, guest, hostEvents, guestEvents };
}

// ------------------------------------------------------------------ tests

describe("create, join and relay", () => {
  test("createRoom resolves as the host with code, instance and region; joinRoom as the next slot", async () => {
    const host = track(await createRoom(relay.url, { maxClients: 4, url: "https://game.example/play?r={room}" }));
    expect(host).toBeInstanceOf(EventTarget);
    expect(host.code).toMatch(/^[1-9A-HJ-NP-Za-km-z]{6}$/);
    expect(host.index).toBe(0);
    expect(host.instance).toBe("inst-a");
    expect(host.region).toBe("test");
    expect(host.url).toBe(`https://game.example/play?r=${host.code}`);
    expect(host.peers).toEqual([]);
    expect(host.status).toBe("connected");
    const hostEvents = record(host);

    const guest = track(await joinRoom(relay.wsUrl, host.code));
    expect(guest.index).toBe(1);
    expect(guest.peers).toEqual([0]);
    expect(guest.instance).toBe("inst-a");
    expect(guest.url).toBe(host.url);
    expect(await hostEvents.next("peer_joined")).toEqual({ index: 1 });
    expect(host.peers).toEqual([1]);
  });

  test("broadcast reaches every other member, with the sender's slot in `from`", async () => {
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest();
    const third = track(await joinRoom(relay.wsUrl, host.code));
    const thirdEvents = record(third);
    await hostEvents.next("peer_joined");
    await guestEvents.next("peer_joined");

    expect(guest.send({ tap: 1 })).toBe(true);
    expect(await hostEvents.next("message")).toEqual({ from: 1, data: { tap: 1 }, seq: 1 });
    expect(await thirdEvents.next("message")).toEqual({ from: 1, data: { tap: 1 }, seq: 1 }); // one number for all
    host.send("round 2");
    expect(await guestEvents.next("message")).toEqual({ from: 0, data: "round 2", seq: 2 });
    expect(await thirdEvents.next("message")).toEqual({ from: 0, data: "round 2", seq: 2 });
  });

  test("targeted sends reach only the named slots; a missing target is an error event", async () => {
    const { host, hostEvents, guestEvents } = await hostAndGuest();
    const third = track(await joinRoom(relay.wsUrl, host.code));
    const thirdEvents = record(third);
    await hostEvents.next("peer_joined");

    host.send("only for 2", 2);
    host.send("for 1 and 2", [1, 2]);
    host.send("everyone"); // ordering per sender: slot 1's first message proves it missed the first
    expect(await messages(guestEvents, 2)).toEqual(["for 1 and 2", "everyone"]);
    expect(await messages(thirdEvents, 3)).toEqual(["only for 2", "for 1 and 2", "everyone"]);

    host.send("nobody", 7);
    expect(await hostEvents.next("error")).toEqual({ code: "target_not_found", message: "Target peer not found" });
    host.send("some", [1, 9]);
    expect(await hostEvents.next("error")).toMatchObject({ code: "target_not_found", missing: [9] });
    expect((await guestEvents.next("message")).data).toBe("some");
  });

  test("state: setState reaches the others, a late joiner gets the snapshot, room.state stays current", async () => {
    const { host, guest, guestEvents } = await hostAndGuest();
    host.setState({ round: 1 });
    expect(host.state).toEqual({ round: 1 });
    expect(await guestEvents.next("state")).toEqual({ data: { round: 1 }, seq: 1 });
    expect(guest.state).toEqual({ round: 1 });

    const late = track(await joinRoom(relay.wsUrl, host.code));
    const lateEvents = record(late);
    // The replay is numbered before this join, and is delivered anyway: it is a snapshot.
    expect(await lateEvents.next("state")).toEqual({ data: { round: 1 }, seq: 1 });
    expect(late.state).toEqual({ round: 1 });

    guest.setState("not mine");
    expect(await guestEvents.next("error")).toEqual({ code: "not_host", message: "Only the host can set state" });
  });

  test("typed events: detail types follow the event name", async () => {
    const { host, guest, hostEvents } = await hostAndGuest();
    const got = new Promise<number>((resolve) => {
      host.addEventListener("message", (event) => {
        const from: number = event.detail.from; // compile-time check of RoomEventMap
        resolve(from);
      });
    });
    guest.send(1);
    expect(await got).toBe(1);
    await hostEvents.next("message");
  });
});

describe("the served /client.js", () => {
  test("is one standalone module (no imports) that works as is", async () => {
    const res = await fetch(`${relay.url}/client.js`);
    expect(res.headers.get("content-type")).toStartWith("text/javascript");
    const source = await res.text();
    expect(source).not.toMatch(/^\s*import\b/m);
    expect(source).not.toMatch(/\brequire\(/);
    const dir = mkdtempSync(join(tmpdir(), "client-js-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const file = join(dir, "client.js");
    await Bun.write(file, source);
    const served = (await import(file)) as typeof import("../client.ts");
    const host = track(await served.createRoom(relay.wsUrl, { maxClients: 2 }));
    const guest = track(await served.joinRoom(relay.url, host.code));
    expect(guest.index).toBe(1);
  });
});

describe("errors reject with the relay's code", () => {
  test("createRoom: invalid_max_clients and invalid_url", async () => {
    const bad = await rejection(createRoom(relay.wsUrl, { maxClients: 0 }));
    expect(bad).toBeInstanceOf(RoomError);
    expect(bad).toBeInstanceOf(Error);
    expect(bad.code).toBe("invalid_max_clients");
    expect(bad.message).toBe("maxClients must be a positive number");
    expect((await rejection(createRoom(relay.wsUrl, { maxClients: 2, url: "http://x.example/" }))).code).toBe("invalid_url");
  });

  test("joinRoom: room_not_found, room_full, and connect_failed when nothing listens", async () => {
    expect((await rejection(joinRoom(relay.wsUrl, "zzzzzz"))).code).toBe("room_not_found");
    const host = track(await createRoom(relay.wsUrl, { maxClients: 1 }));
    expect((await rejection(joinRoom(relay.wsUrl, host.code))).code).toBe("room_full");

    const p = proxy();
    p.refusing = true;
    const failed = await rejection(joinRoom(p.wsUrl, host.code));
    expect(failed.code).toBe("connect_failed");
  });

  test("a relayUrl that is not ws(s) or http(s) rejects", async () => {
    await expect(createRoom("ftp://relay.example", { maxClients: 2 })).rejects.toThrow(TypeError);
  });

  test("timing options a browser timer cannot honour reject before connecting", async () => {
    // Infinity, NaN and anything past 2^31 - 1 ms make a browser fire the timer at once.
    for (const bad of [Infinity, NaN, -1, 2 ** 31]) {
      await expect(joinRoom(relay.wsUrl, "zzzzzz", { pingIntervalMs: bad })).rejects.toThrow(RangeError);
    }
    await expect(joinRoom(relay.wsUrl, "zzzzzz", { queueMaxMessages: 1.5 })).rejects.toThrow(RangeError);
    await expect(joinRoom(relay.wsUrl, "zzzzzz", { connectTimeoutMs: "6000" as unknown as number })).rejects.toThrow(TypeError);
    // The bounds themselves are accepted: the join gets as far as the relay's answer.
    expect((await rejection(joinRoom(relay.wsUrl, "zzzzzz", { pingIntervalMs: 2 ** 31 - 1, queueMaxMessages: 0 }))).code).toBe("room_not_found");
  });
});

describe("reconnect", () => {
  test("the documented backoff: full jitter under ceilings 300, 600, 1200, 2400, 4800, 5000 ms", () => {
    const top = () => 0.999999;
    const ceilings = [1, 2, 3, 4, 5, 6, 7, 20].map((n) => retryDelayMs(n, CLIENT_DEFAULTS, top) + 1);
    expect(ceilings).toEqual([300, 600, 1200, 2400, 4800, 5000, 5000, 5000]);
    expect(retryDelayMs(1, CLIENT_DEFAULTS, () => 0)).toBe(0);
    expect(retryDelayMs(4, CLIENT_DEFAULTS, () => 0.5)).toBe(1200);
  });

  test("each attempt waits its own jittered delay, reported in `reconnecting`, until the relay is back", async () => {
    const p = proxy();
    const draws = [0.5, 0.25, 1 - 1e-9, 0.5, 0.1, 0.5, 0.5, 0.5];
    let i = 0;
    const random = () => draws[i++ % draws.length]!;
    const { guest, guestEvents } = await hostAndGuest({
      guestVia: p,
      guest: { random, retryInitialMs: 40, retryMaxMs: 200 },
    });
    p.refusing = true;
    p.cut();
    const seen = [];
    for (let n = 1; n <= 5; n++) seen.push(await guestEvents.next("reconnecting"));
    // ceilings 40, 80, 160, 200 (capped), 200
    expect(seen.map((r) => r.attempt)).toEqual([1, 2, 3, 4, 5]);
    expect(seen.map((r) => r.delayMs)).toEqual([20, 20, 159, 100, 20]);
    expect(seen[0]!.cause).toBe("close 1006");
    expect(guest.status).toBe("reconnecting");
    p.refusing = false;
    await guestEvents.next("reconnected");
    expect(guest.status).toBe("connected");
  });

  test("the guest rejoins pinned to `/<code>?instance=<id>`, same slot; peers and state are current", async () => {
    const p = proxy();
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p });
    expect(p.requests).toEqual([`GET /${host.code} HTTP/1.1`]);
    const third = track(await joinRoom(relay.wsUrl, host.code));
    await hostEvents.next("peer_joined");
    expect(await guestEvents.next("peer_joined")).toEqual({ index: 2 });

    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    expect(await hostEvents.next("peer_left")).toEqual({ index: guest.index });
    host.setState({ phase: "while you were away" });
    await third.leave(); // slot 2 goes while the guest is offline
    expect(await hostEvents.next("peer_left")).toEqual({ index: 2 });
    p.refusing = false;

    expect(await guestEvents.next("reconnected")).toEqual({ resumed: true });
    expect(guest.index).toBe(1);
    expect(guest.instance).toBe("inst-a");
    expect(p.requests.at(-1)).toBe(`GET /${host.code}?instance=inst-a HTTP/1.1`);
    // The absence was reported as if seen live, then the replayed snapshot.
    expect(await guestEvents.next("peer_left")).toEqual({ index: 2 });
    expect(guest.peers).toEqual([0]);
    expect(await guestEvents.next("state")).toMatchObject({ data: { phase: "while you were away" } });
    expect(guest.state).toEqual({ phase: "while you were away" });
    expect(await hostEvents.next("peer_joined")).toEqual({ index: 1 });
  });

  test("the host reconnects too, keeps slot 0 and its code", async () => {
    const p = proxy();
    const host = track(await createRoom(p.wsUrl, { maxClients: 4, ...FAST }));
    const hostEvents = record(host);
    const guest = track(await joinRoom(relay.wsUrl, host.code));
    const guestEvents = record(guest);
    await hostEvents.next("peer_joined");
    expect(p.requests).toEqual(["GET / HTTP/1.1"]);
    p.cut();
    await hostEvents.next("reconnected");
    expect(p.requests.at(-1)).toBe(`GET /${host.code}?instance=inst-a HTTP/1.1`);
    expect(host.index).toBe(0);
    expect(host.peers).toEqual([1]);
    guest.send("still here");
    expect((await hostEvents.next("message")).data).toBe("still here");
    expect(await guestEvents.next("peer_left")).toEqual({ index: 0 });
    expect(await guestEvents.next("peer_joined")).toEqual({ index: 0 });
  });

  test("a host's setState queued while offline survives its rejoin: the relay's older snapshot does not overwrite it", async () => {
    // Without a resume buffer every rejoin is resumed: false, so a snapshot follows the joined.
    const bare = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "silent", resumeWindowMs: 0 });
    cleanups.push(() => bare.stop());
    const p = startProxy(bare.port);
    cleanups.push(() => p.stop());
    const host = track(await createRoom(p.wsUrl, { maxClients: 4, ...FAST }));
    const hostEvents = record(host);
    const guest = track(await joinRoom(bare.wsUrl, host.code, FAST));
    const guestEvents = record(guest);
    host.setState("A");
    expect((await guestEvents.next("state")).data).toBe("A");
    p.refusing = true;
    p.cut();
    await hostEvents.next("reconnecting");
    host.setState("B");
    // A broadcast the host misses while away, with nothing kept: its rejoin cannot resume.
    guest.send("while you were away");
    const relayed = async () => /kind="broadcast"\} 1\n/.test(await (await fetch(`${bare.url}/metrics`)).text());
    for (const deadline = Date.now() + 3000; !(await relayed()); ) {
      if (Date.now() > deadline) throw new Error("the guest's broadcast was never relayed");
    }
    p.refusing = false;
    expect(await hostEvents.next("reconnected")).toEqual({ resumed: false });
    expect((await guestEvents.next("state")).data).toBe("B");
    const late = track(await joinRoom(bare.wsUrl, host.code, FAST));
    expect((await record(late).next("state")).data).toBe("B");
    expect(host.state).toBe("B");
    expect(hostEvents.of("state")).toEqual([]);
  });

  test("sends while offline are queued and arrive once, in order, after the rejoin", async () => {
    const p = proxy();
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p });
    guest.send("before");
    expect((await hostEvents.next("message")).data).toBe("before");
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    for (let n = 1; n <= 5; n++) expect(guest.send(n)).toBe(true);
    expect(guest.queuedCount).toBe(5);
    // A listener that sends on `reconnected` stays behind the queue.
    guest.addEventListener("reconnected", () => guest.send("from a listener"), { once: true });
    p.refusing = false;
    await guestEvents.next("reconnected");
    expect(guest.queuedCount).toBe(0);
    guest.send("after");
    expect(await messages(hostEvents, 7)).toEqual([1, 2, 3, 4, 5, "from a listener", "after"]);
  });

  test("queue bound by count: past queueMaxMessages the oldest is dropped with a queue_overflow error", async () => {
    const p = proxy();
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { queueMaxMessages: 3 } });
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    for (let n = 1; n <= 5; n++) guest.send(n);
    expect(guest.queuedCount).toBe(3);
    expect(await guestEvents.next("error")).toMatchObject({ code: "queue_overflow", dropped: 1 });
    expect(await guestEvents.next("error")).toMatchObject({ code: "queue_overflow", dropped: 1 });
    p.refusing = false;
    await guestEvents.next("reconnected");
    guest.send("after");
    expect(await messages(hostEvents, 4)).toEqual([3, 4, 5, "after"]);
  });

  test("queueMaxMessages 0: an offline send is dropped at once (send returns false) and never arrives", async () => {
    const p = proxy();
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { queueMaxMessages: 0 } });
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    expect(guest.send("lost")).toBe(false);
    expect(guest.queuedCount).toBe(0);
    expect(await guestEvents.next("error")).toMatchObject({ code: "queue_overflow", dropped: 1 });
    p.refusing = false;
    await guestEvents.next("reconnected");
    guest.send("after");
    expect(await messages(hostEvents, 1)).toEqual(["after"]);
  });

  test("queue bound by age: sends older than queueMaxAgeMs are dropped at flush with queue_expired", async () => {
    const p = proxy();
    // Long enough that "fresh" (queued just after the wait) survives a slow rejoin on a busy machine.
    const maxAgeMs = 800;
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { queueMaxAgeMs: maxAgeMs } });
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    guest.send("stale 1");
    guest.send("stale 2");
    await Bun.sleep(maxAgeMs + 50); // the clock under test, not synchronisation
    guest.send("fresh");
    expect(await guestEvents.next("error")).toMatchObject({ code: "queue_expired", dropped: 2 });
    p.refusing = false;
    await guestEvents.next("reconnected");
    guest.send("after");
    expect(await messages(hostEvents, 2)).toEqual(["fresh", "after"]);
  });

  test("a queued setState outlives the queue's bounds, and only the latest is sent", async () => {
    const p = proxy();
    const host = track(await createRoom(p.wsUrl, { maxClients: 4, ...FAST, queueMaxAgeMs: 100, queueMaxMessages: 2 }));
    const hostEvents = record(host);
    const guest = track(await joinRoom(relay.wsUrl, host.code, FAST));
    const guestEvents = record(guest);
    await hostEvents.next("peer_joined");
    p.refusing = true;
    p.cut();
    await hostEvents.next("reconnecting");
    host.setState("B");
    host.setState("C");
    for (let i = 0; i < 5; i++) host.send(i); // past the count bound: sends drop, the state stays
    await Bun.sleep(300); // the clock under test: everything is now older than queueMaxAgeMs
    p.refusing = false;
    await hostEvents.next("reconnected");
    expect((await guestEvents.next("state")).data).toBe("C");
    expect(guestEvents.of("state").map((e) => e.data)).toEqual(["C"]);
    expect(host.state).toBe("C");
    expect(hostEvents.of("error").map((e) => e.code)).toContain("queue_expired");
  });

  test("heartbeat: a silently dead link (no close, no FIN) is noticed within interval + timeout", async () => {
    const p = proxy();
    const pingIntervalMs = 150;
    const pongTimeoutMs = 200;
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { pingIntervalMs, pongTimeoutMs } });
    const frozenAt = performance.now();
    p.freeze("both");
    const lost = await guestEvents.next("reconnecting");
    const noticedAfterMs = performance.now() - frozenAt;
    expect(lost.cause).toBe("heartbeat timeout");
    expect(noticedAfterMs).toBeGreaterThanOrEqual(pongTimeoutMs - 5);
    expect(noticedAfterMs).toBeLessThan(pingIntervalMs + pongTimeoutMs + 1000); // slack for a loaded CI machine
    await guestEvents.next("reconnected");
    expect(guest.index).toBe(1);
    // The relay still held the frozen socket: the rejoin replaced it, so peers saw nothing.
    guest.send("back");
    expect(await hostEvents.next("message")).toMatchObject({ from: 1, data: "back" });
    expect(hostEvents.of("peer_left")).toEqual([]);
  });

  test("`online` skips the rest of the backoff wait", async () => {
    const p = proxy();
    const windowTarget = new EventTarget();
    const { guestEvents } = await hostAndGuest({
      guestVia: p,
      guest: { windowTarget, retryInitialMs: 60_000, retryMaxMs: 60_000, random: () => 0.5 },
    });
    p.cut();
    expect((await guestEvents.next("reconnecting")).delayMs).toBe(30_000);
    windowTarget.dispatchEvent(new Event("online"));
    await guestEvents.next("reconnected", 2000);
  });

  test("`visibilitychange` to visible skips the wait; while connected it sends a ping at once", async () => {
    const p = proxy();
    const documentTarget = Object.assign(new EventTarget(), { visibilityState: "hidden" });
    const { guest, guestEvents } = await hostAndGuest({
      guestVia: p,
      guest: { documentTarget, retryInitialMs: 60_000, retryMaxMs: 60_000, pingIntervalMs: 60_000 },
    });
    p.cut();
    await guestEvents.next("reconnecting");
    documentTarget.dispatchEvent(new Event("visibilitychange")); // still hidden: nothing happens
    expect(guest.status).toBe("reconnecting");
    documentTarget.visibilityState = "visible";
    documentTarget.dispatchEvent(new Event("visibilitychange"));
    await guestEvents.next("reconnected", 2000);

    expect(Number.isNaN(guest.rttMs)).toBe(true);
    documentTarget.dispatchEvent(new Event("visibilitychange"));
    const deadline = performance.now() + 2000;
    while (Number.isNaN(guest.rttMs) && performance.now() < deadline) await Bun.sleep(5); // bounded poll
    expect(Number.isFinite(guest.rttMs)).toBe(true);
  });

  test("close 4003 (the relay's own heartbeat) is retried", async () => {
    // 1 s of silence: short for the test, long enough that a busy CI machine never starves the
    // host (which pings every 50 ms) into the same eviction, which would end the room.
    const strict = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "silent", heartbeatIntervalMs: 100, heartbeatTimeoutMs: 1000 });
    const p = startProxy(strict.port);
    try {
      const host = await createRoom(strict.wsUrl, { maxClients: 4, ...FAST, pingIntervalMs: 50 });
      const guest = await joinRoom(p.wsUrl, host.code, { ...FAST, pingIntervalMs: 60_000, pongTimeoutMs: 60_000 });
      const guestEvents = record(guest);
      p.freeze("up"); // the guest's pongs and frames vanish; the relay's frames still arrive
      // The relay's close frame arrives at once, but the socket's close event waits for the TCP
      // close, which the relay may hold back for its close-handshake margin (~4 s) when, as here,
      // the client's reply never reaches it.
      expect((await guestEvents.next("reconnecting", 10_000)).cause).toBe("close 4003 unresponsive");
      await guestEvents.next("reconnected");
      expect(guest.index).toBe(1);
      host.closeRoom();
    } finally {
      p.stop();
      await strict.stop();
    }
  }, 20_000);

  test("close 1001 (forced shutdown) is retried; the rejoin then finds no room and ends", async () => {
    const doomed = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "silent", drainTimeoutMs: 50 });
    try {
      const host = await createRoom(doomed.wsUrl, { maxClients: 4, ...FAST });
      const hostEvents = record(host);
      void doomed.drain();
      expect((await hostEvents.next("reconnecting")).cause).toBe("close 1001 server shutting down");
      expect(await hostEvents.next("closed")).toEqual({ code: 4001, reason: "room not found" });
      expect(host.status).toBe("closed");
    } finally {
      await doomed.stop();
    }
  });
});

describe("terminal closes are never retried", () => {
  test("4000 replaced: the old tab gets `closed` 4000 and no reconnect", async () => {
    const { host, guest, guestEvents } = await hostAndGuest({ guest: { clientId: "same-player" } });
    const again = track(await joinRoom(relay.wsUrl, host.code, { clientId: "same-player" }));
    expect(again.index).toBe(guest.index);
    expect(await guestEvents.next("closed")).toEqual({ code: 4000, reason: "replaced" });
    expect(guestEvents.of("reconnecting")).toEqual([]);
    expect(guest.status).toBe("closed");
    expect(guest.send("x")).toBe(false);
  });

  test("4001 room closed: closeRoom ends every member with `closed` 4001", async () => {
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest();
    host.closeRoom();
    expect(await hostEvents.next("closed")).toEqual({ code: 4001, reason: "room closed" });
    expect(await guestEvents.next("closed")).toEqual({ code: 4001, reason: "room closed" });
    expect(hostEvents.of("reconnecting")).toEqual([]);
    expect(guestEvents.of("reconnecting")).toEqual([]);
    expect([host.status, guest.status]).toEqual(["closed", "closed"]);
  });

  test("leave: resolves after `left`, `closed` 1000 \"left\", peers see peer_left, the stored clientId is forgotten", async () => {
    const storage = memoryStorage();
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest({ guest: { storage } });
    expect(storage.map.has(`party-sockets:clientId:${host.code}`)).toBe(true);
    await guest.leave();
    expect(await guestEvents.next("closed")).toEqual({ code: 1000, reason: "left" });
    expect(await hostEvents.next("peer_left")).toEqual({ index: 1 });
    expect(storage.map.size).toBe(0);
    expect(guestEvents.of("reconnecting")).toEqual([]);
  });

  test("ending forgets the stored clientId only if it is still this room's own", async () => {
    const storage = memoryStorage();
    const { host, guest, guestEvents } = await hostAndGuest({ guest: { storage } });
    const key = `party-sockets:clientId:${host.code}`;
    storage.setItem(key, "a-newer-room-for-this-code");
    await guest.leave();
    await guestEvents.next("closed");
    expect(storage.getItem(key)).toBe("a-newer-room-for-this-code");
  });

  test("a host's leave closes the room: both get 4001", async () => {
    const { host, hostEvents, guestEvents } = await hostAndGuest();
    await host.leave();
    expect(await hostEvents.next("closed")).toEqual({ code: 4001, reason: "room closed" });
    expect(await guestEvents.next("closed")).toEqual({ code: 4001, reason: "room closed" });
  });

  test("leave while offline stops retrying at once", async () => {
    const p = proxy();
    const { guest, guestEvents } = await hostAndGuest({ guestVia: p, guest: { retryInitialMs: 60_000 } });
    p.cut();
    await guestEvents.next("reconnecting");
    await guest.leave();
    expect(await guestEvents.next("closed")).toEqual({ code: 1000, reason: "left" });
    expect(guest.status).toBe("closed");
  });

  test("4004 kicked: room.kick(index) ends the guest with `closed` 4004 \"kicked\", no reconnect, its clientId forgotten", async () => {
    const storage = memoryStorage();
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest({ guest: { storage } });
    expect(storage.map.size).toBe(1);
    expect(host.kick(guest.index)).toBe(true);
    expect(await guestEvents.next("closed")).toEqual({ code: 4004, reason: "kicked" });
    expect(await hostEvents.next("peer_left")).toEqual({ index: guest.index });
    expect(guestEvents.of("reconnecting")).toEqual([]);
    expect(guest.status).toBe("closed");
    expect(guest.send("x")).toBe(false);
    expect(storage.map.size).toBe(0);
  });

  test("kicked while away: the rejoin is answered `kicked` and ends with `closed` 4004 \"kicked\"", async () => {
    const p = proxy();
    const storage = memoryStorage();
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { storage } });
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    host.kick(guest.index);
    host.kick(99); // answered after the kick above: its error proves the kick is done
    expect(await hostEvents.next("error")).toMatchObject({ code: "target_not_found" });
    p.refusing = false;
    expect(await guestEvents.next("closed")).toEqual({ code: 4004, reason: "kicked" });
    expect(guestEvents.types().at(-1)).toBe("closed");
    expect(guest.status).toBe("closed");
    expect(storage.map.size).toBe(0);
  });

  test("a joinRoom with a kicked clientId rejects with `kicked` and forgets the stored clientId", async () => {
    const storage = memoryStorage();
    const { host, guest, guestEvents } = await hostAndGuest({ guest: { clientId: "troll" } });
    host.kick(guest.index);
    await guestEvents.next("closed");
    storage.setItem(`party-sockets:clientId:${host.code}`, "troll");
    const error = await rejection(joinRoom(relay.wsUrl, host.code, { storage }));
    expect(error.code).toBe("kicked");
    expect(storage.map.size).toBe(0);
  });

  test("room_not_found on a rejoin ends with `closed` 4001 \"room not found\"", async () => {
    const p = proxy();
    const storage = memoryStorage();
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { storage } });
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    host.closeRoom();
    await hostEvents.next("closed");
    p.refusing = false;
    expect(await guestEvents.next("closed")).toEqual({ code: 4001, reason: "room not found" });
    expect(guest.status).toBe("closed");
    const retries = guestEvents.of("reconnecting").length;
    expect(guestEvents.types().at(-1)).toBe("closed");
    expect(retries).toBeGreaterThanOrEqual(1);
    expect(storage.map.size).toBe(0);
  });
});

describe("clientId storage", () => {
  test("a reload (same storage) reclaims the slot; another tab (its own storage) is another player", async () => {
    const tab1 = memoryStorage();
    const tab2 = memoryStorage();
    const host = track(await createRoom(relay.wsUrl, { maxClients: 4 }));
    const hostEvents = record(host);
    const first = track(await joinRoom(relay.wsUrl, host.code, { storage: tab1 }));
    await hostEvents.next("peer_joined");
    const key = `party-sockets:clientId:${host.code}`;
    const id = tab1.map.get(key);
    expect(id).toMatch(/^[0-9a-f]{32}$/);

    const reloaded = track(await joinRoom(relay.wsUrl, host.code, { storage: tab1 }));
    expect(reloaded.index).toBe(first.index);
    expect(tab1.map.get(key)).toBe(id!);

    const other = track(await joinRoom(relay.wsUrl, host.code, { storage: tab2 }));
    expect(other.index).toBe(2);
    expect(tab2.map.get(key)).not.toBe(id!);
  });

  test("createRoom stores the host's clientId under the code once `created` names it", async () => {
    const storage = memoryStorage();
    const host = track(await createRoom(relay.wsUrl, { maxClients: 2, storage }));
    expect([...storage.map.keys()]).toEqual([`party-sockets:clientId:${host.code}`]);
    // The host can come back after a reload of its page by joining its own code.
    const reclaimed = track(await joinRoom(relay.wsUrl, host.code, { storage }));
    expect(reclaimed.index).toBe(0);
  });

  test("an explicit clientId and storage: \"none\" keep nothing", async () => {
    const storage = memoryStorage();
    const host = track(await createRoom(relay.wsUrl, { maxClients: 2, storage, clientId: "mine" }));
    track(await joinRoom(relay.wsUrl, host.code, { storage: "none" }));
    expect(storage.map.size).toBe(0);
  });

  test("a failed join forgets the clientId it stored for that code", async () => {
    const storage = memoryStorage();
    await rejection(joinRoom(relay.wsUrl, "nonexi", { storage }));
    expect(storage.map.size).toBe(0);
  });
});

describe("lossless reconnect (issue 9) against the relay", () => {
  test("a silently dead link: the rejoin resumes, and the game sees every frame exactly once, in order", async () => {
    const p = proxy();
    const { host, guest, guestEvents } = await hostAndGuest({
      guestVia: p,
      guest: { pingIntervalMs: 100, pongTimeoutMs: 150 },
    });
    for (let n = 1; n <= 5; n++) host.send(n);
    expect(await messages(guestEvents, 5)).toEqual([1, 2, 3, 4, 5]);
    p.freeze("both"); // what the host sends now dies in flight on the frozen connection
    for (let n = 6; n <= 10; n++) host.send(n);
    host.send("just for you", guest.index);
    host.setState({ round: 2 });
    expect((await guestEvents.next("reconnecting")).cause).toBe("heartbeat timeout");
    expect(await guestEvents.next("reconnected")).toEqual({ resumed: true });
    host.send(11);
    expect(await messages(guestEvents, 7)).toEqual([6, 7, 8, 9, 10, "just for you", 11]);
    expect(await guestEvents.next("state")).toEqual({ data: { round: 2 }, seq: expect.any(Number) });
    const seqs = guestEvents.of("message").map((m) => m.seq!);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
    expect(new Set(seqs).size).toBe(seqs.length);
    expect(guest.state).toEqual({ round: 2 });
  });

  test("a cut the relay saw (slot vacated): the rejoin resumes too", async () => {
    const p = proxy();
    const { host, guest, guestEvents } = await hostAndGuest({ guestVia: p });
    host.send("a");
    expect(await messages(guestEvents, 1)).toEqual(["a"]);
    p.refusing = true;
    p.cut();
    await guestEvents.next("reconnecting");
    host.send("b", [guest.index]); // target absent: an error for the host, nothing kept for the guest
    host.send("c");
    p.refusing = false;
    expect(await guestEvents.next("reconnected")).toEqual({ resumed: true });
    host.send("d");
    expect(await messages(guestEvents, 2)).toEqual(["c", "d"]);
  });

  test("a ring that no longer reaches back: `reconnected` says resumed: false, the state snapshot follows", async () => {
    const forgetful = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "silent", resumeWindowMs: 0 });
    const p = startProxy(forgetful.port);
    try {
      const host = await createRoom(forgetful.wsUrl, { maxClients: 4, ...FAST });
      host.setState({ round: 1 });
      const guest = await joinRoom(p.wsUrl, host.code, { ...FAST, storage: "none" });
      const guestEvents = record(guest);
      expect((await guestEvents.next("state")).data).toEqual({ round: 1 });
      p.refusing = true;
      p.cut();
      await guestEvents.next("reconnecting");
      host.send("lost while away");
      host.setState({ round: 2 });
      p.refusing = false;
      expect(await guestEvents.next("reconnected")).toEqual({ resumed: false });
      // The snapshot is numbered before the rejoin, yet delivered: it is how the game resyncs.
      expect((await guestEvents.next("state")).data).toEqual({ round: 2 });
      host.send("live again");
      expect((await guestEvents.next("message")).data).toBe("live again");
      expect(guestEvents.of("message").map((m) => m.data)).toEqual(["live again"]);
      host.closeRoom();
      await guestEvents.next("closed");
    } finally {
      p.stop();
      await forgetful.stop();
    }
  });
});

/** Heartbeat and connect timings small enough that a dead link is noticed in well under a second. */
const QUICK_HEARTBEAT: Partial<CommonOptions> = { pingIntervalMs: 200, pongTimeoutMs: 300, connectTimeoutMs: 500 };

/** Sends `frame(1)`, `frame(2)`, … every `intervalMs` until stopped; `stop()` says how many went. */
function stream(send: (n: number) => void, intervalMs: number) {
  let sent = 0;
  const timer = setInterval(() => send(++sent), intervalMs);
  return {
    get sent() {
      return sent;
    },
    stop(): number {
      clearInterval(timer);
      return sent;
    },
  };
}

/** Every `{ vote: n }` from slot `from` the game saw, in order, once its "end" message arrived. */
async function votesUntilEnd(events: ReturnType<typeof record>, from: number, timeoutMs: number): Promise<unknown[]> {
  const isEnd = (m: RoomEventDetails["message"]) => m.from === from && m.data === "end";
  while (!events.of("message").some(isEnd)) await events.next("message", timeoutMs);
  return events.of("message").flatMap((m) => (m.from === from && m.data !== "end" ? [(m.data as { vote: number }).vote] : []));
}

describe("lossless sends (issue 16) against the relay", () => {
  test("host and guest stream to each other at 20 Hz across a 4 s blackhole (no FIN, no RST): each game sees every frame of the other once, in order", async () => {
    const p = proxy();
    const { host, guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: QUICK_HEARTBEAT });
    const votesIntervalMs = 50; // 20 Hz
    const fromGuest = stream((n) => guest.send({ vote: n }), votesIntervalMs);
    const fromHost = stream((n) => host.send({ vote: n }), votesIntervalMs);
    await hostEvents.next("message");
    p.blackholing = true;
    const sentBeforeHole = fromGuest.sent;
    await Bun.sleep(4000); // the scenario: 4 s of a dead network, not synchronisation
    p.blackholing = false;
    const sentInHole = fromGuest.sent - sentBeforeHole;
    expect((await guestEvents.next("reconnecting")).cause).toBe("heartbeat timeout");
    expect(await guestEvents.next("reconnected", 5000)).toEqual({ resumed: true });
    await guestEvents.next("message");
    const guestSent = fromGuest.stop();
    const hostSent = fromHost.stop();
    guest.send("end");
    host.send("end");
    const numbers = (count: number) => Array.from({ length: count }, (_, i) => i + 1);
    expect(await votesUntilEnd(hostEvents, guest.index, 5000)).toEqual(numbers(guestSent));
    expect(await votesUntilEnd(guestEvents, host.index, 5000)).toEqual(numbers(hostSent));
    expect(sentInHole).toBeGreaterThan(0);
    expect(guestEvents.of("error")).toEqual([]);
    expect(hostEvents.of("peer_left")).toEqual([]); // the rejoin replaced the socket the relay still held
  }, 20_000);

  test("past queueMaxMessages, the oldest unconfirmed sends are not resent: `unconfirmed_dropped` says how many", async () => {
    const p = proxy();
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: { ...QUICK_HEARTBEAT, queueMaxMessages: 3 } });
    guest.send("before");
    expect((await hostEvents.next("message")).data).toBe("before");
    p.freeze("both");
    for (let n = 1; n <= 5; n++) guest.send(n); // into a dead link: kept, unconfirmed
    await guestEvents.next("reconnected");
    expect(await guestEvents.next("error")).toMatchObject({ code: "unconfirmed_dropped", dropped: 2 });
    guest.send("after");
    expect(await messages(hostEvents, 4)).toEqual([3, 4, 5, "after"]);
  });

  test("past queueMaxAgeMs, unconfirmed sends are not resent: `unconfirmed_dropped` at the rejoin", async () => {
    const p = proxy();
    // The link is noticed dead no sooner than pongTimeoutMs, well past the age bound.
    const guestOptions = { ...QUICK_HEARTBEAT, pingIntervalMs: 100, pongTimeoutMs: 400, queueMaxAgeMs: 150 };
    const { guest, hostEvents, guestEvents } = await hostAndGuest({ guestVia: p, guest: guestOptions });
    guest.send("before");
    expect((await hostEvents.next("message")).data).toBe("before");
    p.freeze("both");
    guest.send("lost 1");
    guest.send("lost 2");
    await guestEvents.next("reconnected");
    expect(await guestEvents.next("error")).toMatchObject({ code: "unconfirmed_dropped", dropped: 2 });
    guest.send("after");
    expect(await messages(hostEvents, 1)).toEqual(["after"]);
  });
});

/**
 * A fake relay on loopback whose every frame is answered by `onMessage` (parsed JSON in, objects
 * out; `connection` counts from 0). `connections` holds each connection's frames as written.
 */
function scriptedRelay(
  onMessage: (msg: Record<string, any>, reply: (frame: object) => void, ws: { terminate(): void }, connection: number) => void,
) {
  const connections: string[][] = [];
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    fetch(req, srv: Server<{ connection: number }>) {
      return srv.upgrade(req, { data: { connection: connections.push([]) - 1 } }) ? undefined : new Response("no", { status: 400 });
    },
    websocket: {
      data: {} as { connection: number },
      message(ws, text) {
        connections[ws.data.connection]!.push(String(text));
        onMessage(JSON.parse(String(text)), (frame) => ws.send(JSON.stringify(frame)), ws, ws.data.connection);
      },
    },
  });
  return Object.assign(server, { connections });
}

describe("heartbeat against a scripted relay", () => {
  test("a ping the relay's rate limit dropped (answered by rate_limited, no pong) is not a dead link", async () => {
    let pings = 0;
    const fake = scriptedRelay((msg, reply) => {
      if (msg.type === "join") reply({ type: "joined", room: "AAAAAA", index: 1, peers: [0], instance: "f", region: "" });
      if (msg.type === "leave") reply({ type: "left", room: "AAAAAA" });
      if (msg.type !== "ping") return;
      // The first ping is dropped by the "rate limit"; later ones are answered.
      if (++pings === 1) reply({ type: "error", code: "rate_limited", message: "Rate limited" });
      else reply({ type: "pong", id: msg.id, t: Date.now() });
    });
    try {
      const guest = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none", pingIntervalMs: 100, pongTimeoutMs: 300 });
      const events = record(guest);
      await waitFor(() => !Number.isNaN(guest.rttMs) && pings >= 2, "a second ping and its pong");
      expect(events.of("reconnecting")).toEqual([]);
      await guest.leave();
    } finally {
      fake.stop(true);
    }
  });
});

describe("lossless-reconnect dialect, frame by frame (a scripted relay)", () => {
  test("frames carrying a `seq` at or below the last one seen are dropped; the rejoin sends `resume`", async () => {
    // A fake relay that speaks the lossless-reconnect dialect: replays a duplicate after the rejoin.
    const joins: Record<string, unknown>[] = [];
    let connection = 0;
    let live: { terminate(): void } | undefined;
    const fake = scriptedRelay((msg, reply, ws) => {
      if (msg.type === "leave") return reply({ type: "left", room: "AAAAAA" });
      if (msg.type !== "join") return;
      joins.push(msg);
      connection++;
      live = ws;
      reply({ type: "joined", room: "AAAAAA", index: 1, peers: [0], instance: "f", region: "" });
      if (connection === 1) {
        reply({ type: "message", from: 0, data: "a", seq: 1 });
        reply({ type: "message", from: 0, data: "b", seq: 2 });
      } else {
        reply({ type: "message", from: 0, data: "b", seq: 2 }); // already seen
        reply({ type: "message", from: 0, data: "c", seq: 3 });
      }
    });
    try {
      const guest = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none" });
      const events = record(guest);
      expect(await messages(events, 2)).toEqual(["a", "b"]);
      live!.terminate(); // no close frame: the client retries
      await events.next("reconnecting");
      await events.next("reconnected");
      expect((await events.next("message")).data).toBe("c");
      expect(joins[0]).not.toHaveProperty("resume");
      expect(joins[1]).toMatchObject({ type: "join", room: "AAAAAA", resume: 2 });
      expect(events.of("message").map((m) => m.seq)).toEqual([1, 2, 3]);
      await guest.leave();
    } finally {
      fake.stop(true);
    }
  });
});

describe("lossless-sends dialect, frame by frame (a scripted relay)", () => {
  const joined = (extra: object = {}) => ({ type: "joined", room: "AAAAAA", index: 1, peers: [0], instance: "f", region: "", seq: 0, ...extra });
  const sends = (frames: string[]) => frames.filter((f) => !f.includes('"ping"'));

  test("every send and setState carries n before data; after a rejoin exactly those above `received` go again, in order, before anything new", async () => {
    let live: { terminate(): void } | undefined;
    const fake = scriptedRelay((msg, reply, ws, connection) => {
      if (msg.type === "leave") return reply({ type: "left", room: "AAAAAA" });
      if (msg.type !== "join") return;
      live = ws;
      reply(connection === 0 ? joined() : joined({ received: 2 }));
    });
    try {
      const guest = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none" });
      const events = record(guest);
      guest.send("a");
      guest.send("b", 0);
      guest.send("c", [0]);
      guest.setState({ s: 1 });
      await waitFor(() => fake.connections[0]!.length === 5, "four frames at the relay");
      live!.terminate();
      await events.next("reconnected");
      guest.send("d");
      await waitFor(() => sends(fake.connections[1] ?? []).length === 4, "the resends and the new send");
      expect(sends(fake.connections[0]!).slice(1)).toEqual([
        '{"type":"send","n":1,"data":"a"}',
        '{"type":"send","to":0,"n":2,"data":"b"}',
        '{"type":"send","to":[0],"n":3,"data":"c"}',
        '{"type":"set_state","n":4,"data":{"s":1}}',
      ]);
      expect(sends(fake.connections[1]!).slice(1)).toEqual([
        '{"type":"send","to":[0],"n":3,"data":"c"}',
        '{"type":"set_state","n":4,"data":{"s":1}}',
        '{"type":"send","n":5,"data":"d"}',
      ]);
      await guest.leave();
    } finally {
      fake.stop(true);
    }
  });

  test("a pong's received lets the client forget: only what nothing confirmed is resent", async () => {
    let live: { terminate(): void } | undefined;
    let accepted = 0;
    const fake = scriptedRelay((msg, reply, ws) => {
      if (msg.type === "leave") return reply({ type: "left", room: "AAAAAA" });
      if (msg.type === "join") {
        live = ws;
        return reply(joined());
      }
      if (msg.type === "send") accepted = msg.n;
      if (msg.type === "ping") reply({ type: "pong", id: msg.id, t: Date.now(), received: accepted });
    });
    try {
      const guest = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none", pingIntervalMs: 50 });
      const events = record(guest);
      guest.send("a");
      guest.send("b");
      // A ping after both was answered (the client pings again only after a pong): both confirmed.
      const pingsAfterB = () => fake.connections[0]!.slice(fake.connections[0]!.findIndex((f) => f.includes('"b"'))).filter((f) => f.includes('"ping"')).length;
      await waitFor(() => pingsAfterB() >= 2, "a ping after the sends, and the next one after its pong");
      guest.send("c");
      await waitFor(() => fake.connections[0]!.some((f) => f.includes('"c"')), "c at the relay");
      live!.terminate();
      await events.next("reconnected");
      await waitFor(() => sends(fake.connections[1] ?? []).length === 2, "the resend");
      expect(sends(fake.connections[1]!)).toEqual([expect.stringContaining('"join"'), '{"type":"send","n":3,"data":"c"}']);
      await guest.leave();
    } finally {
      fake.stop(true);
    }
  });

  test("with a quarter of queueMaxMessages unconfirmed, the client pings at once instead of waiting for the heartbeat", async () => {
    const fake = scriptedRelay((msg, reply) => {
      if (msg.type === "leave") return reply({ type: "left", room: "AAAAAA" });
      if (msg.type === "join") reply(joined());
    });
    try {
      const guest = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none", queueMaxMessages: 8, pingIntervalMs: 60_000 });
      guest.send("a");
      guest.send("b"); // 2 of 8 unconfirmed
      await waitFor(() => fake.connections[0]!.length === 4, "two sends and a ping");
      expect(fake.connections[0]!.slice(1).map((f) => JSON.parse(f).type)).toEqual(["send", "send", "ping"]);
      await guest.leave();
    } finally {
      fake.stop(true);
    }
  });

  test("a reload reclaiming its slot numbers above the slot's `received`; a relay without `seq` (Party-Sockets 2.x) gets no n", async () => {
    const fake = scriptedRelay((msg, reply, _ws, connection) => {
      if (msg.type === "leave") return reply({ type: "left", room: "AAAAAA" });
      if (msg.type !== "join") return;
      const { seq: _seq, ...withoutSeq } = joined();
      reply(connection === 0 ? joined({ received: 41 }) : withoutSeq);
    });
    try {
      const reloaded = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none" });
      reloaded.send("x");
      const old = await joinRoom(`ws://127.0.0.1:${fake.port}`, "AAAAAA", { ...FAST, storage: "none" });
      old.send("y", 0);
      await waitFor(() => sends(fake.connections[0]!).length === 2 && sends(fake.connections[1]!).length === 2, "both sends");
      expect(sends(fake.connections[0]!)[1]).toBe('{"type":"send","n":42,"data":"x"}');
      expect(sends(fake.connections[1]!)[1]).toBe('{"type":"send","to":0,"data":"y"}');
      await reloaded.leave();
      await old.leave();
    } finally {
      fake.stop(true);
    }
  });
});
