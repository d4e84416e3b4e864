// The multi-machine test harness itself: test/fly-proxy.ts and test/test-dns.ts,
// against small fake machines (no relay), so that a failure in multi.test.ts
// points at the relay and not at the stand-ins for Fly.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Resolver } from "node:dns/promises";
import type { Server } from "bun";
import { startFlyProxy, parseFlyReplay, type FlyProxy, type ProxyMachine } from "./fly-proxy.ts";
import { startTestDns, type TestDns } from "./test-dns.ts";

const SRC = /^instance=(\w+);region=(\w+);t=(\d{16})(;state=.*)?$/;

/**
 * A fake machine. GET /where answers who it is and the Fly headers it got.
 * `?replay=<fly-replay value>` makes it answer 409 with that header unless the
 * request is already a replay (then it answers like /where). Upgrades follow
 * the same rule, then echo frames prefixed with the machine id.
 */
function fakeMachine(id: string, host: string, port: number): Server<unknown> {
  return Bun.serve({
    hostname: host,
    port,
    async fetch(req, server) {
      const url = new URL(req.url);
      const replay = url.searchParams.get("replay");
      const replayed = req.headers.has("fly-replay-src") || req.headers.has("fly-replay-failed");
      if (replay && (!replayed || url.searchParams.has("always"))) {
        return new Response("replay\n", { status: 409, headers: { "fly-replay": replay } });
      }
      if (req.headers.get("upgrade") === "websocket") {
        return server.upgrade(req, { data: id }) ? undefined : new Response("no upgrade", { status: 400 });
      }
      const body = req.method === "POST" ? (await req.arrayBuffer()).byteLength : 0;
      return Response.json({
        id,
        src: req.headers.get("fly-replay-src"),
        failed: req.headers.get("fly-replay-failed"),
        clientIp: req.headers.get("fly-client-ip"),
        body,
      });
    },
    websocket: {
      message(ws, message) {
        ws.send(`${ws.data}:${message}`);
      },
    },
  });
}

let machines: ProxyMachine[];
let servers: Server<unknown>[];
let proxy: FlyProxy;

beforeAll(async () => {
  const first = fakeMachine("m1", "127.0.0.2", 0);
  const port = first.port!;
  servers = [first, fakeMachine("m2", "127.0.0.3", port), fakeMachine("m3", "127.0.0.4", port)];
  machines = [
    { id: "m1", region: "ams", host: "127.0.0.2", port },
    { id: "m2", region: "ams", host: "127.0.0.3", port },
    { id: "m3", region: "nrt", host: "127.0.0.4", port },
    // Known to the proxy but nothing listens there: connects are refused.
    { id: "gone", region: "nrt", host: "127.0.0.5", port },
  ];
  proxy = await startFlyProxy({ machines, edgeRegion: "ams", connectTimeoutMs: 1000 });
});

afterAll(async () => {
  await proxy?.stop();
  for (const s of servers ?? []) await s.stop(true);
});

async function where(path: string, headers: Record<string, string> = {}) {
  const res = await fetch(proxy.url + path, { headers: { "fly-force-instance-id": "m1", ...headers } });
  return { status: res.status, body: res.status === 200 ? await res.json() : await res.text() };
}

describe("fly-proxy: edge", () => {
  test("fly-force-instance-id picks the machine; Fly-Client-IP is set", async () => {
    const { body } = await where("/where", { "fly-force-instance-id": "m3" });
    expect(body.id).toBe("m3");
    expect(body.src).toBeNull();
    expect(body.clientIp).toBe("127.0.0.1");
  });

  test("fly-prefer-region picks a machine of that region", async () => {
    const res = await fetch(proxy.url + "/where", { headers: { "fly-prefer-region": "nrt" } });
    expect((await res.json()).id).toBe("m3");
  });

  test("without a hint, requests round-robin over the edge region's machines", async () => {
    const ids = new Set<string>();
    for (let i = 0; i < 4; i++) ids.add((await (await fetch(proxy.url + "/where")).json()).id);
    expect([...ids].sort()).toEqual(["m1", "m2"]);
  });

  test("client-sent fly-replay-src is stripped", async () => {
    const { body } = await where("/where", { "fly-replay-src": "instance=evil" });
    expect(body.src).toBeNull();
  });
});

describe("fly-proxy: replays", () => {
  test("instance= replays to that machine with fly-replay-src naming the issuer", async () => {
    const before = Date.now() * 1000;
    const { body } = await where("/where?replay=instance=m2;state=hello");
    expect(body.id).toBe("m2");
    const m = SRC.exec(body.src)!;
    expect(m).not.toBeNull();
    expect([m[1], m[2], m[4]]).toEqual(["m1", "ams", ";state=hello"]);
    expect(Number(m[3])).toBeGreaterThanOrEqual(before);
    expect(proxy.hops.slice(-2).map((h) => `${h.via}:${h.machine}:${h.status}`)).toEqual(["edge:m1:409", "instance:m2:200"]);
  });

  test("region= replays to a machine of that region (quoted lists too)", async () => {
    expect((await where("/where?replay=region=nrt")).body.id).toBe("m3");
    expect((await where('/where?replay=region="syd,nrt"')).body.id).toBe("m3");
  });

  test("an unknown instance with fallback=force_self returns to the issuer, marked", async () => {
    const { body } = await where("/where?replay=instance=nope;timeout=1s;fallback=force_self");
    expect(body.id).toBe("m1");
    expect(SRC.exec(body.src)?.[1]).toBe("m1");
    expect(body.failed).toContain("reason=unknown_instance");
  });

  test("an unreachable machine (connection refused) falls back the same way", async () => {
    const { body } = await where("/where?replay=instance=gone;timeout=1s;fallback=force_self");
    expect(body.id).toBe("m1");
    expect(body.failed).toContain("reason=connect_refused");
  });

  test("a stopped machine is not tried; the request falls back", async () => {
    proxy.setStopped("m2", true);
    try {
      const { body } = await where("/where?replay=instance=m2;fallback=force_self");
      expect(body.id).toBe("m1");
      expect(body.failed).toContain("reason=stopped");
    } finally {
      proxy.setStopped("m2", false);
    }
  });

  test("without a fallback, a failed replay is a 502", async () => {
    expect((await where("/where?replay=instance=nope")).status).toBe(502);
    expect((await where("/where?replay=region=syd")).status).toBe(502);
  });

  test("a request that fell back is not replayed again", async () => {
    // m1 answers 409 even to replays (?always): after the fallback the 409 reaches the client.
    const res = await fetch(proxy.url + "/where?always&replay=instance=nope;fallback=force_self", { headers: { "fly-force-instance-id": "m1" } });
    expect(res.status).toBe(409);
  });

  test("replay chains are bounded", async () => {
    const res = await fetch(proxy.url + "/where?always&replay=instance=m2", { headers: { "fly-force-instance-id": "m1" } });
    expect(res.status).toBe(508);
  });

  test("bodies up to 1 MB are replayed intact; bigger ones cannot be replayed", async () => {
    const post = (bytes: number) =>
      fetch(proxy.url + "/where?replay=instance=m2", { method: "POST", body: new Uint8Array(bytes), headers: { "fly-force-instance-id": "m1" } });
    const small = await post(1024 * 1024);
    expect(small.status).toBe(200);
    expect(await small.json()).toMatchObject({ id: "m2", body: 1024 * 1024 });
    expect((await post(1024 * 1024 + 1)).status).toBe(502);
  });

  test("parseFlyReplay reads every field the relay sends", () => {
    expect(parseFlyReplay("instance=abc;timeout=5s;fallback=force_self")).toEqual({ instance: "abc", timeoutMs: 5000, fallback: "force_self" });
    expect(parseFlyReplay('region="iad,ord";timeout=800ms')).toEqual({ regions: ["iad", "ord"], timeoutMs: 800 });
  });
});

describe("fly-proxy: WebSocket upgrades", () => {
  function open(path: string, headers: Record<string, string> = { "fly-force-instance-id": "m1" }) {
    const ws = new WebSocket(proxy.wsUrl + path, { headers } as unknown as string[]);
    return new Promise<WebSocket>((resolve, reject) => {
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error(`upgrade ${path} failed`));
    });
  }
  function echo(ws: WebSocket, text: string) {
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no echo within 2 s")), 2000);
      ws.onmessage = (e) => {
        clearTimeout(timer);
        resolve(String(e.data));
      };
      ws.send(text);
    });
  }

  test("an upgrade answered 409 is replayed; frames then flow both ways through the proxy", async () => {
    const ws = await open("/ws?replay=instance=m3;timeout=1s;fallback=force_self");
    expect(await echo(ws, "hi")).toBe("m3:hi");
    expect(await echo(ws, "x".repeat(100_000))).toBe("m3:" + "x".repeat(100_000));
    ws.close();
  });

  test("an upgrade whose replay fails comes back to the issuer and is served there", async () => {
    const ws = await open("/ws?replay=instance=gone;timeout=1s;fallback=force_self");
    expect(await echo(ws, "hi")).toBe("m1:hi");
    ws.close();
  });

  test("an upgrade that fails outright is refused", async () => {
    await expect(open("/ws?replay=instance=nope")).rejects.toThrow(/failed/);
  });
});

describe("test-dns", () => {
  let dns: TestDns;
  let resolver: Resolver;
  beforeAll(async () => {
    dns = await startTestDns({ ttlSeconds: 0 });
    resolver = new Resolver({ timeout: 1000, tries: 1 });
    resolver.setServers([dns.server]);
  });
  afterAll(() => dns?.stop());

  test("vms TXT lists '<id> <region>' pairs; vm names resolve to their addresses", async () => {
    dns.setMachines("app", [
      { id: "m1", region: "ams", addresses: ["127.0.0.2"] },
      { id: "m2", region: "nrt", addresses: ["127.0.0.3", "fdaa:0:18:a7b:7d:f066:b83b:2"] },
    ]);
    expect((await resolver.resolveTxt("vms.app.internal")).flat().join("")).toBe("m1 ams,m2 nrt");
    expect((await resolver.resolveTxt("regions.app.internal")).flat().join("")).toBe("ams,nrt");
    expect(await resolver.resolve4("m1.vm.app.internal")).toEqual(["127.0.0.2"]);
    expect(await resolver.resolve6("m2.vm.app.internal")).toEqual(["fdaa:0:18:a7b:7d:f066:b83b:2"]);
  });

  test("unknown names are NXDOMAIN; a removed machine disappears", async () => {
    await expect(resolver.resolveTxt("vms.other.internal")).rejects.toMatchObject({ code: expect.stringMatching(/ENOTFOUND|NXDOMAIN/) });
    dns.setMachines("app", [
      { id: "m1", region: "ams", addresses: ["127.0.0.2"] },
      { id: "m2", region: "ams", addresses: ["127.0.0.3"] },
    ]);
    dns.removeMachine("app", "m1");
    expect((await resolver.resolveTxt("vms.app.internal")).flat().join("")).toBe("m2 ams");
    await expect(resolver.resolve4("m1.vm.app.internal")).rejects.toThrow();
  });

  test("a list longer than 255 bytes survives (split into character-strings)", async () => {
    const many = Array.from({ length: 40 }, (_, i) => ({ id: `machine${String(i).padStart(7, "0")}`, region: "ams", addresses: ["127.0.0.2"] }));
    dns.setMachines("big", many);
    const joined = (await resolver.resolveTxt("vms.big.internal")).flat().join("");
    expect(joined.split(",")).toHaveLength(40);
    expect(joined.length).toBeGreaterThan(255);
  });
});
