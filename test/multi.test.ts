// Many machines, two regions (SPEC §5, issue 5), as close to Fly as loopback allows:
// five real relay processes (`bun run server.ts`) share one port on 127.0.0.2–6,
// behind test/fly-proxy.ts (fly-replay, fallback, fly-replay-src, WebSocket
// replays) and test/test-dns.ts (vms.<app>.internal, <id>.vm.<app>.internal).
//
//   ams: a1 127.0.0.2, a2 127.0.0.3, a3 127.0.0.4     nrt: n1 127.0.0.5, n2 127.0.0.6
//
// A test picks the edge machine with Fly's own `fly-force-instance-id` header,
// then checks where the request ended (the relay's `instance` field or
// X-Instance-Id) and what each machine counted in /metrics.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { generateRoomCode, regionOfCode } from "../regions.ts";
import type { FlyProxy } from "./fly-proxy.ts";
import { startCluster, type Cluster } from "./multi-cluster.ts";
import type { TestDns } from "./test-dns.ts";

const APP = "ps-multi";
const PROBE_TIMEOUT_MS = 3000; // long, so that "a miss answers before the timeout" is measurable
const PROBE_BUDGET_PER_SEC = 25;
const WAIT_MS = 8000;
const MACHINES = [
  { id: "a1", region: "ams", host: "127.0.0.2" },
  { id: "a2", region: "ams", host: "127.0.0.3" },
  { id: "a3", region: "ams", host: "127.0.0.4" },
  { id: "n1", region: "nrt", host: "127.0.0.5" },
  { id: "n2", region: "nrt", host: "127.0.0.6" },
] as const;
type MachineId = (typeof MACHINES)[number]["id"];

let cluster: Cluster;
let dns: TestDns;
let proxy: FlyProxy;
let port = 0;

beforeAll(async () => {
  cluster = await startCluster({
    app: APP,
    machines: [...MACHINES],
    edgeRegion: "ams",
    // Every request here comes from one address, and the floods of random codes test the probe
    // budget: the per-IP miss budget (tested in server.test.ts) would refuse them before any probe.
    env: { PROBE_TIMEOUT_MS: String(PROBE_TIMEOUT_MS), PROBE_BUDGET_PER_SEC: String(PROBE_BUDGET_PER_SEC), MISS_BURST_MISSES: "0" },
  });
  ({ dns, proxy, port } = cluster);
}, 30_000);

afterAll(() => cluster?.stop());

const proc = (id: MachineId) => cluster.procs.get(id)!;

// ------------------------------------------------------------------ helpers

function hostOf(id: MachineId): string {
  return MACHINES.find((m) => m.id === id)!.host;
}

/** GET through the proxy, entering at `edge`. */
function viaProxy(path: string, edge: MachineId, init: RequestInit = {}): Promise<Response> {
  return fetch(proxy.url + path, { ...init, headers: { "fly-force-instance-id": edge, ...(init.headers ?? {}) } });
}

/** A counter's value on one machine, read directly (not through the proxy). */
async function counter(id: MachineId, name: string, label: string): Promise<number> {
  const text = await (await fetch(`http://${hostOf(id)}:${port}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + "{") && l.includes(label));
  return line ? Number(line.slice(line.lastIndexOf(" ") + 1)) : 0;
}

async function counters(ids: readonly MachineId[], name: string, label: string): Promise<Record<string, number>> {
  const values = await Promise.all(ids.map((id) => counter(id, name, label)));
  return Object.fromEntries(ids.map((id, i) => [id, values[i]!]));
}

interface Client {
  ws: WebSocket;
  next(type: string): Promise<Record<string, unknown>>;
  send(message: Record<string, unknown>): void;
}

/** A WebSocket through the proxy, entering at `edge`; `next(type)` waits (bounded) for a frame type. */
function connect(path: string, edge: MachineId): Promise<Client> {
  const ws = new WebSocket(proxy.wsUrl + path, { headers: { "fly-force-instance-id": edge } } as unknown as string[]);
  const frames: Record<string, unknown>[] = [];
  const waiters: (() => void)[] = [];
  ws.onmessage = (e) => {
    frames.push(JSON.parse(String(e.data)));
    waiters.splice(0).forEach((wake) => wake());
  };
  const client: Client = {
    ws,
    send: (message) => ws.send(JSON.stringify(message)),
    next: (type) =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no "${type}" frame within ${WAIT_MS} ms on ${path}`)), WAIT_MS);
        const look = () => {
          const at = frames.findIndex((f) => f.type === type || f.type === "error");
          if (at === -1) return void waiters.push(look);
          clearTimeout(timer);
          resolve(frames.splice(at, 1)[0]!);
        };
        look();
      }),
  };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`upgrade ${path} via ${edge} not open within ${WAIT_MS} ms`)), WAIT_MS);
    ws.onopen = () => {
      clearTimeout(timer);
      resolve(client);
    };
    ws.onerror = () => {
      clearTimeout(timer);
      reject(new Error(`upgrade ${path} via ${edge} failed`));
    };
  });
}

const opened: Client[] = [];
afterAll(() => opened.forEach((c) => c.ws.close()));

/** Creates a room on `machine` (entering there directly); returns the code and the host client. */
async function createRoomOn(machine: MachineId): Promise<{ code: string; host: Client }> {
  const host = await connect("/", machine);
  opened.push(host);
  host.send({ type: "create", clientId: `host-${crypto.randomUUID()}`, maxClients: 16 });
  const created = await host.next("created");
  expect(created.instance).toBe(machine);
  return { code: String(created.room), host };
}

/** Joins `code` by path entering at `edge`; returns the machine that served the join. */
async function joinVia(code: string, edge: MachineId, query = ""): Promise<Record<string, unknown>> {
  const guest = await connect(`/${code}${query}`, edge);
  opened.push(guest);
  guest.send({ type: "join", clientId: `guest-${crypto.randomUUID()}`, room: code });
  return guest.next("joined");
}

const missingCode = (region: string) => generateRoomCode(region, () => false);

// -------------------------------------------------------------------- tests

describe("room codes carry the creating machine's region", () => {
  test("a room created in ams decodes to ams, one created in nrt to nrt", async () => {
    expect(regionOfCode((await createRoomOn("a2")).code)).toBe("ams");
    expect(regionOfCode((await createRoomOn("n1")).code)).toBe("nrt");
  });
});

describe("?instance= pinning", () => {
  test.each(MACHINES.map((m) => m.id))("an upgrade pinned to %s reaches it from another machine's edge", async (id) => {
    const edge: MachineId = id === "a1" ? "n2" : "a1";
    const client = await connect(`/?instance=${id}`, edge);
    opened.push(client);
    client.send({ type: "create", clientId: "pin-host", maxClients: 2 });
    expect((await client.next("created")).instance).toBe(id);
  });

  test("an HTTP request pinned to a machine is replayed there (instance kind counted)", async () => {
    const { code } = await createRoomOn("a3");
    const before = await counter("n1", "party_sockets_replays_total", 'kind="instance"');
    const res = await viaProxy(`/room/${code}?instance=a3`, "n1");
    expect(res.status).toBe(200);
    expect(res.headers.get("x-instance-id")).toBe("a3");
    expect(await counter("n1", "party_sockets_replays_total", 'kind="instance"')).toBe(before + 1);
  });

  test("the pinning answer is exactly the 409 fly-replay the spec gives", async () => {
    const res = await fetch(`http://${hostOf("a1")}:${port}/room/${missingCode("ams")}?instance=a2`);
    expect(res.status).toBe(409);
    expect(res.headers.get("fly-replay")).toBe("instance=a2;timeout=5s;fallback=force_self");
  });
});

describe("?instance= pins /health and /metrics like every other route", () => {
  test.each(["/health", "/metrics", "/client.js"])("%s?instance=<other> is the 409 fly-replay, not this machine's answer", async (path) => {
    const res = await fetch(`http://${hostOf("a1")}:${port}${path}?instance=a2`);
    expect(res.status).toBe(409);
    expect(res.headers.get("fly-replay")).toBe("instance=a2;timeout=5s;fallback=force_self");
  });

  test("through the public address, /metrics?instance=<id> is that machine's metrics", async () => {
    for (const id of ["a3", "n2"] as const) {
      const res = await viaProxy(`/metrics?instance=${id}`, "a1");
      expect(res.status).toBe(200);
      expect(await res.text()).toContain(`party_sockets_rooms{instance="${id}"`);
    }
    const health = await viaProxy(`/health?instance=n1`, "a2");
    expect(await health.json()).toEqual({ status: "ok" });
    expect(proxy.hops.at(-1)?.machine).toBe("n1");
  });

  test("a stale pin falls back to a 302 without instance, keeping the rest of the query", async () => {
    for (const path of ["/health", "/metrics"]) {
      const res = await viaProxy(`${path}?instance=gone000000000&x=1`, "a2", { redirect: "manual" });
      expect(res.status).toBe(302);
      expect(res.headers.get("location")).toBe(`${path}?x=1`);
    }
  });
});

describe("a code typed by hand", () => {
  test("finds its room from every machine of its region (upgrade and /room/)", async () => {
    const { code } = await createRoomOn("a2");
    for (const edge of ["a1", "a2", "a3"] as const) {
      expect((await joinVia(code, edge)).instance).toBe("a2");
      const res = await viaProxy(`/room/${code}`, edge);
      expect(res.status).toBe(200);
      expect(res.headers.get("x-instance-id")).toBe("a2");
    }
  });

  test("finds its room from the other region (region replay, then a probe if needed)", async () => {
    const { code } = await createRoomOn("a3");
    const regionReplays = await counter("n1", "party_sockets_replays_total", 'kind="region"');
    // Repeated so that the region replay lands on each ams machine in turn (round robin).
    for (let i = 0; i < 3; i++) {
      expect((await joinVia(code, i % 2 ? "n2" : "n1")).instance).toBe("a3");
      expect((await viaProxy(`/room/${code}`, "n1")).headers.get("x-instance-id")).toBe("a3");
    }
    expect(await counter("n1", "party_sockets_replays_total", 'kind="region"')).toBeGreaterThan(regionReplays);
    const nrt = await createRoomOn("n2");
    expect((await joinVia(nrt.code, "a1")).instance).toBe("n2");
  });

  test("a cross-region answer is a region fly-replay", async () => {
    const res = await fetch(`http://${hostOf("a1")}:${port}/room/${missingCode("nrt")}`);
    expect(res.status).toBe(409);
    expect(res.headers.get("fly-replay")).toBe("region=nrt;timeout=5s;fallback=force_self");
  });

  test("/health, /metrics and /client.js are never taken as room codes", async () => {
    for (const path of ["/health", "/metrics", "/client.js"]) {
      expect((await fetch(`http://${hostOf("a1")}:${port}${path}`)).status).toBe(200);
    }
  });
});

describe("a stale ?instance=", () => {
  test("HTTP falls back to a 302 without the hint, which then finds the room", async () => {
    const { code } = await createRoomOn("a1");
    const res = await viaProxy(`/room/${code}?instance=gone000000000&x=1`, "a2", { redirect: "manual" });
    expect(res.status).toBe(302);
    expect(res.headers.get("location")).toBe(`/room/${code}?x=1`);
    const followed = await viaProxy(`/room/${code}?instance=gone000000000`, "a2");
    expect(followed.status).toBe(200);
    expect(followed.redirected).toBe(true);
    expect(followed.headers.get("x-instance-id")).toBe("a1");
  });

  test("an upgrade pinned to a machine that is gone is served by the machine that asked", async () => {
    const client = await connect(`/?instance=gone000000000`, "a3");
    opened.push(client);
    client.send({ type: "create", clientId: "stale-host", maxClients: 2 });
    expect((await client.next("created")).instance).toBe("a3");
    expect(proxy.hops.filter((h) => h.via === "fallback").at(-1)?.machine).toBe("a3");
  });
});

describe("probing the region", () => {
  test("a miss is fast and every peer of the region receives exactly one probe", async () => {
    const peers = ["a2", "a3"] as const;
    const others = ["n1", "n2"] as const;
    const before = await counters([...peers, ...others], "party_sockets_probes_answered_total", 'result="miss"');
    const sentBefore = await counter("a1", "party_sockets_probes_total", 'result="miss"');
    const code = missingCode("ams");
    const t0 = performance.now();
    const res = await viaProxy(`/room/${code}`, "a1");
    const missMs = performance.now() - t0;
    expect(res.status).toBe(404);
    // Every peer answered at once, so the miss does not wait for the probe timeout.
    expect(missMs).toBeLessThan(PROBE_TIMEOUT_MS / 3);
    const after = await counters([...peers, ...others], "party_sockets_probes_answered_total", 'result="miss"');
    expect(after).toEqual({ a2: before.a2! + 1, a3: before.a3! + 1, n1: before.n1!, n2: before.n2! });
    expect(await counter("a1", "party_sockets_probes_total", 'result="miss"')).toBe(sentBefore + 2);
    console.log(`miss through the proxy (2 peers probed): ${missMs.toFixed(1)} ms`);
  });

  test("concurrent lookups of one code share one probe round; a repeat is answered from the cache", async () => {
    const before = await counters(["a2", "a3"], "party_sockets_probes_answered_total", 'result="miss"');
    const code = missingCode("ams");
    const answers = await Promise.all(Array.from({ length: 10 }, () => viaProxy(`/room/${code}`, "a1")));
    expect(answers.map((r) => r.status)).toEqual(Array(10).fill(404));
    const upgrade = await joinVia(code, "a1").catch((e: Error) => e);
    expect(upgrade).toMatchObject({ code: "room_not_found" });
    expect(await counters(["a2", "a3"], "party_sockets_probes_answered_total", 'result="miss"')).toEqual({
      a2: before.a2! + 1,
      a3: before.a3! + 1,
    });
  });

  test("a probe never triggers probes: a peer answers it from local state", async () => {
    const code = missingCode("ams");
    const sent = await counter("a2", "party_sockets_probes_total", 'result="miss"');
    const res = await fetch(`http://${hostOf("a2")}:${port}/room/${code}`, { headers: { "x-party-sockets-probe": "test" } });
    expect(res.status).toBe(404);
    expect(await counter("a2", "party_sockets_probes_total", 'result="miss"')).toBe(sent);
  });
});

describe("failures", () => {
  test("a frozen machine (SIGSTOP) costs a miss at most the probe timeout, not a hang", async () => {
    proc("a3").kill("SIGSTOP");
    try {
      const { code } = await createRoomOn("a2");
      // A hit on a live peer does not wait for the frozen one.
      const t0 = performance.now();
      expect((await viaProxy(`/room/${code}`, "a1")).headers.get("x-instance-id")).toBe("a2");
      expect(performance.now() - t0).toBeLessThan(PROBE_TIMEOUT_MS / 3);
      const timeouts = await counter("a1", "party_sockets_probes_total", 'result="timeout"');
      const t1 = performance.now();
      const res = await viaProxy(`/room/${missingCode("ams")}`, "a1");
      const waitedMs = performance.now() - t1;
      expect(res.status).toBe(404);
      expect(waitedMs).toBeGreaterThanOrEqual(PROBE_TIMEOUT_MS - 50);
      expect(waitedMs).toBeLessThan(PROBE_TIMEOUT_MS + 1500);
      expect(await counter("a1", "party_sockets_probes_total", 'result="timeout"')).toBe(timeouts + 1);
    } finally {
      proc("a3").kill("SIGCONT");
    }
  }, 15_000);

  test("a stopped machine still listed in DNS is skipped fast; pins to it fall back", async () => {
    const { code } = await createRoomOn("a3");
    proc("a3").kill("SIGKILL");
    await proc("a3").exited;
    proxy.setStopped("a3", true);
    const errors = await counter("a1", "party_sockets_probes_total", 'result="error"');
    const t0 = performance.now();
    const res = await viaProxy(`/room/${missingCode("ams")}`, "a1");
    expect(res.status).toBe(404);
    expect(performance.now() - t0).toBeLessThan(PROBE_TIMEOUT_MS / 3);
    expect(await counter("a1", "party_sockets_probes_total", 'result="error"')).toBe(errors + 1);
    // The room died with its machine: a pinned reconnect is served by the edge and told so.
    const client = await connect(`/${code}?instance=a3`, "a2");
    opened.push(client);
    client.send({ type: "join", clientId: "orphan", room: code });
    expect(await client.next("joined")).toMatchObject({ type: "error", code: "room_not_found" });
    dns.removeMachine(APP, "a3");
  });
});

describe("floods", () => {
  test("a flood of random codes sends at most the probe budget to the region", async () => {
    // Runs last: it empties n1's probe budget. n1's only peer is n2.
    const received = await counter("n2", "party_sockets_probes_answered_total", 'result="miss"');
    const skipped = await counter("n1", "party_sockets_probes_total", 'result="skipped"');
    const t0 = performance.now();
    const answers = await Promise.all(Array.from({ length: 300 }, () => viaProxy(`/room/${missingCode("nrt")}`, "n1")));
    const seconds = (performance.now() - t0) / 1000;
    expect(new Set(answers.map((r) => r.status))).toEqual(new Set([404]));
    const probed = (await counter("n2", "party_sockets_probes_answered_total", 'result="miss"')) - received;
    // Burst (2 s worth) plus what refilled while the flood ran, plus one for rounding.
    expect(probed).toBeLessThanOrEqual(PROBE_BUDGET_PER_SEC * (2 + seconds) + 1);
    expect(await counter("n1", "party_sockets_probes_total", 'result="skipped"')).toBeGreaterThanOrEqual(skipped + 300 - probed);
    console.log(`flood: 300 random codes in ${seconds.toFixed(2)} s → ${probed} probes reached the peer`);
  }, 30_000);
});
