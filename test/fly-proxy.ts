// A test stand-in for Fly's proxy: just enough of it to run the relay's routing
// (SPEC §5) end to end on loopback.
//
// What it does, per request (plain HTTP and WebSocket upgrades alike):
// 1. Picks an edge machine: `fly-force-instance-id: <id>` (that machine, no
//    fallback), else `fly-prefer-region: <r>`, else the proxy's own edge region;
//    inside a region, round robin over started machines; an empty region falls
//    through to any started machine (Fly would pick the nearest region).
// 2. Sends the request there, with `Fly-Client-IP` and `Fly-Region` set.
// 3. If the answer carries `fly-replay`, replays the *same* request (method,
//    path, headers, body ≤ 1 MB) to `instance=<id>` or to a started machine of
//    `region=<r>[,<r>…]`, adding `fly-replay-src: instance=<issuer>;region=<issuer
//    region>;t=<µs since epoch>[;state=<state>]`. The `timeout` field bounds the
//    attempt to connect to the target. If the target is unknown, stopped or
//    unreachable and `fallback=force_self|prefer_self`, the request goes back to
//    the machine that issued the replay, with `fly-replay-failed` set; a request
//    that fell back is never replayed again. Without a fallback: 502.
// 4. Otherwise returns the answer. For an upgrade answered 101, the client's
//    socket and the machine's socket are bridged byte for byte (WebSocket frames
//    pass through untouched, as behind Fly's proxy).
//
// Where Fly's behaviour is not documented and this proxy had to guess:
// - `fly-replay-failed` value: Fly documents the header, not its format; we send
//   `target=<instance or region>;reason=<unknown_instance|stopped|connect_refused|connect_timeout|no_machine_in_region>`.
// - The fallback request also carries `fly-replay-src` naming the issuer (the
//   spec's relay treats either header as "we are the fallback").
// - A replayed request may itself be answered with `fly-replay` (a region replay
//   landing on a machine that knows the room is on a peer); we allow up to
//   `maxReplays` (default 3) hops, then answer 508. Fly documents no limit.
// - A request body over 1 MB is forwarded to the first machine, but if that
//   machine asks for a replay the proxy answers 502 (Fly documents "cannot be
//   replayed" and an error, not the status).
// - A machine of a region that cannot be reached is skipped for another started
//   machine of that region (Fly's health checks would have taken it out).
// - "Failed" means no TCP connection to the target (refused, timed out, or the
//   machine is stopped/unknown to the proxy). Once connected, the proxy waits for
//   the answer however long it takes, as Fly documents ("we will not cancel
//   requests mid-flight").
// - Client-sent `fly-replay-src`/`fly-replay-failed` headers are stripped, so a
//   client cannot impersonate the proxy (assumed; Fly does not say).
import http from "node:http";
import type { Duplex } from "node:stream";

export interface ProxyMachine {
  id: string;
  region: string;
  /** Where the machine listens, e.g. 127.0.0.2 and the shared relay port. */
  host: string;
  port: number;
}

export interface FlyProxyOptions {
  machines: ProxyMachine[];
  /** The region the proxy's edge sits in, when a request does not say (fly-prefer-region). */
  edgeRegion: string;
  hostname?: string;
  port?: number;
  /** Connect bound for the first hop and for replays without a `timeout` field. */
  connectTimeoutMs?: number;
  maxReplays?: number;
}

/** One hop of one request, for tests that check where a request went. */
export interface Hop {
  path: string;
  machine: string;
  /** How the request reached this machine. */
  via: "edge" | "instance" | "region" | "fallback";
  status: number;
}

export interface FlyProxy {
  url: string;
  wsUrl: string;
  port: number;
  /** Every hop of every request, oldest first. */
  hops: Hop[];
  /** Mark a machine stopped (the proxy stops routing to it, as Fly does) or started again. */
  setStopped(id: string, stopped: boolean): void;
  stop(): Promise<void>;
}

export const MAX_REPLAY_BODY_BYTES = 1024 * 1024;
const MAX_BODY_BYTES = 16 * 1024 * 1024;
const HOP_BY_HOP = new Set([
  "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
  "fly-replay-src", "fly-replay-failed", "content-length",
]);

interface Replay {
  instance?: string;
  regions?: string[];
  timeoutMs?: number;
  fallback?: "force_self" | "prefer_self";
  state?: string;
}

/** Parses `fly-replay: instance=x;region="a,b";timeout=5s;fallback=force_self;state=s`. */
export function parseFlyReplay(header: string): Replay {
  const replay: Replay = {};
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq === -1) continue;
    const key = part.slice(0, eq).trim().toLowerCase();
    const value = part.slice(eq + 1).trim().replace(/^"(.*)"$/, "$1");
    if (key === "instance") replay.instance = value;
    else if (key === "region") replay.regions = value.split(",").map((r) => r.trim()).filter(Boolean);
    else if (key === "timeout") replay.timeoutMs = parseDuration(value);
    else if (key === "fallback" && (value === "force_self" || value === "prefer_self")) replay.fallback = value;
    else if (key === "state") replay.state = value;
  }
  return replay;
}

function parseDuration(text: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)$/.exec(text);
  if (!m) return undefined;
  return Number(m[1]) * (m[2] === "ms" ? 1 : m[2] === "s" ? 1000 : 60_000);
}

/** The value Fly adds to a replayed request. */
export function flyReplaySrc(issuer: ProxyMachine, state?: string, nowUs = Date.now() * 1000): string {
  return `instance=${issuer.id};region=${issuer.region};t=${nowUs}` + (state !== undefined ? `;state=${state}` : "");
}

interface Incoming {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: Buffer;
  clientIp: string;
}

type Attempt =
  | { kind: "failed"; reason: string }
  | { kind: "response"; res: http.IncomingMessage }
  | { kind: "upgrade"; res: http.IncomingMessage; socket: Duplex; head: Buffer };

export async function startFlyProxy(options: FlyProxyOptions): Promise<FlyProxy> {
  const machines = new Map(options.machines.map((m) => [m.id, m]));
  const stopped = new Set<string>();
  const hops: Hop[] = [];
  const rotation = new Map<string, number>();
  const connectTimeoutMs = options.connectTimeoutMs ?? 3000;
  const maxReplays = options.maxReplays ?? 3;
  const open = new Set<Duplex>();

  function started(region?: string): ProxyMachine[] {
    return [...machines.values()].filter((m) => !stopped.has(m.id) && (region === undefined || m.region === region));
  }

  function roundRobin(candidates: ProxyMachine[], key: string): ProxyMachine | undefined {
    if (candidates.length === 0) return undefined;
    const turn = rotation.get(key) ?? 0;
    rotation.set(key, turn + 1);
    return candidates[turn % candidates.length];
  }

  function pickEdge(headers: Record<string, string>): ProxyMachine | string {
    const forced = headers["fly-force-instance-id"];
    if (forced) {
      const m = machines.get(forced);
      return m && !stopped.has(m.id) ? m : `machine ${forced} is not available`;
    }
    const region = headers["fly-prefer-region"] || options.edgeRegion;
    return roundRobin(started(region), region) ?? roundRobin(started(), "*") ?? "no started machine";
  }

  /** Resolves the target of a replay, or why there is none. */
  function replayTarget(replay: Replay): ProxyMachine | string {
    if (replay.instance !== undefined) {
      const m = machines.get(replay.instance);
      if (!m) return "unknown_instance";
      return stopped.has(m.id) ? "stopped" : m;
    }
    for (const region of replay.regions ?? []) {
      const m = region === "any" ? roundRobin(started(), "*") : roundRobin(started(region), region);
      if (m) return m;
    }
    return "no_machine_in_region";
  }

  /** Sends the request to one machine; resolves once it answers (or the connect fails). */
  function attempt(target: ProxyMachine, req: Incoming, extra: Record<string, string>, timeoutMs: number, upgrade: boolean): Promise<Attempt> {
    return new Promise((resolve) => {
      const headers: Record<string, string> = {};
      for (const [k, v] of Object.entries(req.headers)) if (!HOP_BY_HOP.has(k)) headers[k] = v;
      Object.assign(headers, { "fly-client-ip": req.clientIp, "fly-region": options.edgeRegion }, extra);
      if (upgrade) Object.assign(headers, { connection: "Upgrade", upgrade: req.headers["upgrade"] ?? "websocket" });
      else headers["connection"] = "close";
      if (req.body.length > 0) headers["content-length"] = String(req.body.length);

      const out = http.request({ host: target.host, port: target.port, method: req.method, path: req.path, headers, agent: false });
      let connected = false;
      const timer = setTimeout(() => {
        if (connected) return;
        out.destroy();
        resolve({ kind: "failed", reason: "connect_timeout" });
      }, timeoutMs);
      out.on("socket", (socket) => {
        socket.once("connect", () => {
          connected = true;
          clearTimeout(timer);
        });
      });
      out.on("error", (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        resolve({ kind: "failed", reason: err.code === "ECONNREFUSED" ? "connect_refused" : `error:${err.code ?? err.message}` });
      });
      out.on("response", (res) => {
        connected = true;
        clearTimeout(timer);
        resolve({ kind: "response", res });
      });
      out.on("upgrade", (res, socket, head) => {
        connected = true;
        clearTimeout(timer);
        resolve({ kind: "upgrade", res, socket, head });
      });
      out.end(req.body);
    });
  }

  /** Runs the replay loop; resolves with the final answer (or a proxy error). */
  async function route(req: Incoming, upgrade: boolean): Promise<Attempt | { kind: "error"; status: number; message: string }> {
    const edge = pickEdge(req.headers);
    if (typeof edge === "string") return { kind: "error", status: 503, message: edge };
    let target = edge;
    let via: Hop["via"] = "edge";
    let extra: Record<string, string> = {};
    let timeoutMs = connectTimeoutMs;
    let replays = 0;
    let fellBack = false;
    let issuer: ProxyMachine | undefined;
    let pending: Replay | undefined;
    // Machines already tried for this hop: a region-chosen hop moves on to another
    // started machine of the region when one cannot be reached, as Fly's load
    // balancer would; an instance-chosen hop cannot.
    let regionChoices: string[] | null = req.headers["fly-force-instance-id"] ? null : [req.headers["fly-prefer-region"] || options.edgeRegion];
    const tried = new Set<string>();

    for (;;) {
      tried.add(target.id);
      const result = await attempt(target, req, extra, timeoutMs, upgrade);
      if (result.kind === "failed") {
        hops.push({ path: req.path, machine: target.id, via, status: 0 });
        const another = regionChoices?.flatMap((r) => started(r === "any" ? undefined : r)).find((m) => !tried.has(m.id));
        if (another) {
          target = another;
          continue;
        }
        if (issuer && pending?.fallback && !fellBack) {
          // Return to sender: the machine that asked for the replay gets the request again.
          fellBack = true;
          regionChoices = null;
          extra = { "fly-replay-src": flyReplaySrc(issuer, pending.state), "fly-replay-failed": `target=${target.id};reason=${result.reason}` };
          target = issuer;
          via = "fallback";
          timeoutMs = connectTimeoutMs;
          continue;
        }
        return { kind: "error", status: 502, message: `could not reach ${target.id}: ${result.reason}` };
      }
      hops.push({ path: req.path, machine: target.id, via, status: result.res.statusCode ?? 0 });
      const header = result.kind === "response" ? result.res.headers["fly-replay"] : undefined;
      if (typeof header !== "string" || fellBack) return result;

      // The machine asked for a replay: drop its answer, send the request on.
      result.res.resume();
      if (req.body.length > MAX_REPLAY_BODY_BYTES) return { kind: "error", status: 502, message: "request body too large to replay" };
      if (replays >= maxReplays) return { kind: "error", status: 508, message: "too many replays" };
      replays++;
      issuer = target;
      pending = parseFlyReplay(header);
      regionChoices = pending.instance === undefined ? (pending.regions ?? []) : null;
      tried.clear();
      const next = replayTarget(pending);
      via = pending.instance !== undefined ? "instance" : "region";
      extra = { "fly-replay-src": flyReplaySrc(issuer, pending.state) };
      timeoutMs = pending.timeoutMs ?? connectTimeoutMs;
      if (typeof next === "string") {
        hops.push({ path: req.path, machine: pending.instance ?? pending.regions?.join(",") ?? "?", via, status: 0 });
        if (!pending.fallback) return { kind: "error", status: 502, message: `replay failed: ${next}` };
        fellBack = true;
        regionChoices = null;
        extra = { ...extra, "fly-replay-failed": `target=${pending.instance ?? pending.regions?.join(",")};reason=${next}` };
        via = "fallback";
        target = issuer;
        continue;
      }
      target = next;
    }
  }

  function incoming(req: http.IncomingMessage, body: Buffer): Incoming {
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) if (v !== undefined) headers[k] = Array.isArray(v) ? v.join(", ") : v;
    return { method: req.method ?? "GET", path: req.url ?? "/", headers, body, clientIp: req.socket.remoteAddress ?? "127.0.0.1" };
  }

  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on("end", async () => {
      if (size > MAX_BODY_BYTES) {
        res.writeHead(413, { "content-type": "text/plain" }).end("request body too large\n");
        return;
      }
      const result = await route(incoming(req, Buffer.concat(chunks)), false);
      if (result.kind === "error") {
        res.writeHead(result.status, { "content-type": "text/plain", "fly-proxy-error": result.message }).end(result.message + "\n");
        return;
      }
      if (result.kind !== "response") return;
      const headers: Record<string, string | string[]> = {};
      for (const [k, v] of Object.entries(result.res.headers)) if (v !== undefined && !HOP_BY_HOP.has(k)) headers[k] = v;
      res.writeHead(result.res.statusCode ?? 502, headers);
      result.res.pipe(res);
    });
  });

  server.on("upgrade", async (req: http.IncomingMessage, client: Duplex, head: Buffer) => {
    open.add(client);
    client.on("close", () => open.delete(client));
    client.on("error", () => client.destroy());
    const result = await route(incoming(req, Buffer.alloc(0)), true);
    if (result.kind === "error") {
      client.end(`HTTP/1.1 ${result.status} Proxy Error\r\ncontent-type: text/plain\r\ncontent-length: ${result.message.length + 1}\r\nconnection: close\r\n\r\n${result.message}\n`);
      return;
    }
    if (result.kind === "response") {
      // Not upgraded (e.g. 400, or a 409 after a fallback): relay the answer and close.
      const body = await readAll(result.res);
      client.end(statusLine(result.res) + rawHeaders(result.res, { "content-length": String(body.length), connection: "close" }) + "\r\n" + body.toString("latin1"), "latin1");
      return;
    }
    if (result.kind !== "upgrade") return;
    const upstream = result.socket;
    open.add(upstream);
    upstream.on("close", () => open.delete(upstream));
    client.write(statusLine(result.res) + rawHeaders(result.res) + "\r\n");
    if (result.head.length > 0) client.write(result.head);
    if (head.length > 0) upstream.write(head);
    upstream.on("error", () => client.destroy());
    client.on("error", () => upstream.destroy());
    upstream.pipe(client);
    client.pipe(upstream);
    upstream.on("close", () => client.destroy());
    client.on("close", () => upstream.destroy());
  });

  await new Promise<void>((resolve) => server.listen(options.port ?? 0, options.hostname ?? "127.0.0.1", () => resolve()));
  const port = (server.address() as { port: number }).port;
  const host = options.hostname ?? "127.0.0.1";

  return {
    url: `http://${host}:${port}`,
    wsUrl: `ws://${host}:${port}`,
    port,
    hops,
    setStopped(id, value) {
      if (value) stopped.add(id);
      else stopped.delete(id);
    },
    stop: () =>
      new Promise<void>((resolve) => {
        for (const socket of open) socket.destroy();
        server.close(() => resolve());
        server.closeAllConnections?.();
      }),
  };
}

function statusLine(res: http.IncomingMessage): string {
  return `HTTP/1.1 ${res.statusCode} ${res.statusMessage ?? ""}\r\n`;
}

/** The machine's response headers as raw lines, minus framing we rewrite. */
function rawHeaders(res: http.IncomingMessage, override: Record<string, string> = {}): string {
  let out = "";
  const skip = new Set(Object.keys(override));
  if (Object.keys(override).length > 0) skip.add("transfer-encoding");
  for (let i = 0; i + 1 < res.rawHeaders.length; i += 2) {
    if (!skip.has(res.rawHeaders[i]!.toLowerCase())) out += `${res.rawHeaders[i]}: ${res.rawHeaders[i + 1]}\r\n`;
  }
  for (const [k, v] of Object.entries(override)) out += `${k}: ${v}\r\n`;
  return out;
}

function readAll(stream: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("end", () => resolve(Buffer.concat(chunks)));
    stream.on("error", () => resolve(Buffer.concat(chunks)));
  });
}
