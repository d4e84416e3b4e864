// Operations checks: the deploy files (Dockerfile, .dockerignore, fly.toml,
// ops/grafana-dashboard.json) must be true to the relay, and CI must notice the
// day they stop being true. There is no Docker engine in CI, so this suite does
// what `docker build` and `fly deploy` would rely on, without them:
//   (a) fly.toml against the relay's options and routes
//   (b) every metric the dashboard queries is exposed after real traffic
//   (c) `promtool check metrics` on that scrape
//   (d) the Dockerfile's build, run from the Docker build context, and the
//       bundle smoke-tested as the image runs it (health, /client.js, round
//       trip, SIGTERM drain, exit 0)
//   (e) Dockerfile sanity (pinned Bun, non-root, HEALTHCHECK, STOPSIGNAL, ...)
//   (f) TLS_CERT_FILE / TLS_KEY_FILE: https /health and a wss:// round trip
//   (g) the JSON log lines: shape, event set, no clientId, no payload
//
// Runs alone: `bun test test/ops.test.ts`. External binaries: openssl (f) and
// promtool (c, Debian package `prometheus`); with CI=true a missing one fails.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import fly from "../fly.toml";
import dashboard from "../ops/grafana-dashboard.json";
import packageJson from "../package.json";
import { DEFAULTS, optionsFromEnv, startRelay, type Relay, type RelayOptions } from "../server.ts";

const ROOT = join(import.meta.dir, "..");
const IN_CI = process.env.CI === "true";
const BUN = process.execPath;

// ------------------------------------------------------------------- contract

/** Every series /metrics must expose (CONTRACT.md, SPEC §6). */
const CONTRACT_METRICS = [
  "party_sockets_clients",
  "party_sockets_rooms",
  "party_sockets_clients_by_origin",
  "party_sockets_rooms_by_origin",
  "party_sockets_origins_tracked",
  "party_sockets_draining",
  "process_resident_memory_bytes",
  "process_heap_used_bytes",
  "process_uptime_seconds",
  "party_sockets_connections_total",
  "party_sockets_rooms_created_total",
  "party_sockets_messages_relayed_total",
  "party_sockets_deliveries_total",
  "party_sockets_bytes_relayed_total",
  "party_sockets_errors_total",
  "party_sockets_closes_total",
  "party_sockets_rate_limited_frames_total",
  "party_sockets_duplicate_frames_total",
  "party_sockets_resumes_total",
  "party_sockets_lookups_refused_total",
  "party_sockets_origin_refusals_total",
  "party_sockets_probes_total",
  "party_sockets_replays_total",
  "party_sockets_handoffs_total",
  "party_sockets_rooms_adopted_total",
  "party_sockets_handoff_seconds_sum",
  "party_sockets_handoff_seconds_count",
] as const;

/** The log events the README documents; no other `event` may appear. */
const LOG_EVENTS = new Set([
  "start",
  "room_created",
  "room_closed",
  "drain_start",
  "drain_end",
  "probe_failed",
  "abuse_close",
  "member_kicked",
  "origin_refused",
  "room_moved",
  "room_adopted",
  "handoff_failed",
  "http_error",
]);
const LOG_LEVELS = new Set(["debug", "info", "warn", "error"]);

/** The one build command: the Dockerfile's RUN line must be exactly this. */
const BUILD_COMMAND = "bun build server.ts --target=bun --outfile dist/server.js";

// ---------------------------------------------------------------- the relay

/** Relay options from env strings, the way `bun run server.ts` builds them. */
function startRelayFromEnv(env: Record<string, string>): Relay {
  return startRelay(optionsFromEnv({ HOST: "127.0.0.1", PORT: "0", LOG_LEVEL: "silent", ...env }));
}

/**
 * The option that optionsFromEnv fills from `envName`, found by a probe value,
 * so that these checks follow the relay's own mapping instead of repeating it.
 */
function optionKey(envName: string, probe: string): keyof RelayOptions {
  const probed = optionsFromEnv({ [envName]: probe }) as Record<string, unknown>;
  const key = Object.keys(probed).find((k) => String(probed[k]) === probe);
  if (!key) throw new Error(`optionsFromEnv({ ${envName}: "${probe}" }) sets no option to ${probe}`);
  return key as keyof RelayOptions;
}

/** The value an option takes when its env variable is unset. */
function defaultOf(envName: string, probe: string): number {
  const key = optionKey(envName, probe);
  const value = DEFAULTS[key];
  if (typeof value !== "number") throw new Error(`DEFAULTS.${key} (${envName}) is not a number`);
  return value;
}

// -------------------------------------------------------------- small helpers

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function randomHex(bytes = 8): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("hex");
}

/** A port that was free a moment ago, for child processes that need one up front. */
function freePort(): number {
  const listener = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = listener.port;
  listener.stop(true);
  return port;
}

const tempDirs: string[] = [];
function tempDir(label: string): string {
  const dir = mkdtempSync(join(tmpdir(), `party-sockets-ops-${label}-`));
  tempDirs.push(dir);
  return dir;
}

/** "300", 300, "300s", "5m" → seconds. */
function seconds(value: unknown): number {
  if (typeof value === "number") return value;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(String(value));
  if (!m) throw new Error(`not a duration: ${String(value)}`);
  const n = Number(m[1]);
  return { ms: n / 1000, s: n, m: n * 60, h: n * 3600 }[m[2] ?? "s"]!;
}

// ----------------------------------------------------------- WebSocket peers

// lib.dom types WebSocket's second argument as protocols only; Bun also takes
// options (headers, tls).
const BunWebSocket = WebSocket as unknown as new (url: string, options?: Bun.WebSocketOptions) => WebSocket;
type Msg = { type: string; [field: string]: any };

class Peer {
  private inbox: Msg[] = [];
  private waiters: Array<() => void> = [];
  readonly closed: Promise<{ code: number; reason: string }>;

  private constructor(readonly ws: WebSocket) {
    ws.onmessage = (event) => {
      this.inbox.push(JSON.parse(String(event.data)));
      for (const wake of this.waiters.splice(0)) wake();
    };
    this.closed = new Promise((resolve) => {
      ws.onclose = (event) => {
        resolve({ code: event.code, reason: event.reason });
        for (const wake of this.waiters.splice(0)) wake();
      };
    });
  }

  static async open(url: string, options?: Bun.WebSocketOptions): Promise<Peer> {
    const ws = new BunWebSocket(url, options);
    const peer = new Peer(ws);
    await withTimeout(
      new Promise<void>((resolve, reject) => {
        ws.onopen = () => resolve();
        ws.onerror = () => reject(new Error(`WebSocket to ${url} failed to open`));
      }),
      5000,
      `WebSocket open to ${url}`,
    );
    return peer;
  }

  send(frame: object | string): void {
    this.ws.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  /** The first unread frame of this type (earlier frames of other types stay unread). */
  async next(type: string, ms = 3000): Promise<Msg> {
    const deadline = Date.now() + ms;
    for (;;) {
      const i = this.inbox.findIndex((m) => m.type === type);
      if (i >= 0) return this.inbox.splice(i, 1)[0]!;
      const left = deadline - Date.now();
      if (left <= 0 || this.ws.readyState === WebSocket.CLOSED) {
        const seen = this.inbox.map((m) => m.type).join(", ") || "nothing";
        throw new Error(`no "${type}" frame within ${ms} ms (unread: ${seen}; socket state ${this.ws.readyState})`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  close(): void {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close();
  }
}

/**
 * create + join + send (broadcast) + send (targeted) between two real
 * WebSockets. Returns the peers (still in the room) and the clientIds used.
 */
async function roundTrip(wsUrl: string, options?: Bun.WebSocketOptions) {
  const clientIds = [`ops-host-${randomHex()}`, `ops-guest-${randomHex()}`] as const;
  const marker = `payload-${randomHex()}`;
  const host = await Peer.open(wsUrl, options);
  host.send({ type: "create", clientId: clientIds[0], maxClients: 4 });
  const created = await host.next("created");
  expect(created.index).toBe(0);
  expect(typeof created.room).toBe("string");

  const guest = await Peer.open(wsUrl, options);
  guest.send({ type: "join", clientId: clientIds[1], room: created.room });
  const joined = await guest.next("joined");
  expect(joined.index).toBe(1);
  expect(joined.peers).toEqual([0]);
  expect((await host.next("peer_joined")).index).toBe(1);

  guest.send({ type: "send", data: { marker } });
  expect(await host.next("message")).toMatchObject({ from: 1, data: { marker } });
  host.send({ type: "send", data: { marker, back: true }, to: 1 });
  expect(await guest.next("message")).toMatchObject({ from: 0, data: { marker, back: true } });
  return { host, guest, room: created.room as string, clientIds, marker };
}

// ---------------------------------------------------------- child processes

class Child {
  readonly lines: string[] = [];
  stderr = "";
  private waiters: Array<() => void> = [];
  readonly exitCode: Promise<number>;

  constructor(
    readonly proc: Bun.Subprocess<"ignore", "pipe", "pipe">,
    readonly what: string,
  ) {
    const out = this.collect(proc.stdout);
    const err = new Response(proc.stderr).text().then((t) => {
      this.stderr = t;
    });
    this.exitCode = Promise.all([proc.exited, out, err]).then(([code]) => {
      for (const wake of this.waiters.splice(0)) wake();
      return code;
    });
  }

  static start(cmd: string[], cwd: string, env: Record<string, string>, what: string): Child {
    const proc = Bun.spawn(cmd, {
      cwd,
      // A clean environment: nothing from the test runner (PORT, FLY_*, ...) leaks in.
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/tmp", ...env },
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const child = new Child(proc, what);
    children.push(child);
    return child;
  }

  private async collect(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    let partial = "";
    const reader = stream.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      partial += decoder.decode(value, { stream: true });
      const parts = partial.split("\n");
      partial = parts.pop()!;
      this.lines.push(...parts);
      for (const wake of this.waiters.splice(0)) wake();
    }
    if (partial) this.lines.push(partial);
  }

  /** Waits for a stdout line that parses as JSON and satisfies `match`. */
  async waitForLog(match: (entry: Record<string, any>) => boolean, ms: number, what: string) {
    const deadline = Date.now() + ms;
    let scanned = 0;
    for (;;) {
      for (; scanned < this.lines.length; scanned++) {
        try {
          const entry = JSON.parse(this.lines[scanned]!);
          if (entry && typeof entry === "object" && match(entry)) return entry as Record<string, any>;
        } catch {
          // not JSON: the shape test reports it
        }
      }
      const left = deadline - Date.now();
      if (left <= 0 || this.proc.exitCode !== null) {
        throw new Error(
          `${this.what}: no log line for ${what} within ${ms} ms (exit ${this.proc.exitCode}); ` +
            `stdout:\n${this.lines.join("\n")}\nstderr:\n${this.stderr}`,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, 250));
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  async exit(ms: number): Promise<number> {
    return withTimeout(this.exitCode, ms, `${this.what} to exit`);
  }
}

const children: Child[] = [];

afterAll(async () => {
  for (const child of children) {
    if (child.proc.exitCode === null) child.proc.kill("SIGKILL");
  }
  await Promise.all(children.map((c) => c.proc.exited));
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

// --------------------------------------------------------- Prometheus text

type Sample = { name: string; labels: Record<string, string>; value: number };

function parseExposition(text: string): { samples: Sample[]; types: Map<string, string>; helps: Set<string> } {
  const samples: Sample[] = [];
  const types = new Map<string, string>();
  const helps = new Set<string>();
  for (const line of text.split("\n")) {
    if (line.startsWith("# TYPE ")) {
      const [, , name, type] = line.split(" ");
      types.set(name!, type!);
      continue;
    }
    if (line.startsWith("# HELP ")) {
      helps.add(line.split(" ")[2]!);
      continue;
    }
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/.exec(line);
    if (!m) throw new Error(`unparseable exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]!] = l[2]!.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    }
    samples.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return { samples, types, helps };
}

function sum(samples: Sample[], name: string, where: Record<string, string> = {}): number {
  return samples
    .filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v))
    .reduce((total, s) => total + s.value, 0);
}

/** Metric names in the dashboard's PromQL (panel targets and template variables). */
function dashboardMetricNames(): Set<string> {
  const queries: string[] = [];
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) return node.forEach(walk);
    if (node && typeof node === "object") {
      for (const [key, value] of Object.entries(node)) {
        if ((key === "expr" || key === "definition") && typeof value === "string") queries.push(value);
        else if (key === "query" && typeof value === "string") queries.push(value);
        else walk(value);
      }
    }
  };
  walk(dashboard);
  const names = new Set<string>();
  for (const q of queries) for (const m of q.matchAll(/\b(?:party_sockets|process)_[a-z0-9_]+\b/g)) names.add(m[0]);
  return names;
}

// -------------------------------------------------------------- Dockerfile

type Instruction = { op: string; args: string };

/** Dockerfile instructions with line continuations joined and comments dropped. */
function dockerfile(): Instruction[] {
  const text = readFileSync(join(ROOT, "Dockerfile"), "utf8");
  const logical: string[] = [];
  let current = "";
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line.startsWith("#") || (line === "" && current === "")) continue;
    if (line.endsWith("\\")) {
      current += line.slice(0, -1) + " ";
      continue;
    }
    current += line;
    if (current.trim()) logical.push(current.trim());
    current = "";
  }
  return logical.map((l) => {
    const sp = l.indexOf(" ");
    return { op: l.slice(0, sp).toUpperCase(), args: l.slice(sp + 1).trim().replace(/\s+/g, " ") };
  });
}

/** The instructions of the last stage: what the image runs. */
function runtimeStage(): Instruction[] {
  const all = dockerfile();
  const lastFrom = all.map((i) => i.op).lastIndexOf("FROM");
  return all.slice(lastFrom);
}

function dockerEnv(stage: Instruction[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const i of stage.filter((i) => i.op === "ENV")) {
    for (const m of i.args.matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)/g)) env[m[1]!] = m[2]!.replace(/^"|"$/g, "");
  }
  return env;
}

/**
 * The files `docker build .` sends as context, per .dockerignore: patterns in
 * order, the last match wins, `!` re-includes, an excluded directory excludes
 * everything under it. Covers the allow-list form this repository uses.
 */
function buildContext(): string[] {
  const text = readFileSync(join(ROOT, ".dockerignore"), "utf8");
  const rules = text
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"))
    .map((l) => ({ include: l.startsWith("!"), glob: new Bun.Glob(l.replace(/^!/, "").replace(/^\/|\/$/g, "")) }));
  const excluded = (path: string): boolean => {
    let out = false;
    for (const rule of rules) if (rule.glob.match(path)) out = !rule.include;
    return out;
  };
  const files: string[] = [];
  const walk = (rel: string): void => {
    for (const name of readdirSync(join(ROOT, rel))) {
      const path = rel ? `${rel}/${name}` : name;
      if (path === ".git" || excluded(path)) continue;
      if (statSync(join(ROOT, path)).isDirectory()) walk(path);
      else files.push(path);
    }
  };
  walk("");
  return files.sort();
}

// ================================================================== (e)

describe("Dockerfile", () => {
  const all = dockerfile();
  const runtime = runtimeStage();

  test("every stage is oven/bun pinned to package.json's Bun, on alpine", () => {
    const froms = all.filter((i) => i.op === "FROM").map((i) => i.args.split(" ")[0]);
    expect(froms.length).toBeGreaterThanOrEqual(2); // multi-stage: build, runtime
    const bunVersion = packageJson.devDependencies.bun;
    expect(bunVersion).toMatch(/^\d+\.\d+\.\d+$/);
    for (const image of froms) expect(image).toBe(`oven/bun:${bunVersion}-alpine`);
  });

  test("the build stage runs exactly the bundle command CI runs", () => {
    const runs = all.filter((i) => i.op === "RUN").map((i) => i.args);
    expect(runs).toContain(BUILD_COMMAND);
  });

  test("the runtime stage copies only the bundle and runs it", () => {
    const copies = runtime.filter((i) => i.op === "COPY");
    expect(copies).toHaveLength(1);
    expect(copies[0]!.args).toMatch(/^--from=\S+ \S*dist\/server\.js dist\/server\.js$/);
    const cmd = runtime.find((i) => i.op === "CMD");
    expect(JSON.parse(cmd!.args)).toEqual(["bun", "run", "dist/server.js"]);
  });

  test("runs as a non-root user", () => {
    const users = runtime.filter((i) => i.op === "USER").map((i) => i.args);
    expect(users.length).toBeGreaterThan(0);
    expect(["root", "0", "0:0", "root:root"]).not.toContain(users.at(-1));
  });

  test("HEALTHCHECK asks /health on $PORT with busybox wget (alpine has no curl)", () => {
    const health = runtime.find((i) => i.op === "HEALTHCHECK");
    expect(health?.args).toContain("CMD wget");
    expect(health?.args).toContain("http://127.0.0.1:${PORT}/health");
    expect(health?.args).not.toContain("curl");
  });

  test("STOPSIGNAL is SIGTERM, the signal that drains; port matches fly.toml", () => {
    expect(runtime.find((i) => i.op === "STOPSIGNAL")?.args).toBe("SIGTERM");
    expect(runtime.find((i) => i.op === "EXPOSE")?.args).toBe(String(fly.http_service.internal_port));
    expect(dockerEnv(runtime).PORT).toBe(String(fly.http_service.internal_port));
  });

  test(".dockerignore keeps tests, node_modules and other helpers' folders out of the context", () => {
    const context = buildContext();
    expect(context).toContain("server.ts");
    expect(context).toContain("client.ts");
    expect(context).toContain("protocol.ts");
    expect(context).toContain("package.json");
    for (const f of context) {
      expect(f).not.toMatch(/^(node_modules|test|bench|ops|\.ci)\//);
      expect(f).not.toMatch(/\.test\.ts$/);
    }
  });
});

// ================================================================== (a)

describe("fly.toml is true to the relay", () => {
  let relay: Relay;

  beforeAll(() => {
    relay = startRelayFromEnv({});
  });
  afterAll(async () => {
    await relay?.stop();
  });

  test("internal_port and the metrics port are the port the relay listens on by default and under fly's [env]", () => {
    const port = fly.http_service.internal_port;
    expect(defaultOf("PORT", "4321")).toBe(port);
    const underFly = optionsFromEnv({ ...dockerEnv(runtimeStage()), ...fly.env }) as Record<string, unknown>;
    expect(underFly[optionKey("PORT", "4321")]).toBe(port);
    const metrics = [fly.metrics].flat();
    expect(metrics.length).toBeGreaterThan(0);
    for (const m of metrics) expect(m.port).toBe(port);
  });

  test("kill_signal drains, and kill_timeout covers the drain bound within Fly's 300 s maximum", () => {
    expect(fly.kill_signal).toBe("SIGTERM");
    const killTimeoutS = seconds(fly.kill_timeout);
    expect(killTimeoutS).toBeLessThanOrEqual(300);
    const env = fly.env as Record<string, string>;
    const drainMs = env.DRAIN_TIMEOUT_MS ? Number(env.DRAIN_TIMEOUT_MS) : defaultOf("DRAIN_TIMEOUT_MS", "123457");
    expect(drainMs).toBeGreaterThan(0);
    // 5 s beyond the drain bound for the forced 1001 closes to flush and the process to exit.
    expect(killTimeoutS * 1000).toBeGreaterThanOrEqual(drainMs + 5000);
  });

  test("the health check path answers 200 on a started relay", async () => {
    const checks = fly.http_service.checks;
    expect(checks.length).toBeGreaterThan(0);
    for (const check of checks) {
      expect(check.method.toUpperCase()).toBe("GET");
      const res = await fetch(relay.url + check.path);
      expect(res.status).toBe(200);
      expect(await res.json()).toEqual({ status: "ok" });
      // The check must answer well inside its own timeout.
      expect(seconds(check.timeout)).toBeGreaterThanOrEqual(1);
    }
  });

  test("the metrics path answers with Prometheus text", async () => {
    for (const m of [fly.metrics].flat()) {
      const res = await fetch(relay.url + m.path);
      expect(res.status).toBe(200);
      expect(res.headers.get("content-type")).toContain("text/plain");
      expect(await res.text()).toContain("# TYPE party_sockets_rooms gauge");
    }
  });

  test("the memory budget behind the concurrency limits fits the VM (fly.toml's sizing comment)", () => {
    const MB = 1024 * 1024;
    const vm = [fly.vm].flat()[0];
    const vmBytes = Number(/^(\d+)\s*mb$/i.exec(String(vm.memory))?.[1]) * MB;
    expect(vmBytes).toBeGreaterThan(0);
    const env = fly.env as Record<string, string>;
    const resumeBytes = env.RESUME_TOTAL_BYTES ? Number(env.RESUME_TOTAL_BYTES) : defaultOf("RESUME_TOTAL_BYTES", "7654321");
    const runtime = 48 * MB; // the relay idles at ~30 MB RSS
    const perConnection = 16 * 1024; // active-connection budget (idle measured 3-6 KB)
    const headroom = 48 * MB; // at least this for GC and slow consumers on their way to 4002
    const budget = runtime + resumeBytes + fly.http_service.concurrency.hard_limit * perConnection + headroom;
    expect(budget).toBeLessThanOrEqual(vmBytes);
  });

  test("service shape: connections-based limits, never auto-stopped, rolling deploy", () => {
    const service = fly.http_service;
    expect(service.concurrency.type).toBe("connections");
    expect(service.concurrency.soft_limit).toBeLessThan(service.concurrency.hard_limit);
    expect([false, "off"]).toContain(service.auto_stop_machines);
    expect(service.force_https).toBe(true);
    expect(fly.deploy.strategy).toBe("rolling");
  });
});

// ============================================================== (b) (c)

describe("metrics after real traffic", () => {
  let relay: Relay;
  let scrape = "";
  let replayAnswer: { status: number; flyReplay: string | null } | undefined;

  beforeAll(async () => {
    relay = startRelayFromEnv({
      REGION: "ams",
      INSTANCE_ID: "ops-metrics",
      RATE_LIMIT_PER_SEC: "5",
      RATE_LIMIT_BURST: "5",
      // Routing on (as on Fly), so `?instance=` of another machine is replayed;
      // peer discovery, if anything asked for it, would hit a closed loopback port.
      FLY_APP_NAME: "ops-metrics-app",
      DNS_SERVER: `127.0.0.1:${freePort()}`,
    });
    const origin = { headers: { Origin: "https://party.example" } };
    const { host, guest } = await roundTrip(relay.wsUrl, origin);
    // errors: invalid JSON, and a targeted send to an absent slot
    guest.send("{not json");
    expect((await guest.next("error")).code).toBe("invalid_json");
    host.send({ type: "send", data: 1, to: 9 });
    expect((await host.next("error")).code).toBe("target_not_found");
    // rate limiting: a burst past RATE_LIMIT_BURST is dropped with one error
    for (let i = 0; i < 30; i++) guest.send({ type: "ping", id: i });
    expect((await guest.next("error", 5000)).code).toBe("rate_limited");
    // a fly-replay answer: a room request pinned to another instance
    const replay = await fetch(`${relay.url}/room/ABCDEF?instance=some-other-instance`, { redirect: "manual" });
    replayAnswer = { status: replay.status, flyReplay: replay.headers.get("fly-replay") };
    // close the room: 4001 to both
    host.send({ type: "close_room" });
    expect((await guest.closed).code).toBe(4001);
    expect((await host.closed).code).toBe(4001);
    scrape = await (await fetch(`${relay.url}/metrics`)).text();
  }, 20_000);
  afterAll(async () => {
    await relay?.stop();
  });

  test("every metric name the dashboard queries is exposed", () => {
    const { samples, types } = parseExposition(scrape);
    const exposed = new Set([...types.keys(), ...samples.map((s) => s.name)]);
    const queried = dashboardMetricNames();
    expect(queried.size).toBeGreaterThan(10);
    const missing = [...queried].filter((name) => !exposed.has(name));
    expect(missing).toEqual([]);
  });

  test("the dashboard queries only contract metrics, and the scrape exposes all of them", () => {
    const { samples, types } = parseExposition(scrape);
    const exposed = new Set([...types.keys(), ...samples.map((s) => s.name)]);
    expect([...dashboardMetricNames()].filter((n) => !(CONTRACT_METRICS as readonly string[]).includes(n))).toEqual([]);
    expect(CONTRACT_METRICS.filter((n) => !exposed.has(n))).toEqual([]);
  });

  test("the traffic shows up in the counters", () => {
    const { samples } = parseExposition(scrape);
    expect(sum(samples, "party_sockets_rooms_created_total")).toBeGreaterThanOrEqual(1);
    expect(sum(samples, "party_sockets_connections_total", { origin: "https://party.example" })).toBeGreaterThanOrEqual(2);
    expect(sum(samples, "party_sockets_messages_relayed_total", { kind: "broadcast" })).toBeGreaterThanOrEqual(1);
    expect(sum(samples, "party_sockets_messages_relayed_total", { kind: "targeted" })).toBeGreaterThanOrEqual(1);
    expect(sum(samples, "party_sockets_deliveries_total")).toBeGreaterThanOrEqual(2);
    expect(sum(samples, "party_sockets_bytes_relayed_total")).toBeGreaterThan(0);
    expect(sum(samples, "party_sockets_errors_total", { code: "invalid_json" })).toBeGreaterThanOrEqual(1);
    expect(sum(samples, "party_sockets_errors_total", { code: "target_not_found" })).toBeGreaterThanOrEqual(1);
    expect(sum(samples, "party_sockets_rate_limited_frames_total")).toBeGreaterThanOrEqual(1);
    expect(sum(samples, "party_sockets_closes_total", { code: "4001" })).toBeGreaterThanOrEqual(2);
    expect(sum(samples, "party_sockets_rooms")).toBe(0);
    expect(sum(samples, "process_resident_memory_bytes")).toBeGreaterThan(1e6);
  });

  test("a request pinned to another instance is answered with fly-replay, and counted", () => {
    expect(replayAnswer).toMatchObject({ status: 409 });
    expect(replayAnswer!.flyReplay).toContain("instance=some-other-instance");
    expect(sum(parseExposition(scrape).samples, "party_sockets_replays_total")).toBeGreaterThanOrEqual(1);
  });

  test("every series carries instance, region (upper case) and version", () => {
    const { samples } = parseExposition(scrape);
    expect(samples.length).toBeGreaterThan(0);
    for (const s of samples) {
      expect({ name: s.name, instance: s.labels.instance }).toEqual({ name: s.name, instance: "ops-metrics" });
      expect({ name: s.name, region: s.labels.region }).toEqual({ name: s.name, region: "AMS" });
      expect(s.labels.version).toBeTruthy();
    }
  });

  test("no clientId in any series", () => {
    expect(scrape).not.toContain("ops-host-");
    expect(scrape).not.toContain("ops-guest-");
  });

  const promtool = Bun.which("promtool");
  test.skipIf(!promtool && !IN_CI)("`promtool check metrics` passes on the scrape", async () => {
    if (!promtool) throw new Error("promtool is required when CI=true (Debian package `prometheus`)");
    const proc = Bun.spawn([promtool, "check", "metrics"], { stdin: new Blob([scrape]), stdout: "pipe", stderr: "pipe" });
    const [code, out, err] = await Promise.all([
      proc.exited,
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
    ]);
    expect({ code, output: (out + err).trim() }).toEqual({ code: 0, output: "" });
  });
});

// ================================================================== (d)

describe("the Docker build, without Docker", () => {
  let bundleDir = "";
  let relay: Child;
  let port = 0;
  const logs = () => relay.lines.join("\n");

  beforeAll(async () => {
    // 1. The build stage: the context .dockerignore lets through, and the RUN line from the Dockerfile.
    const context = tempDir("context");
    for (const file of buildContext()) {
      mkdirSync(dirname(join(context, file)), { recursive: true });
      copyFileSync(join(ROOT, file), join(context, file));
    }
    const run = dockerfile().find((i) => i.op === "RUN" && i.args.startsWith("bun build "));
    expect(run?.args).toBe(BUILD_COMMAND);
    const build = Bun.spawnSync([BUN, ...run!.args.split(" ").slice(1)], { cwd: context, stdout: "pipe", stderr: "pipe" });
    if (build.exitCode !== 0) {
      throw new Error(`"${BUILD_COMMAND}" failed in the Docker build context:\n${build.stdout}\n${build.stderr}`);
    }
    // 2. The runtime stage: only the bundle, in a directory of its own.
    bundleDir = tempDir("runtime");
    mkdirSync(join(bundleDir, "dist"));
    copyFileSync(join(context, "dist/server.js"), join(bundleDir, "dist/server.js"));
    const cmd = JSON.parse(runtimeStage().find((i) => i.op === "CMD")!.args) as string[];
    expect(cmd[0]).toBe("bun");
    port = freePort();
    relay = Child.start([BUN, ...cmd.slice(1)], bundleDir, { PORT: String(port), HOST: "127.0.0.1", LOG_LEVEL: "info" }, "bundle");
    await relay.waitForLog((e) => e.event === "start", 10_000, "start");
  }, 60_000);

  test("/health answers 200", async () => {
    const res = await fetch(`http://127.0.0.1:${port}/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: "ok" });
  });

  test("/client.js is served from inside the bundle as JavaScript", async () => {
    const res = await fetch(`http://127.0.0.1:${port}/client.js`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("javascript");
    const body = await res.text();
    expect(body.length).toBeGreaterThan(0);
    // It parses as plain JavaScript (no TypeScript left in it).
    expect(() => new Bun.Transpiler({ loader: "js" }).scan(body)).not.toThrow();
  });

  test("create + join + send round trip, then SIGTERM drains and exits 0", async () => {
    const { host, guest } = await roundTrip(`ws://127.0.0.1:${port}`);
    relay.proc.kill("SIGTERM");
    await relay.waitForLog((e) => e.event === "drain_start", 5000, "drain_start");
    // Draining: no new rooms, but the game in progress goes on.
    const late = await Peer.open(`ws://127.0.0.1:${port}`);
    late.send({ type: "create", clientId: `ops-late-${randomHex()}`, maxClients: 2 });
    expect((await late.next("error")).code).toBe("draining");
    guest.send({ type: "send", data: "still playing" });
    expect((await host.next("message")).data).toBe("still playing");
    late.close();
    // The last room closes: the process exits 0 on its own.
    host.send({ type: "close_room" });
    expect((await host.closed).code).toBe(4001);
    expect(await relay.exit(10_000)).toBe(0);
    expect(logs()).toContain('"drain_end"');
    // LOG_LEVEL=info: nothing below info is written.
    for (const line of relay.lines.filter((l) => l !== "")) expect(JSON.parse(line).level).not.toBe("debug");
  }, 30_000);
});

// ================================================================== (f)

describe("TLS (TLS_CERT_FILE / TLS_KEY_FILE)", () => {
  const openssl = Bun.which("openssl");
  let relay: Relay | undefined;
  let certPem = "";

  beforeAll(async () => {
    if (!openssl) return;
    const dir = tempDir("tls");
    const gen = Bun.spawnSync(
      [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"), "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
      ],
      { stdout: "pipe", stderr: "pipe" },
    );
    if (gen.exitCode !== 0) throw new Error(`openssl failed: ${gen.stderr}`);
    certPem = await Bun.file(join(dir, "cert.pem")).text();
    relay = startRelayFromEnv({ TLS_CERT_FILE: join(dir, "cert.pem"), TLS_KEY_FILE: join(dir, "key.pem") });
  }, 20_000);
  afterAll(async () => {
    await relay?.stop();
  });

  test.skipIf(!openssl && !IN_CI)("serves https /health and a wss:// round trip", async () => {
    if (!openssl) throw new Error("openssl is required when CI=true");
    expect(relay!.url).toStartWith("https://");
    expect(relay!.wsUrl).toStartWith("wss://");
    // The test's own CA: the certificate really is verified, not waved through.
    const tls = { ca: certPem };
    const res = await fetch(`${relay!.url}/health`, { tls } as RequestInit);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: "ok" });
    const { host, guest } = await roundTrip(relay!.wsUrl, { tls: { rejectUnauthorized: false } });
    host.close();
    guest.close();
  });

  test.skipIf(!openssl && !IN_CI)("a client that does not trust the certificate is refused", async () => {
    if (!openssl) throw new Error("openssl is required when CI=true");
    await expect(fetch(`${relay!.url}/health`)).rejects.toThrow();
  });
});

// ================================================================== (g)

describe("log lines (LOG_LEVEL=debug, a relay process with real traffic)", () => {
  let child: Child;
  const secrets: string[] = [];
  let probeAnswer = 0;

  beforeAll(async () => {
    const port = freePort();
    child = Child.start(
      [BUN, "run", join(ROOT, "server.ts")],
      ROOT,
      {
        PORT: String(port),
        HOST: "127.0.0.1",
        LOG_LEVEL: "debug",
        REGION: "ams",
        INSTANCE_ID: "ops-logs",
        MAX_MESSAGE_BYTES: "2048",
        // Routing on, with peer discovery pointed at a closed loopback port:
        // a probe fails fast and must be logged as probe_failed.
        FLY_APP_NAME: "ops-logs-app",
        DNS_SERVER: `127.0.0.1:${freePort()}`,
        PROBE_TIMEOUT_MS: "1000",
        // Admits the test clients (they send no Origin), refuses the intruder below.
        ALLOWED_ORIGINS: "https://party.example",
      },
      "relay (server.ts)",
    );
    await child.waitForLog((e) => e.event === "start", 10_000, "start");

    const url = `ws://127.0.0.1:${port}`;
    // A room closed by its host...
    const first = await roundTrip(url);
    // A kick, then the host closes the room.
    first.host.send({ type: "kick", index: 1 });
    expect((await first.guest.closed).code).toBe(4004);
    await child.waitForLog((e) => e.event === "member_kicked", 5000, "member_kicked");
    first.host.send({ type: "close_room" });
    await first.host.closed;
    await child.waitForLog((e) => e.event === "room_closed", 5000, "room_closed after close_room");
    // ...and one that empties.
    const second = await roundTrip(url);
    second.guest.close();
    await second.guest.closed;
    second.host.close();
    await second.host.closed;
    let roomsClosed = 0;
    await child.waitForLog((e) => e.event === "room_closed" && ++roomsClosed === 2, 5000, "room_closed for the emptied room");
    // An abuse close: a frame past MAX_MESSAGE_BYTES, carrying a clientId and a payload marker.
    const abuser = await Peer.open(url);
    const abuserId = `ops-abuser-${randomHex()}`;
    const oversized = JSON.stringify({ type: "create", clientId: abuserId, maxClients: 2, pad: first.marker.repeat(200) });
    expect(oversized.length).toBeGreaterThan(2048);
    abuser.send(oversized);
    expect((await abuser.closed).code).toBe(1009);
    await child.waitForLog((e) => e.event === "abuse_close", 5000, "abuse_close after an oversized frame");
    // A page of another site.
    const intruder = await fetch(`http://127.0.0.1:${port}/`, { headers: { Upgrade: "websocket", Connection: "Upgrade", Origin: "https://intruder.example" } });
    expect(intruder.status).toBe(403);
    await child.waitForLog((e) => e.event === "origin_refused", 5000, "origin_refused");
    // A lookup of a room of this region that is gone: peers are probed (and discovery fails).
    probeAnswer = (await fetch(`http://127.0.0.1:${port}/room/${first.room}`)).status;
    secrets.push(...first.clientIds, ...second.clientIds, abuserId, first.marker, second.marker);
    // SIGTERM with no room left: drain_start, drain_end, exit 0.
    child.proc.kill("SIGTERM");
    expect(await child.exit(10_000)).toBe(0);
  }, 40_000);

  test("every stdout line is one JSON object with t (ISO time), level and a documented event", () => {
    const lines = child.lines.filter((l) => l !== "");
    expect(lines.length).toBeGreaterThan(0);
    for (const line of lines) {
      let entry: Record<string, unknown>;
      try {
        entry = JSON.parse(line);
      } catch {
        throw new Error(`stdout line is not JSON: ${line}`);
      }
      expect(typeof entry).toBe("object");
      expect(Array.isArray(entry)).toBe(false);
      expect(typeof entry.t).toBe("string");
      expect(new Date(entry.t as string).toISOString()).toBe(entry.t as string);
      expect([...LOG_LEVELS]).toContain(entry.level as string);
      expect([...LOG_EVENTS]).toContain(entry.event as string);
    }
  });

  test("no line carries a clientId or message data (stdout and stderr)", () => {
    expect(secrets.length).toBe(7);
    for (const secret of secrets) {
      for (const line of child.lines) expect(line).not.toContain(secret);
      expect(child.stderr).not.toContain(secret);
    }
  });

  test("the lifecycle is logged: start, room_created, room_closed with a reason, abuse_close, drain_start, drain_end", () => {
    const entries = child.lines.filter((l) => l !== "").map((l) => JSON.parse(l) as Record<string, unknown>);
    const events = entries.map((e) => e.event);
    for (const required of ["start", "room_created", "room_closed", "member_kicked", "abuse_close", "origin_refused", "drain_start", "drain_end"]) {
      expect(events).toContain(required);
    }
    expect(entries.find((e) => e.event === "start")!.level).toBe("info");
    const closed = entries.filter((e) => e.event === "room_closed");
    for (const c of closed) expect(typeof c.reason).toBe("string");
    expect(new Set(closed.map((c) => c.reason)).size).toBe(2); // host close vs. emptied
    expect(entries.find((e) => e.event === "abuse_close")).toMatchObject({ code: 1009 });
    expect(entries.find((e) => e.event === "member_kicked")).toMatchObject({ index: 1 });
    expect(entries.find((e) => e.event === "origin_refused")).toMatchObject({ origin: "https://intruder.example", reason: "not_listed" });
  });

  test("a failed peer probe is logged as probe_failed, and the lookup still answers", () => {
    expect(probeAnswer).toBe(404);
    const events = child.lines.filter((l) => l !== "").map((l) => JSON.parse(l).event);
    expect(events).toContain("probe_failed");
  });
});
