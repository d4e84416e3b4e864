// party-sockets: a WebSocket relay for browser party games.
//
// One Bun process keeps rooms of numbered slots in memory and forwards JSON
// between them. It never interprets game data. The room model itself (slots,
// the resume log, the transfer value a deploy hands over) is plain data in
// room.ts. Read top to bottom: options, inbound validation (client frames and
// peers' transfers), the per-connection state, logging, metric counters,
// multi-machine routing, then the factory that wires rooms, handlers, the
// deploy hand-off, HTTP, metrics and lifecycle together, and the block that
// runs when this file is started directly.

import type { Server, ServerWebSocket } from "bun";
// Bun imports client.ts as text (and the bundler inlines it), so the served
// /client.js needs no file on disk; TypeScript only knows the module reading.
// @ts-expect-error TS1192: a text import has a default export TypeScript cannot see
import clientSource from "./client.ts" with { type: "text" };
import { createHash, timingSafeEqual } from "node:crypto";
import { Resolver } from "node:dns/promises";
import pkg from "./package.json" with { type: "json" };
import { statusPageHtml } from "./status-page.ts";
import {
  CLOSES,
  ERRORS,
  type CloseName,
  type CreateMessage,
  type ErrorCode,
  type JoinMessage,
  type KickMessage,
  type PingMessage,
  type SendMessage,
} from "./protocol.ts";
import { decodeRoomCode, generateRoomCode, regionOfCode } from "./regions.ts";
import {
  accept,
  addMember,
  bar,
  CLOSE_BRACE,
  DATA_FIELD,
  FRAME_OVERHEAD_BYTES,
  FrameWriter,
  isDuplicate,
  joinVerdict,
  kickVerdict,
  listTargets,
  maxFrameBytes,
  MESSAGE_HEAD,
  newRoom,
  presentPeers,
  release,
  ResumeLog,
  resumePlan,
  RoomFrames,
  roomFromTransfer,
  roomToTransfer,
  SEQ_FIELD,
  STATE_HEAD,
  TRANSFER_VERSIONS,
  type Member as RoomMember,
  type Recipients,
  type Room as RoomValue,
  type RoomTransfer,
} from "./room.ts";

const VERSION: string = pkg.version;

// ==================================================================== options

export type LogLevel = "debug" | "info" | "warn" | "error" | "silent";

export interface RelayOptions extends RoutingOptions {
  /** TCP port; 0 picks a free one. */
  port: number;
  /** "::" listens on IPv4 and IPv6 (Fly's private network is IPv6-only). */
  hostname: string;
  instanceId: string;
  region: string;
  /** Set on Fly: trust `Fly-Client-IP`. Elsewhere that header is client-controlled. */
  flyAppName: string;
  /** When set, `GET /` and unknown paths redirect here. */
  dashboardUrl: string;
  logLevel: LogLevel;
  /** Where log lines go (one JSON object each). */
  logSink: (line: string) => void;
  maxMessageBytes: number;
  maxStateBytes: number;
  maxRoomClients: number;
  hostGraceMs: number;
  /** Token bucket refill per connection; 0 disables rate limiting. */
  rateLimitPerSec: number;
  rateLimitBurst: number;
  /** A member whose unsent backlog passes this is closed with 4002. */
  backpressureLimitBytes: number;
  maxRoomsPerIp: number;
  maxConnectionsPerIp: number;
  maxRooms: number;
  /** Bound on a drain; 0 waits for every room to end. Then sockets get 1001. */
  drainTimeoutMs: number;
  /** How often the one sweep timer pings quiet sockets. */
  heartbeatIntervalMs: number;
  /** A socket silent this long (no frame, no pong) is closed with 4003. */
  heartbeatTimeoutMs: number;
  /** Origins given their own metric series; the rest share `__other__`. */
  maxOriginSeries: number;
  /** Lossless reconnect: how long a room keeps relayed frames for a `join` with `resume`; 0 disables. */
  resumeWindowMs: number;
  /** ...and at most this many frames and bytes per room, and bytes per process. */
  resumeRoomFrames: number;
  resumeRoomBytes: number;
  resumeTotalBytes: number;
  /**
   * Pages allowed to open a WebSocket: exact origins (`https://game.example`) and host
   * wildcards (`https://*.game.example`). Empty admits every page.
   */
  allowedOrigins: readonly string[];
  /** Refuse upgrades without an `Origin` header (native apps, scripts) too. */
  allowedOriginsRequire: boolean;
  /** Per IP: unknown room codes (`room_not_found`, `/room` 404) answered in a burst; 0 turns the budget off. */
  missBurstMisses: number;
  /** ...and one more answer every this many ms. */
  missRefillMs: number;
  /** Shared by the app's machines; "" turns the deploy hand-off (and its peer endpoint) off. */
  peerSecret: string;
  /** An adopted room waits this long with nobody present for its members to arrive. */
  movingGraceMs: number;
  /** Bound on one attempt to hand a room to one peer. */
  handoffTimeoutMs: number;
  tls?: { certFile: string; keyFile: string };
}

/** Defaults, each justified in the README's configuration table. */
export const DEFAULTS: Readonly<RelayOptions> = Object.freeze({
  port: 8080,
  hostname: "::",
  instanceId: "",
  region: "",
  flyAppName: "",
  dashboardUrl: "",
  logLevel: "info",
  logSink: (line: string) => process.stdout.write(line + "\n"),
  maxMessageBytes: 64 * 1024,
  maxStateBytes: 16 * 1024,
  maxRoomClients: 256,
  hostGraceMs: 120_000,
  rateLimitPerSec: 100,
  rateLimitBurst: 200,
  backpressureLimitBytes: 1024 * 1024,
  maxRoomsPerIp: 100,
  maxConnectionsPerIp: 1000,
  maxRooms: 50_000,
  drainTimeoutMs: 240_000,
  heartbeatIntervalMs: 5_000,
  heartbeatTimeoutMs: 15_000,
  maxOriginSeries: 20,
  resumeWindowMs: 30_000,
  resumeRoomFrames: 4096,
  resumeRoomBytes: 512 * 1024,
  resumeTotalBytes: 32 * 1024 * 1024,
  allowedOrigins: [],
  allowedOriginsRequire: false,
  missBurstMisses: 20,
  missRefillMs: 3000,
  peerSecret: "",
  movingGraceMs: 30_000,
  handoffTimeoutMs: 5_000,
  ...routingDefaults(),
});

/** Env names for the numeric options; the README's table follows this list. */
const NUMERIC_ENV = {
  PORT: "port",
  MAX_MESSAGE_BYTES: "maxMessageBytes",
  MAX_STATE_BYTES: "maxStateBytes",
  MAX_ROOM_CLIENTS: "maxRoomClients",
  HOST_GRACE_MS: "hostGraceMs",
  RATE_LIMIT_PER_SEC: "rateLimitPerSec",
  RATE_LIMIT_BURST: "rateLimitBurst",
  BACKPRESSURE_LIMIT: "backpressureLimitBytes",
  MAX_ROOMS_PER_IP: "maxRoomsPerIp",
  MAX_CONNECTIONS_PER_IP: "maxConnectionsPerIp",
  MAX_ROOMS: "maxRooms",
  DRAIN_TIMEOUT_MS: "drainTimeoutMs",
  HEARTBEAT_INTERVAL_MS: "heartbeatIntervalMs",
  HEARTBEAT_TIMEOUT_MS: "heartbeatTimeoutMs",
  MAX_ORIGIN_SERIES: "maxOriginSeries",
  RESUME_WINDOW_MS: "resumeWindowMs",
  RESUME_ROOM_FRAMES: "resumeRoomFrames",
  RESUME_ROOM_BYTES: "resumeRoomBytes",
  RESUME_TOTAL_BYTES: "resumeTotalBytes",
  MISS_BURST_MISSES: "missBurstMisses",
  MISS_REFILL_MS: "missRefillMs",
  MOVING_GRACE_MS: "movingGraceMs",
  HANDOFF_TIMEOUT_MS: "handoffTimeoutMs",
  PROBE_TIMEOUT_MS: "probeTimeoutMs",
  PROBE_CONCURRENCY: "probeConcurrency",
  PROBE_BUDGET_PER_SEC: "probeBudgetPerSec",
  PROBE_MISS_CACHE_MS: "probeMissCacheMs",
  PROBE_HIT_CACHE_MS: "probeHitCacheMs",
} as const satisfies Record<string, keyof RelayOptions>;

const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error", "silent"];

/** Turns environment variables into options; unset or empty values keep the defaults. */
export function optionsFromEnv(env: Record<string, string | undefined> = process.env): Partial<RelayOptions> {
  const options: Partial<RelayOptions> = {};
  const numbers = options as Record<string, number>;
  for (const [name, key] of Object.entries(NUMERIC_ENV)) {
    const raw = env[name];
    if (raw === undefined || raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value) || value < 0) throw new Error(`${name} must be a non-negative number, got "${raw}"`);
    numbers[key] = value;
  }
  const text = (...names: string[]) => names.map((n) => env[n]).find((v) => v !== undefined && v !== "");
  const hostname = text("HOST");
  const instanceId = text("INSTANCE_ID", "FLY_MACHINE_ID");
  const region = text("REGION", "FLY_REGION");
  const flyAppName = text("FLY_APP_NAME");
  const dashboardUrl = text("DASHBOARD_URL");
  const logLevel = text("LOG_LEVEL");
  const dnsServer = text("DNS_SERVER");
  const peerSecret = text("PEER_SECRET");
  if (hostname) options.hostname = hostname;
  if (instanceId) options.instanceId = instanceId;
  if (region) options.region = region;
  if (flyAppName) options.flyAppName = flyAppName;
  if (dashboardUrl) options.dashboardUrl = dashboardUrl;
  if (dnsServer) options.dnsServer = dnsServer;
  if (peerSecret) options.peerSecret = peerSecret;
  if (logLevel) {
    if (!LOG_LEVELS.includes(logLevel as LogLevel)) throw new Error(`LOG_LEVEL must be one of ${LOG_LEVELS.join(", ")}`);
    options.logLevel = logLevel as LogLevel;
  }
  const allowedOrigins = text("ALLOWED_ORIGINS");
  if (allowedOrigins) options.allowedOrigins = allowedOrigins.split(",").map((o) => o.trim()).filter((o) => o !== "");
  const requireOrigin = text("ALLOWED_ORIGINS_REQUIRE");
  if (requireOrigin) {
    if (requireOrigin !== "true" && requireOrigin !== "false") throw new Error("ALLOWED_ORIGINS_REQUIRE must be true or false");
    options.allowedOriginsRequire = requireOrigin === "true";
  }
  const certFile = text("TLS_CERT_FILE");
  const keyFile = text("TLS_KEY_FILE");
  if (certFile || keyFile) {
    if (!certFile || !keyFile) throw new Error("TLS_CERT_FILE and TLS_KEY_FILE must be set together");
    options.tls = { certFile, keyFile };
  }
  return options;
}

// =============================================================== wire: inbound

/** A rejected frame: the error the sender gets; nothing else changes. */
interface Rejection {
  reject: ErrorCode;
  message?: string;
}

/** A `send` as the hot path wants it: `data` already as JSON text, ready to splice into `message`. */
interface ValidSend {
  type: "send";
  to: SendMessage["to"];
  /** The slot's frame number (lossless sends); 0 when the frame carries none. */
  n: number;
  dataJson: string | undefined;
}

/** What validation hands the handlers: a typed message, plus work already done. */
type Valid =
  | (CreateMessage & { url?: string })
  | JoinMessage
  | ValidSend
  | { type: "set_state"; stateJson: string; n: number }
  | { type: "close_room" }
  | { type: "leave" }
  | KickMessage
  | PingMessage;

const URL_MAX_BYTES = 512;
const URL_PLACEHOLDER = /\{(?:room|instance)\}/g;
const URL_FORBIDDEN_CHARS = /[\s\u0000-\u001f\u007f]/;

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
const isSlot = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v) && v >= 0;
/** A frame number `n`: a positive safe integer (above 2^53 two numbers could compare equal). */
const isFrameNumber = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) > 0;
const utf8Bytes = (s: string): number => Buffer.byteLength(s, "utf8");

function rejection(reject: ErrorCode, message?: string): Rejection {
  return { reject, message };
}

function checkClientId(v: unknown): Rejection | undefined {
  if (typeof v !== "string" || v.length === 0) return rejection("invalid_client_id");
  if (v.length > 128) return rejection("invalid_client_id");
}

function checkUrlTemplate(v: unknown): Rejection | undefined {
  if (typeof v !== "string") return rejection("invalid_url", "url must be a string");
  if (utf8Bytes(v) > URL_MAX_BYTES) return rejection("invalid_url", `url must be at most ${URL_MAX_BYTES} bytes`);
  if (URL_FORBIDDEN_CHARS.test(v)) return rejection("invalid_url", "url must not contain spaces or control characters");
  // Every brace must belong to a whole `{room}` or `{instance}`: `{room`, `room}`, `{}`,
  // `{{room}}` and `{ROOM}` would reach players as a broken link (Party-Sockets rejects them too).
  const sample = v.replace(URL_PLACEHOLDER, "x");
  if (/[{}]/.test(sample)) return rejection("invalid_url", "url may only use the {room} and {instance} placeholders");
  if (!sample.toLowerCase().startsWith("https://")) return rejection("invalid_url");
  if (!URL.canParse(sample)) return rejection("invalid_url", "url must be an absolute URL");
}

const SEND_PREFIX = '{"type":"send",';
const DATA_KEY = '"data":';
const TO_KEY = '"to":';
const N_KEY = '"n":';
const COMMA = 44;
const DIGIT_ZERO = 48;
/** Longer slot indices take the general path (no room has a billion slots). */
const SLOT_MAX_DIGITS = 9;
/** 15 digits stay below 2^53, so every such `n` is a safe integer; longer ones take the general path. */
const N_MAX_DIGITS = 15;

/**
 * How many digits the JSON unsigned integer at `at` has, when a comma follows
 * it; 0 when there is none, it is longer than `maxDigits`, or it has a leading
 * zero (JSON has none: "01" must reach JSON.parse and be rejected there).
 */
function digitsBeforeComma(text: string, at: number, maxDigits: number): number {
  let end = at;
  while (end - at <= maxDigits && text.charCodeAt(end) >= DIGIT_ZERO && text.charCodeAt(end) <= DIGIT_ZERO + 9) end++;
  const digits = end - at;
  if (digits === 0 || digits > maxDigits || (digits > 1 && text.charCodeAt(at) === DIGIT_ZERO)) return 0;
  return text.charCodeAt(end) === COMMA ? digits : 0;
}

/** The value of `digits` decimal digits at `at` (checked by digitsBeforeComma). */
function decimalAt(text: string, at: number, digits: number): number {
  let value = 0;
  for (let i = at; i < at + digits; i++) value = value * 10 + text.charCodeAt(i) - DIGIT_ZERO;
  return value;
}

/**
 * The hot path's shortcut for the shapes clients send all the time,
 * `{"type":"send"[,"to":N][,"n":N],"data":X}` (the browser client writes its
 * fields in that order): the `data` text X is taken as written instead of
 * parsed and serialised again, and the numbers are read in place. It is safe
 * because X itself must pass JSON.parse as one complete value, so the
 * `message` built around it is valid JSON with exactly the relay's fields (a
 * frame like `{"type":"send","data":1,"from":7}` fails that check and goes the
 * general way). Anything else, `"n":0` included, returns undefined and takes
 * the general path, which answers it.
 */
function spliceSend(text: string): ValidSend | undefined {
  if (!text.startsWith(SEND_PREFIX) || text.charCodeAt(text.length - 1) !== CLOSE_BRACE) return undefined;
  let at = SEND_PREFIX.length;
  let to: number | undefined;
  let n = 0;
  if (text.startsWith(TO_KEY, at)) {
    at += TO_KEY.length;
    const digits = digitsBeforeComma(text, at, SLOT_MAX_DIGITS);
    if (digits === 0) return undefined;
    to = decimalAt(text, at, digits);
    at += digits + 1;
  }
  if (text.startsWith(N_KEY, at)) {
    at += N_KEY.length;
    const digits = digitsBeforeComma(text, at, N_MAX_DIGITS);
    if (digits === 0) return undefined;
    n = decimalAt(text, at, digits);
    if (n === 0) return undefined;
    at += digits + 1;
  }
  if (!text.startsWith(DATA_KEY, at)) return undefined;
  const dataJson = text.slice(at + DATA_KEY.length, -1);
  try {
    JSON.parse(dataJson);
  } catch {
    return undefined;
  }
  return { type: "send", to, n, dataJson };
}

/**
 * The one validation step: a raw text frame becomes a typed message or a
 * rejection. Handlers never see anything else, so no client input can throw
 * out of them.
 */
function parseFrame(text: string, limits: RelayOptions): Valid | Rejection {
  const fast = spliceSend(text);
  if (fast) return fast;
  let msg: unknown;
  try {
    msg = JSON.parse(text);
  } catch {
    return rejection("invalid_json");
  }
  if (!isObject(msg)) return rejection("invalid_json");
  switch (msg.type) {
    case "send": {
      const { to, n, data } = msg;
      if (n !== undefined && !isFrameNumber(n)) return rejection("invalid_n");
      if (to !== undefined && !isSlot(to) && !(Array.isArray(to) && to.length > 0 && to.every(isSlot))) {
        // Party-Sockets answers a malformed `to` exactly as an absent slot.
        return rejection("target_not_found");
      }
      return { type: "send", to, n: n ?? 0, dataJson: data === undefined ? undefined : JSON.stringify(data) };
    }
    case "create": {
      const bad = checkClientId(msg.clientId);
      if (bad) return bad;
      const { maxClients, url } = msg;
      if (typeof maxClients !== "number" || !Number.isInteger(maxClients) || maxClients < 1) {
        return rejection("invalid_max_clients");
      }
      if (maxClients > limits.maxRoomClients) {
        return rejection("invalid_max_clients");
      }
      if (url !== undefined) {
        const badUrl = checkUrlTemplate(url);
        if (badUrl) return badUrl;
      }
      return { type: "create", clientId: msg.clientId as string, maxClients, url: url as string | undefined };
    }
    case "join": {
      const bad = checkClientId(msg.clientId);
      if (bad) return bad;
      if (typeof msg.room !== "string" || msg.room.length === 0) return rejection("invalid_room");
      const { resume } = msg;
      if (resume !== undefined && !isSlot(resume)) return rejection("invalid_resume");
      return { type: "join", clientId: msg.clientId as string, room: msg.room, resume };
    }
    case "set_state": {
      const { n } = msg;
      if (n !== undefined && !isFrameNumber(n)) return rejection("invalid_n");
      if (msg.data === undefined) return rejection("state_required");
      const stateJson = JSON.stringify(msg.data);
      if (utf8Bytes(stateJson) > limits.maxStateBytes) return rejection("state_too_large");
      return { type: "set_state", stateJson, n: n ?? 0 };
    }
    case "kick":
      if (!isSlot(msg.index)) return rejection("target_not_found", "index must be a slot index");
      return { type: "kick", index: msg.index };
    case "ping":
      return { type: "ping", id: msg.id };
    case "close_room":
    case "leave":
      return { type: msg.type };
    default:
      return rejection("unknown_type");
  }
}

// ============================================================ origin allow-list

/** Browsers send origins in lower case without a path; operators may type either. */
const canonicalOrigin = (origin: string): string => origin.trim().toLowerCase().replace(/\/$/, "");
const WILDCARD_ORIGIN = /^(https?:\/\/)\*(\..+)$/;
/** What may stand for the `*` of a wildcard: one or more DNS labels, nothing else. */
const WILDCARD_LABELS = /^[a-z0-9-]+(\.[a-z0-9-]+)*$/;
/** A refused page may retry in a loop: one log line per second at most (the metric counts them all). */
const ORIGIN_REFUSED_LOG_EVERY_MS = 1000;

/**
 * `ALLOWED_ORIGINS` as a predicate over an `Origin` header. A wildcard matches
 * subdomains only (`https://*.game.example` admits `https://a.game.example`,
 * not `https://game.example`), with the same scheme and port. `null` (sandboxed
 * frames, `file:` pages) cannot be listed: it names no site.
 */
function originAllowList(entries: readonly string[]): (origin: string) => boolean {
  const exact = new Set<string>();
  const wildcards: { scheme: string; suffix: string }[] = [];
  for (const entry of entries.map(canonicalOrigin)) {
    const wildcard = WILDCARD_ORIGIN.exec(entry);
    const sample = wildcard ? `${wildcard[1]}x${wildcard[2]}` : entry;
    // A `*` anywhere but a wildcard's first label would be taken literally (URLs allow it in a host).
    if (sample.includes("*") || !URL.canParse(sample) || new URL(sample).origin !== sample) {
      throw new Error(`ALLOWED_ORIGINS: "${entry}" is not an origin like https://game.example or https://*.game.example`);
    }
    if (wildcard) wildcards.push({ scheme: wildcard[1]!, suffix: wildcard[2]! });
    else exact.add(entry);
  }
  return (header) => {
    const origin = canonicalOrigin(header);
    if (exact.has(origin)) return true;
    return wildcards.some(
      ({ scheme, suffix }) =>
        origin.startsWith(scheme) &&
        origin.endsWith(suffix) &&
        WILDCARD_LABELS.test(origin.slice(scheme.length, origin.length - suffix.length)),
    );
  };
}

// ============================================================ token buckets

/** A token bucket refilled lazily from the clock, so it needs no timer. */
interface TokenBucket {
  tokens: number;
  bucketAtMs: number;
}

function refill(bucket: TokenBucket, nowMs: number, tokensPerMs: number, burst: number): void {
  const elapsedMs = nowMs - bucket.bucketAtMs;
  if (elapsedMs <= 0) return;
  bucket.tokens = Math.min(burst, bucket.tokens + elapsedMs * tokensPerMs);
  bucket.bucketAtMs = nowMs;
}

function takeTokens(bucket: TokenBucket, n: number, nowMs: number, tokensPerMs: number, burst: number): boolean {
  refill(bucket, nowMs, tokensPerMs, burst);
  if (bucket.tokens < n) return false;
  bucket.tokens -= n;
  return true;
}

/**
 * Past this many IPs with a miss budget in use, further IPs share one bucket:
 * a flood from many addresses costs bounded memory (about 100 bytes an IP) and
 * gets one shared budget rather than a fresh one per address.
 */
const MISS_TRACKED_IPS_MAX = 10_000;

/**
 * Code guessing (issue 15): each IP may be told "no such room" `burst` times,
 * then once per `refillMs`. With no token left, every lookup from that IP is
 * refused, hits too: an answer that differed for a live code would tell the
 * guesser just what a miss would. Hits never take a token, and a reclaim (a
 * clientId that owns a slot there) is never asked, so a venue whose NAT also
 * hosts a guesser loses only fresh joins and lookups, for a few seconds.
 */
function createMissBudget(burst: number, refillMs: number) {
  const byIp = new Map<string, TokenBucket>();
  const shared: TokenBucket = { tokens: burst, bucketAtMs: Date.now() };
  const tokensPerMs = 1 / refillMs;

  /** The IP's bucket; `create` only for a miss (an IP never charged has a full bucket and needs none). */
  function bucketOf(ip: string, nowMs: number, create: boolean): TokenBucket | undefined {
    const known = byIp.get(ip);
    if (known) return known;
    if (byIp.size >= MISS_TRACKED_IPS_MAX) return shared;
    if (!create) return undefined;
    const bucket = { tokens: burst, bucketAtMs: nowMs };
    byIp.set(ip, bucket);
    return bucket;
  }

  return {
    /** Whether `ip` may get an answer that tells whether a code exists: it has a token. */
    mayAsk(ip: string, nowMs: number): boolean {
      if (burst === 0) return true;
      const bucket = bucketOf(ip, nowMs, false);
      if (!bucket) return true;
      refill(bucket, nowMs, tokensPerMs, burst);
      return bucket.tokens >= 1;
    },
    /** A miss was answered: it takes its token (mayAsk said there was one). */
    charge(ip: string, nowMs: number): void {
      if (burst > 0) takeTokens(bucketOf(ip, nowMs, true)!, 1, nowMs, tokensPerMs, burst);
    },
    /** Until `ip` has a token again. */
    retryAfterMs(ip: string, nowMs: number): number {
      const bucket = bucketOf(ip, nowMs, false);
      return bucket ? Math.max(0, Math.ceil((1 - bucket.tokens) * refillMs)) : 0;
    },
    /** Forgets IPs whose bucket is full again: they carry no information. */
    sweep(nowMs: number): void {
      for (const [ip, bucket] of byIp) {
        refill(bucket, nowMs, tokensPerMs, burst);
        if (bucket.tokens >= burst) byIp.delete(ip);
      }
    },
    trackedIps: () => byIp.size,
  };
}

// ====================================================== rooms: on the socket
//
// The room itself (its slots, the resume log, the transfer value) is plain data
// in room.ts; here is what ties it to Bun's sockets.

type Socket = ServerWebSocket<Conn>;
type Member = RoomMember<Socket>;
type Room = RoomValue<Socket>;

/** Per-connection state, kept on the socket (Bun's `ws.data`). */
interface Conn extends TokenBucket {
  /** Fly-Client-IP on Fly, else the socket's peer address. */
  ip: string;
  origin: string;
  room: Room | null;
  member: Member | null;
  // The rate limit's token bucket: `tokens`, `bucketAtMs`.
  rateErrorAtMs: number;
  /** Last frame or pong from the client: the heartbeat's evidence of life. */
  lastSeenMs: number;
  /** The relay has closed this socket; its close handshake may still be in flight. */
  closing: boolean;
}

// ============================================ hand-off: checking a transfer
//
// The transfer value itself (v1) is in room.ts; a peer's body is checked here, at
// the edge, as strictly as a client frame.

export const PEER_SECRET_HEADER = "x-party-sockets-peer-secret";
const PEER_ROOMS_PATH = "/peer/rooms";
const TRANSFER_ID_PATTERN = /^[A-Za-z0-9-]{8,64}$/;
const ORIGIN_MAX_CHARS = 200;
/** Rooms offered at once on SIGTERM: enough to keep a peer busy, few enough not to stall it. */
const HANDOFF_CONCURRENCY = 16;
const HANDOFF_RESULTS = ["moved", "refused", "failed", "no_peer"] as const;
type HandoffResult = (typeof HANDOFF_RESULTS)[number];

/** A refused transfer: the status and a reason that names a field, never a value. */
interface TransferRejection {
  status: 400 | 422;
  error: string;
}

const isCount = (v: unknown, max: number): v is number => isSlot(v) && v <= max;

/** A relayed frame's type and seq, if `text` is one (a `message` or a `state`) within `maxBytes`. */
function relayedFrame(text: unknown, maxBytes: number): { type: "message" | "state"; seq: number } | undefined {
  if (typeof text !== "string" || utf8Bytes(text) > maxBytes) return undefined;
  let frame: unknown;
  try {
    frame = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (!isObject(frame) || (frame.type !== "message" && frame.type !== "state") || !isSlot(frame.seq)) return undefined;
  return { type: frame.type, seq: frame.seq };
}

function checkTransferSlots(slots: unknown, seq: number, maxSlots: number): string | undefined {
  if (!Array.isArray(slots) || slots.length === 0 || slots.length > maxSlots) return "slots";
  const seen = new Set<string>();
  for (const [i, slot] of slots.entries()) {
    if (!isObject(slot) || !isCount(slot.since, seq)) return `slots[${i}]`;
    // The host's slot cannot be kicked.
    if (slot.kicked !== undefined && (typeof slot.kicked !== "boolean" || (i === 0 && slot.kicked))) return `slots[${i}].kicked`;
    if (slot.received !== undefined && slot.received !== 0 && !isFrameNumber(slot.received)) return `slots[${i}].received`;
    if (slot.clientId === null) continue;
    if (checkClientId(slot.clientId) || seen.has(slot.clientId as string)) return `slots[${i}].clientId`;
    seen.add(slot.clientId as string);
  }
}

function checkTransferFrames(frames: unknown, seq: number, slots: number, maxFrameBytes: number): string | undefined {
  if (!Array.isArray(frames)) return "frames";
  let last = 0;
  for (const [i, f] of frames.entries()) {
    if (!isObject(f) || !isCount(f.seq, seq) || f.seq <= last || !isSlot(f.ageMs) || !isCount(f.from, slots - 1)) return `frames[${i}]`;
    last = f.seq;
    const to = f.to;
    const toOk = to === -1 || isCount(to, slots - 1) || (Array.isArray(to) && to.length > 0 && to.every((t) => isCount(t, slots - 1)));
    if (!toOk) return `frames[${i}].to`;
    if (relayedFrame(f.frame, maxFrameBytes)?.seq !== f.seq) return `frames[${i}].frame`;
  }
}

function checkLost(lost: unknown, seq: number, slots: number): string | undefined {
  if (!isObject(lost) || !isCount(lost.broadcastSeq, seq) || !isCount(lost.broadcastOtherSeq, seq)) return "lost";
  if (!(lost.broadcastFrom === -1 || isCount(lost.broadcastFrom, slots - 1))) return "lost";
  const targeted = lost.targeted;
  if (!Array.isArray(targeted) || targeted.length > slots) return "lost.targeted";
  const ok = targeted.every((e) => Array.isArray(e) && e.length === 2 && isCount(e[0], slots - 1) && isCount(e[1], seq));
  if (!ok) return "lost.targeted";
}

/**
 * The hand-off's one validation step, as strict as parseFrame: a peer's body
 * becomes a RoomTransfer or a rejection naming the first bad field. Unknown
 * fields are ignored, as in client frames. `region` is the receiver's: a room
 * never leaves the region its code names.
 */
function parseTransfer(body: unknown, limits: RelayOptions, region: string, maxSlots: number): RoomTransfer | TransferRejection {
  const bad = (error: string): TransferRejection => ({ status: 400, error });
  if (!isObject(body)) return bad("body");
  if (!isSlot(body.v)) return bad("v");
  if (!TRANSFER_VERSIONS.includes(body.v)) return { status: 422, error: `version ${body.v} unknown here` };
  const { transfer, source, code, maxClients, origin, url, seq, state, hostGraceMs } = body;
  if (typeof transfer !== "string" || !TRANSFER_ID_PATTERN.test(transfer)) return bad("transfer");
  if (typeof source !== "string" || !INSTANCE_ID_PATTERN.test(source)) return bad("source");
  if (typeof code !== "string" || codeFromPath(`/${code}`) !== code) return bad("code");
  const home = regionOfCode(code);
  if (home !== null && home !== region.toLowerCase()) return bad("code: another region's");
  if (!isSlot(maxClients) || maxClients < 1 || maxClients > limits.maxRoomClients) return bad("maxClients");
  if (typeof origin !== "string" || origin.length > ORIGIN_MAX_CHARS) return bad("origin");
  if (url !== undefined && checkUrlTemplate(url)) return bad("url");
  if (!isSlot(seq)) return bad("seq");
  const slotsBad = checkTransferSlots(body.slots, seq, maxSlots);
  if (slotsBad) return bad(slotsBad);
  const slots = (body.slots as unknown[]).length;
  if (state !== undefined) {
    const frame = relayedFrame(state, limits.maxStateBytes + FRAME_OVERHEAD_BYTES);
    if (frame?.type !== "state" || frame.seq > seq) return bad("state");
  }
  const maxFrameBytes = Math.max(limits.maxMessageBytes, limits.maxStateBytes) + FRAME_OVERHEAD_BYTES;
  const framesBad = checkTransferFrames(body.frames, seq, slots, maxFrameBytes) ?? checkLost(body.lost, seq, slots);
  if (framesBad) return bad(framesBad);
  if (hostGraceMs !== undefined && !isCount(hostGraceMs, limits.hostGraceMs)) return bad("hostGraceMs");
  return body as unknown as RoomTransfer;
}

/** The largest body a valid transfer can take (JSON escaping at most doubles a frame), so a bigger one is refused unread. */
function maxTransferBytes(limits: RelayOptions, maxSlots: number): number {
  const perSlot = 2 * 128 + 64;
  return 2 * (limits.resumeRoomBytes + limits.maxStateBytes + 2 * limits.maxMessageBytes) + maxSlots * perSlot + limits.resumeRoomFrames * 96 + 64 * 1024;
}

// ==================================================================== logging

type Logger = Record<Exclude<LogLevel, "silent">, (event: string, fields?: Record<string, unknown>) => void>;

/** JSON lines. Callers pass counts and codes only: never a clientId or game data. */
function makeLogger(level: LogLevel, sink: (line: string) => void): Logger {
  const threshold = LOG_LEVELS.indexOf(level);
  const at = (lvl: Exclude<LogLevel, "silent">) => (event: string, fields?: Record<string, unknown>) => {
    if (LOG_LEVELS.indexOf(lvl) < threshold) return;
    sink(JSON.stringify({ t: new Date().toISOString(), level: lvl, event, ...fields }));
  };
  return { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

// ==================================================================== metrics

/** Why an upgrade was refused by `ALLOWED_ORIGINS`: an `Origin` not on it, or none with `ALLOWED_ORIGINS_REQUIRE`. */
type OriginRefusal = "not_listed" | "missing";

interface OriginTotals {
  connections: number;
  rooms: number;
}

/** Counters are plain integers bumped in place; the text is rendered on scrape. */
function makeCounters() {
  return {
    relayedBroadcast: 0,
    relayedTargeted: 0,
    deliveries: 0,
    bytesRelayed: 0,
    rateLimitedFrames: 0,
    framesReplayed: 0,
    /** Numbered frames dropped as already accepted (lossless sends). */
    duplicateFrames: 0,
    resumes: new Map<"resumed" | "too_old", number>(),
    originRefusals: new Map<OriginRefusal, number>([["not_listed", 0], ["missing", 0]]),
    /** Lookups refused by the miss budget, by how they came: a `join`, or `GET /room/<code>`. */
    lookupsRefused: new Map<"join" | "http", number>([["join", 0], ["http", 0]]),
    errors: new Map<ErrorCode, number>(),
    closes: new Map<number, number>(),
    /** Since-boot totals per origin, capped: later origins count under `__other__`. */
    origins: new Map<string, OriginTotals>(),
  };
}
type Counters = ReturnType<typeof makeCounters>;

const ORIGINS_TRACKED_MAX = 500;
const OTHER_ORIGIN = "__other__";

function bump<K>(map: Map<K, number>, key: K, by = 1): void {
  map.set(key, (map.get(key) ?? 0) + by);
}

function originTotals(counters: Counters, origin: string): OriginTotals {
  let totals = counters.origins.get(origin);
  if (!totals) {
    const key = counters.origins.size < ORIGINS_TRACKED_MAX ? origin : OTHER_ORIGIN;
    totals = counters.origins.get(key) ?? { connections: 0, rooms: 0 };
    counters.origins.set(key, totals);
  }
  return totals;
}

const escapeLabel = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

// ==================================================================== routing
//
// SPEC §5: many machines, many regions. Fly's proxy moves every request; the
// relay only answers with `fly-replay` (409) when a request belongs elsewhere:
//   1. `?instance=<id>` of another machine  → `instance=<id>;timeout=5s;fallback=force_self`
//      (the fallback returns the request here: HTTP gets a 302 without the
//      hint, a WebSocket upgrade is served here)
//   2. a room code of another known region → `region=<r>;timeout=5s;fallback=force_self`
//   3. a code of this region, not local     → probe this region's peers, then
//      `instance=<owner>;…` on a hit, or serve locally on a miss
// Routing is active only on Fly (flyAppName set); a lone relay serves everything.
//
// Probe discipline (the expensive part, bounded on purpose):
// - a probe is `GET http://<id>.vm.<app>.internal:<port>/room/<code>` carrying
//   PROBE_HEADER; a request with that header is answered from local state only,
//   so a probe never triggers probes (no N² fan-out);
// - one round per code at a time (concurrent lookups share it), at most
//   probeConcurrency peers in flight per round, the whole round (DNS included)
//   bounded by probeTimeoutMs; the first hit aborts the rest and a miss answers
//   as soon as every peer has said no;
// - results are cached briefly (misses probeMissCacheMs, hits probeHitCacheMs)
//   in a size-capped map, and a per-process token bucket (probeBudgetPerSec
//   peer requests) caps what random-code floods can send to the region: past
//   it a lookup is answered as a miss without probing.
// - a request that Fly already replayed to us from this region (fly-replay-src
//   with our region) or that fell back (fly-replay-failed) is never probed for.

export interface RoutingOptions {
  /** `host:port` of the DNS server for `.internal` names; "" uses the system resolver (Fly's fdaa::3). */
  dnsServer: string;
  /** Bound on one probe round, DNS included. */
  probeTimeoutMs: number;
  /** Peers probed at once within a round. */
  probeConcurrency: number;
  /** Peer requests this process may send per second (token bucket, burst = 2 s worth). */
  probeBudgetPerSec: number;
  /** How long "no peer has this code" is remembered. */
  probeMissCacheMs: number;
  /** How long "this peer has this code" is remembered. */
  probeHitCacheMs: number;
}

/** A function, not a const, so that DEFAULTS (above, in the options section) can spread it. */
function routingDefaults(): RoutingOptions {
  return {
    dnsServer: "",
    // In-region 6PN round trips are a few ms; a peer silent for 1 s is treated as a miss.
    probeTimeoutMs: 1000,
    probeConcurrency: 8,
    probeBudgetPerSec: 200,
    // Short: a code typed wrong is retried within seconds, a new room's code is never in it.
    probeMissCacheMs: 2000,
    probeHitCacheMs: 10_000,
  };
}

/** Marks a peer's probe: answered from local state only, never probed further. */
export const PROBE_HEADER = "x-party-sockets-probe";
const REPLAY_TIMEOUT = "timeout=5s;fallback=force_self";
const NEVER_ROOM_PATHS = new Set(["/health", "/metrics", "/client.js"]);
/** Fly machine ids are 14 hex digits; ours default to 8. Anything else is no hint. */
const INSTANCE_ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const PROBE_CACHE_MAX_ENTRIES = 10_000;
/** `vms.<app>.internal` is re-read at most this often (Fly answers it with a 5 s TTL). */
const PEER_LIST_CACHE_MS = 5000;
const PROBE_FAILED_LOG_EVERY_MS = 10_000;

type ProbeResult = "hit" | "miss" | "error" | "timeout" | "aborted" | "skipped";
type ReplayKind = "instance" | "region";

interface RoutingContext {
  options: RoutingOptions;
  flyAppName: string;
  instanceId: string;
  region: string;
  /** The port peers listen on: ours (every machine runs the same config). */
  port: () => number;
  hasRoom: (code: string) => boolean;
  /** The peer a room handed off on SIGTERM went to (remembered until exit). */
  movedTo: (code: string) => string | undefined;
  log: Logger;
}

interface Peer {
  id: string;
  region: string;
}

/** The room code a path names: `/<code>` or `/room/<code>`, well-formed only. */
function codeFromPath(pathname: string): string | null {
  const raw = pathname.startsWith("/room/") ? pathname.slice(6) : pathname.slice(1);
  return raw.length === 6 && decodeRoomCode(raw) !== null ? raw : null;
}

function isUpgrade(req: Request): boolean {
  return req.headers.get("upgrade")?.toLowerCase() === "websocket";
}

/** `instance=…;region=…;t=…` → its fields. */
function parseReplaySrc(header: string): Record<string, string> {
  const fields: Record<string, string> = {};
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0) fields[part.slice(0, eq).trim()] = part.slice(eq + 1).trim();
  }
  return fields;
}

/** `vms.<app>.internal` TXT → peers. Bun returns each TXT character-string as its own entry, so all are joined. */
function parsePeerList(records: string[][]): Peer[] {
  return records
    .flat()
    .join("")
    .split(",")
    .map((entry) => entry.trim().split(/\s+/))
    .filter((parts): parts is [string, string] => parts.length === 2 && INSTANCE_ID_PATTERN.test(parts[0]!))
    .map(([id, region]) => ({ id, region: region.toLowerCase() }));
}

function createRouter(ctx: RoutingContext) {
  const { options, instanceId } = ctx;
  const region = ctx.region.toLowerCase();
  const probes = new Map<ProbeResult, number>(["hit", "miss", "error", "timeout", "aborted", "skipped"].map((r) => [r as ProbeResult, 0]));
  const answered = new Map<"hit" | "miss", number>([["hit", 0], ["miss", 0]]);
  const replays = new Map<ReplayKind, number>([["instance", 0], ["region", 0]]);
  const resolver = new Resolver({ timeout: Math.max(100, Math.floor(options.probeTimeoutMs / 2)), tries: 1 });
  if (options.dnsServer) resolver.setServers([options.dnsServer]);

  const cache = new Map<string, { owner: string | null; untilMs: number }>();
  const inflight = new Map<string, Promise<string | null>>();
  let peerList: { peers: Peer[]; untilMs: number } | undefined;
  let peerListLookup: Promise<Peer[]> | undefined;
  const addresses = new Map<string, { address: string; untilMs: number }>();
  const burst = options.probeBudgetPerSec * 2;
  const budget: TokenBucket = { tokens: burst, bucketAtMs: Date.now() };
  const lastFailureLogMs = new Map<string, number>();

  const replay = (value: string, kind: ReplayKind): Response => {
    bump(replays, kind);
    return new Response("replaying\n", {
      status: 409,
      headers: { "Access-Control-Allow-Origin": "*", "fly-replay": value, "Content-Type": "text/plain" },
    });
  };

  function probeFailed(peer: string, reason: string): void {
    const nowMs = Date.now();
    if (nowMs - (lastFailureLogMs.get(peer) ?? 0) < PROBE_FAILED_LOG_EVERY_MS) return;
    lastFailureLogMs.set(peer, nowMs);
    ctx.log.warn("probe_failed", { peer, reason });
  }

  function takeBudget(n: number): boolean {
    return takeTokens(budget, n, Date.now(), options.probeBudgetPerSec / 1000, burst);
  }

  function remember(code: string, owner: string | null): void {
    if (cache.size >= PROBE_CACHE_MAX_ENTRIES) cache.delete(cache.keys().next().value!);
    cache.set(code, { owner, untilMs: Date.now() + (owner ? options.probeHitCacheMs : options.probeMissCacheMs) });
  }

  /** This region's other machines, from `vms.<app>.internal`. */
  function regionPeers(): Promise<Peer[]> {
    if (peerList && peerList.untilMs > Date.now()) return Promise.resolve(peerList.peers);
    peerListLookup ??= resolver
      .resolveTxt(`vms.${ctx.flyAppName}.internal`)
      .then(parsePeerList, (err: NodeJS.ErrnoException) => {
        probeFailed("dns", `vms lookup: ${err.code ?? err.message}`);
        return [] as Peer[];
      })
      .then((all) => {
        const peers = all.filter((p) => p.region === region && p.id !== instanceId);
        peerList = { peers, untilMs: Date.now() + PEER_LIST_CACHE_MS };
        return peers;
      })
      .finally(() => (peerListLookup = undefined));
    return peerListLookup;
  }

  /** `<id>.vm.<app>.internal`: IPv6 on Fly's 6PN, IPv4 where only that exists (tests). */
  async function addressOf(id: string): Promise<string> {
    const known = addresses.get(id);
    if (known && known.untilMs > Date.now()) return known.address;
    const name = `${id}.vm.${ctx.flyAppName}.internal`;
    const [v6, v4] = await Promise.allSettled([resolver.resolve6(name), resolver.resolve4(name)]);
    const address = (v6.status === "fulfilled" && v6.value[0] ? `[${v6.value[0]}]` : undefined) ?? (v4.status === "fulfilled" ? v4.value[0] : undefined);
    if (!address) throw new Error(`no address for ${name}`);
    if (addresses.size >= PROBE_CACHE_MAX_ENTRIES) addresses.clear();
    addresses.set(id, { address, untilMs: Date.now() + PEER_LIST_CACHE_MS });
    return address;
  }

  async function probeOne(peer: Peer, code: string, round: AbortSignal, won: AbortSignal): Promise<boolean> {
    let result: ProbeResult;
    try {
      const address = await addressOf(peer.id);
      const res = await fetch(`http://${address}:${ctx.port()}/room/${code}`, {
        headers: { [PROBE_HEADER]: instanceId },
        signal: round,
      });
      await res.body?.cancel();
      result = res.status === 200 ? "hit" : res.status === 404 ? "miss" : "error";
      if (result === "error") probeFailed(peer.id, `status ${res.status}`);
    } catch (err) {
      result = won.aborted ? "aborted" : round.aborted ? "timeout" : "error";
      if (result !== "aborted") probeFailed(peer.id, result === "timeout" ? "timeout" : String((err as Error).message ?? err));
    }
    bump(probes, result);
    return result === "hit";
  }

  /** One bounded round over this region's peers: the first owner found, or null. */
  async function probeRound(code: string): Promise<string | null> {
    const round = new AbortController();
    const won = new AbortController();
    const timer = setTimeout(() => round.abort(), options.probeTimeoutMs);
    try {
      const peers = await Promise.race([
        regionPeers(),
        new Promise<Peer[]>((resolve) => round.signal.addEventListener("abort", () => resolve([]))),
      ]);
      if (peers.length === 0 || round.signal.aborted) return null;
      if (!takeBudget(peers.length)) {
        bump(probes, "skipped", peers.length);
        return null;
      }
      let owner: string | null = null;
      const queue = [...peers];
      const worker = async () => {
        for (let peer = queue.shift(); peer && !owner && !round.signal.aborted; peer = queue.shift()) {
          if (await probeOne(peer, code, round.signal, won.signal)) {
            owner ??= peer.id;
            won.abort();
            round.abort(); // the rest are cancelled
          }
        }
      };
      const workers = Promise.all(Array.from({ length: Math.min(options.probeConcurrency, peers.length) }, worker));
      // The answer never waits past the round's end, even for a peer whose DNS lookup hangs.
      await Promise.race([workers, new Promise((resolve) => round.signal.addEventListener("abort", resolve))]);
      // Peers never asked because the round ended count as aborted (after a hit) or timed out.
      const unasked = queue.splice(0);
      if (unasked.length > 0) bump(probes, owner ? "aborted" : "timeout", unasked.length);
      return owner;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Which same-region peer holds `code`, probing at most once at a time per code. */
  function findOwner(code: string): Promise<string | null> {
    const cached = cache.get(code);
    if (cached && cached.untilMs > Date.now()) return Promise.resolve(cached.owner);
    let pending = inflight.get(code);
    if (!pending) {
      pending = probeRound(code)
        .then((owner) => {
          remember(code, owner);
          return owner;
        })
        .finally(() => inflight.delete(code));
      inflight.set(code, pending);
    }
    return pending;
  }

  /**
   * Where a request goes: null to serve it here, or the answer to send (a 409
   * replay or a 302). Synchronous unless peers must be probed.
   */
  function route(req: Request, url: URL): Response | null | Promise<Response | null> {
    if (!ctx.flyAppName) return null;
    if (req.headers.has(PROBE_HEADER)) {
      // A peer's probe: local state only, never probe again.
      const code = codeFromPath(url.pathname);
      if (code && url.pathname.startsWith("/room/")) bump(answered, ctx.hasRoom(code) ? "hit" : "miss");
      return null;
    }
    const src = req.headers.get("fly-replay-src");
    const fellBack = req.headers.has("fly-replay-failed") || (src !== null && parseReplaySrc(src).instance === instanceId);
    const replayed = src !== null || fellBack;

    // The room's holder serves it whatever `?instance=` says: Fly stops routing to a
    // stopping machine, so a member's pin to the machine that handed the room off
    // would wait out the replay timeout. And that machine sends its rooms' requests
    // on to the peer that took them (unless the peer was unreachable: then we serve).
    const named = NEVER_ROOM_PATHS.has(url.pathname) ? null : codeFromPath(url.pathname);
    if (named && ctx.hasRoom(named)) return null;
    const moved = named ? ctx.movedTo(named) : undefined;
    if (moved && !fellBack) return replay(`instance=${moved};${REPLAY_TIMEOUT}`, "instance");

    const pinned = url.searchParams.get("instance");
    if (pinned !== null && INSTANCE_ID_PATTERN.test(pinned)) {
      if (pinned === instanceId) return null;
      if (!replayed) return replay(`instance=${pinned};${REPLAY_TIMEOUT}`, "instance");
      // We are the fallback: the pinned machine is gone.
      if (isUpgrade(req)) return null;
      const params = new URLSearchParams(url.search);
      params.delete("instance");
      const query = params.toString();
      return new Response(null, {
        status: 302,
        headers: { "Access-Control-Allow-Origin": "*", Location: url.pathname + (query ? `?${query}` : "") },
      });
    }

    // `?instance=` pinned every route above (so one machine's /metrics can be read through
    // the public address); only room codes go on to be routed by region and probe.
    if (NEVER_ROOM_PATHS.has(url.pathname)) return null;
    const code = codeFromPath(url.pathname);
    if (!code || ctx.hasRoom(code)) return null;
    const home = regionOfCode(code);
    if (home !== null && home !== region) {
      return replayed ? null : replay(`region=${home};${REPLAY_TIMEOUT}`, "region");
    }
    // A same-region replay or a fallback already went through a probe: serve here.
    if (fellBack || (src !== null && (parseReplaySrc(src).region ?? "").toLowerCase() === region)) return null;
    return findOwner(code).then((owner) => (owner ? replay(`instance=${owner};${REPLAY_TIMEOUT}`, "instance") : null));
  }

  return { route, probes, answered, replays, regionPeers, addressOf };
}

// ==================================================================== factory

export interface Relay {
  /** `http(s)://127.0.0.1:<port>` for local callers. */
  url: string;
  /** `ws(s)://127.0.0.1:<port>`. */
  wsUrl: string;
  port: number;
  instanceId: string;
  region: string;
  stats(): { rooms: number; clients: number };
  /** Refuse new rooms; resolves when none remain (or the drain timeout closes them). */
  drain(): Promise<void>;
  /** Close every socket and stop listening. */
  stop(): Promise<void>;
}

export function startRelay(overrides: Partial<RelayOptions> = {}): Relay {
  const options: RelayOptions = { ...DEFAULTS, ...overrides };
  const instanceId = options.instanceId || crypto.randomUUID().slice(0, 8);
  const region = options.region;
  const regionLabel = (region || "local").toUpperCase();
  const log = makeLogger(options.logLevel, options.logSink);
  const counters = makeCounters();
  const startedAtMs = Date.now();
  const router = createRouter({
    options,
    flyAppName: options.flyAppName,
    instanceId,
    region,
    port: () => server.port ?? options.port,
    hasRoom: (code) => rooms.has(code),
    movedTo: (code) => movedTo.get(code),
    log,
  });

  const rooms = new Map<string, Room>();
  /** Rooms handed off on SIGTERM → the peer that took each; their requests are replayed there until exit. */
  const movedTo = new Map<string, string>();
  const conns = new Set<Socket>();
  const connectionsByIp = new Map<string, number>();
  const roomsByIp = new Map<string, number>();
  const misses = createMissBudget(options.missBurstMisses, options.missRefillMs);
  let draining = false;
  let drained: (() => void) | undefined;
  let drainTimer: Timer | undefined;
  let drainPromise: Promise<void> | undefined;

  // ------------------------------------------------------------ delivery

  function recordClose(ws: Socket, close: CloseName): void {
    if (ws.data.closing) return;
    ws.data.closing = true;
    const { code, reason } = CLOSES[close];
    bump(counters.closes, code);
    ws.close(code, reason);
  }

  /** `peer_joined` / `peer_left`, as JSON.stringify would write them, without building an object per member (churn). */
  function peerFrame(type: "peer_joined" | "peer_left", index: number): string {
    return `{"type":"${type}","index":${index}}`;
  }

  /** Sends one frame to one socket, closing it with 4002 if its backlog passed the limit. */
  function deliver(ws: Socket, frame: string): void {
    if (ws.send(frame) <= 0) closeIfBackpressured(ws);
  }

  function closeIfBackpressured(ws: Socket): void {
    if (ws.getBufferedAmount() <= options.backpressureLimitBytes) return;
    log.warn("abuse_close", { reason: "slow_consumer", code: CLOSES.slowConsumer.code });
    evict(ws, "slowConsumer");
  }

  // Bun drops silently past its own backpressure limit, which sits 8 frames of
  // MAX_MESSAGE_BYTES above ours. A room may go unchecked for half that margin.
  const uncheckedBytesMax = 4 * options.maxMessageBytes;
  const roomsToCheck = new Set<Room>();

  /**
   * `publish` reports the worst status across subscribers: -1 means someone
   * is buffering. Only then is the room's backlog checked, and under sustained
   * load once per event-loop turn rather than once per frame (each check asks
   * every member), unless the frames since the last check could reach Bun's
   * limit first.
   */
  function publish(room: Room, from: Socket | null, frame: string): void {
    const status = from ? from.publish(room.topic, frame) : server.publish(room.topic, frame);
    if (status > 0) return;
    room.uncheckedBytes += utf8Bytes(frame);
    if (room.uncheckedBytes > uncheckedBytesMax) return checkBackpressure(room);
    if (roomsToCheck.size === 0) setImmediate(checkQueuedRooms);
    roomsToCheck.add(room);
  }

  function checkQueuedRooms(): void {
    // A check can evict, and the peer_left it publishes may queue the room again: keep that.
    const queued = [...roomsToCheck];
    roomsToCheck.clear();
    for (const room of queued) checkBackpressure(room);
  }

  function checkBackpressure(room: Room): void {
    room.uncheckedBytes = 0;
    if (room.closed) return;
    for (const member of room.slots) if (member.ws) closeIfBackpressured(member.ws);
  }

  function sendError(ws: Socket, code: ErrorCode, message?: string, extra?: Record<string, unknown>): void {
    bump(counters.errors, code);
    deliver(ws, JSON.stringify({ type: "error", code, message: message ?? ERRORS[code], ...extra }));
  }

  // ------------------------------------------------------------ rooms

  function fillUrl(template: string, code: string): string {
    return template
      .replaceAll("{room}", encodeURIComponent(code))
      .replaceAll("{instance}", encodeURIComponent(instanceId));
  }

  /** The region's index rides in the code's top bits (regions.ts), so any machine can route it. */
  function newRoomCode(): string {
    return generateRoomCode(region, (code) => rooms.has(code));
  }

  function seat(ws: Socket, room: Room, member: Member): void {
    member.ws = ws;
    ws.data.room = room;
    ws.data.member = member;
    ws.subscribe(room.topic);
  }

  /** Detaches a socket from its room; the caller decides what the others are told. */
  function unseat(ws: Socket): void {
    const { room } = ws.data;
    if (room) ws.unsubscribe(room.topic);
    ws.data.room = null;
    ws.data.member = null;
  }

  /** The member's socket is gone (closed, evicted or left): tell the others. */
  function vacate(room: Room, member: Member, ws: Socket): void {
    unseat(ws);
    member.ws = null;
    room.present--;
    if (room.present === 0 && !awaitsMembers(room)) return deleteRoom(room, "empty");
    publish(room, null, peerFrame("peer_left", member.index));
    // That publish may have evicted the last others (slow consumers) and deleted the room.
    if (member.index === 0 && !room.closed) startHostGrace(room);
  }

  function startHostGrace(room: Room, ms = options.hostGraceMs): void {
    room.hostGraceUntilMs = Date.now() + ms;
    room.hostGraceTimer = setTimeout(() => closeRoom(room, "host_grace_expired"), ms);
  }

  function deleteRoom(room: Room, reason: string): void {
    room.closed = true;
    if (room.frames) resumeLog?.release(room.frames);
    clearTimeout(room.hostGraceTimer);
    rooms.delete(room.code);
    const left = (roomsByIp.get(room.creatorIp) ?? 1) - 1;
    if (left > 0) roomsByIp.set(room.creatorIp, left);
    else roomsByIp.delete(room.creatorIp);
    log.info("room_closed", { room: room.code, reason });
    if (draining && rooms.size === 0) drained?.();
  }

  /** Ends a room for everyone (4001 "room closed" by default); /room/:code is 404 at once. */
  function closeRoom(room: Room, reason: string, close: CloseName = "roomClosed"): void {
    if (room.closed) return;
    for (const member of room.slots) {
      const ws = member.ws;
      if (!ws) continue;
      unseat(ws);
      member.ws = null;
      recordClose(ws, close);
    }
    room.present = 0;
    deleteRoom(room, reason);
  }

  /** Relay-initiated close of a member: its peers learn at once, not when TCP gives up. */
  function evict(ws: Socket, close: CloseName): void {
    const { room, member } = ws.data;
    if (room && member) vacate(room, member, ws);
    recordClose(ws, close);
  }

  // ------------------------------------------------------------ handlers

  function handleCreate(ws: Socket, msg: CreateMessage): void {
    const conn = ws.data;
    if (conn.room) return sendError(ws, "already_in_room");
    if (draining) return sendError(ws, "draining");
    if (rooms.size >= options.maxRooms) return sendError(ws, "too_many_rooms", "This server has too many rooms");
    if ((roomsByIp.get(conn.ip) ?? 0) >= options.maxRoomsPerIp) return sendError(ws, "too_many_rooms");
    const code = newRoomCode();
    const url = msg.url === undefined ? undefined : fillUrl(msg.url, code);
    const room = newRoom<Socket>({ code, maxClients: msg.maxClients, origin: conn.origin, creatorIp: conn.ip, url });
    room.present = 1;
    rooms.set(code, room);
    bump(roomsByIp, conn.ip);
    originTotals(counters, conn.origin).rooms++;
    seat(ws, room, addMember(room, msg.clientId));
    log.info("room_created", { room: code, maxClients: msg.maxClients });
    const created = { type: "created", room: code, instance: instanceId, region, index: 0, seq: 0, url: room.url };
    deliver(ws, JSON.stringify(created));
  }

  function handleJoin(ws: Socket, msg: JoinMessage): void {
    const { ip } = ws.data;
    if (ws.data.room) return sendError(ws, "already_in_room");
    const room = rooms.get(msg.room);
    const owned = room?.byClientId.get(msg.clientId);
    const nowMs = Date.now();
    if (!owned && !misses.mayAsk(ip, nowMs)) return refuseJoin(ws, nowMs);
    if (!room) {
      misses.charge(ip, nowMs);
      return sendError(ws, "room_not_found");
    }
    const verdict = joinVerdict(room, msg.clientId, maxSlotsPerRoom);
    if (verdict.kind === "refuse") return sendError(ws, verdict.code);
    if (verdict.kind === "replace") return replace(ws, room, verdict.member, msg.resume);
    const member = verdict.kind === "reclaim" ? verdict.member : addMember(room, msg.clientId);
    seat(ws, room, member);
    room.present++;
    if (member.index === 0) {
      clearTimeout(room.hostGraceTimer);
      room.hostGraceTimer = room.hostGraceUntilMs = undefined;
    }
    publish(room, ws, peerFrame("peer_joined", member.index));
    sendJoined(ws, room, member, owned ? msg.resume : undefined, msg.resume !== undefined);
  }

  /** The miss budget is spent: the same answer whether the room exists or not. */
  function refuseJoin(ws: Socket, nowMs: number): void {
    bump(counters.lookupsRefused, "join");
    const retryAfterMs = misses.retryAfterMs(ws.data.ip, nowMs);
    sendError(ws, "rate_limited", "Too many unknown room codes; retry later", { retryAfterMs });
  }

  /** The clientId's slot is live on another socket: this one takes over, peers see nothing. */
  function replace(ws: Socket, room: Room, member: Member, resume: number | undefined): void {
    const old = member.ws!;
    unseat(old);
    recordClose(old, "replaced");
    seat(ws, room, member);
    sendJoined(ws, room, member, resume, resume !== undefined);
  }

  /**
   * `joined`, then either every frame the member missed since `resume` (when
   * the resume log still reaches back that far) or the state snapshot.
   */
  function sendJoined(ws: Socket, room: Room, member: Member, resume: number | undefined, askedToResume: boolean): void {
    const plan = resumePlan(room, member, resume, resumeLog);
    const resumed = plan.resumed;
    const joined = {
      type: "joined",
      room: room.code,
      index: member.index,
      peers: presentPeers(room, member),
      instance: instanceId,
      region,
      url: room.url,
      seq: room.seq,
      resumed: askedToResume ? resumed : undefined,
      oldest: askedToResume && !resumed ? plan.oldest : undefined,
      // Absent (as for a Party-Sockets 2.x client) until the slot numbered a frame.
      received: member.received || undefined,
    };
    deliver(ws, JSON.stringify(joined));
    if (askedToResume) bump(counters.resumes, resumed ? "resumed" : "too_old");
    if (resumed) return replayMissed(ws, room, member.index, plan.after);
    if (room.stateFrame !== undefined) deliver(ws, room.stateFrame);
  }

  /**
   * Lossless sends: a numbered frame at or below the slot's highest accepted
   * `n` was relayed (or stored) before, and is resent only because its sender
   * could not know. It is dropped without an error.
   */
  /** A frame the slot already had accepted: not relayed again, no error (it was delivered), counted. */
  function dropDuplicate(member: Member, n: number): boolean {
    if (!isDuplicate(member, n)) return false;
    counters.duplicateFrames++;
    return true;
  }

  /** The frame was relayed or stored: its `n` is now the slot's highest (an unnumbered frame's 0 changes nothing). */

  /** The hot path: one serialisation, fanout through the room topic. */
  function handleSend(ws: Socket, msg: ValidSend): void {
    const { room, member } = ws.data;
    if (!room || !member) return sendError(ws, "not_in_room");
    if (dropDuplicate(member, msg.n)) return;
    const to = msg.to;
    if (to === undefined) {
      counters.relayedBroadcast++;
      publish(room, ws, relayFrame(room, member, msg.dataJson, undefined, room.present - 1, ws.data.lastSeenMs));
    } else if (typeof to === "number") {
      const target = room.slots[to]?.ws;
      // Not relayed, so `n` is not accepted: a resend after a reconnect gets this error again, not silence.
      if (!target) return sendError(ws, "target_not_found");
      counters.relayedTargeted++;
      deliver(target, relayFrame(room, member, msg.dataJson, to, 1, ws.data.lastSeenMs));
    } else if (!sendToList(ws, room, member, to, msg.dataJson)) {
      return;
    }
    accept(member, msg.n);
  }

  // A spare place for frames the resume log does not take in place: the largest a
  // frame within MAX_MESSAGE_BYTES can become (its data, 3 bytes per UTF-16 unit at most).
  const spareWriter = new FrameWriter(Buffer.allocUnsafe(FRAME_OVERHEAD_BYTES + 3 * options.maxMessageBytes));

  /** Where a frame around `json` is written: in place at the resume log's head when the log can keep it. */
  function writerFor(json: string | undefined): FrameWriter {
    return resumeLog?.writerFor(maxFrameBytes(json)) ?? spareWriter;
  }

  /** Numbers a `message` frame, keeps it for `resume` and counts its deliveries. */
  function relayFrame(room: Room, from: Member, dataJson: string | undefined, to: Recipients, recipients: number, nowMs: number): string {
    const seq = ++room.seq;
    const frame = writerFor(dataJson).start(MESSAGE_HEAD).uint(from.index).raw(SEQ_FIELD).uint(seq);
    if (dataJson === undefined) frame.close();
    else frame.raw(DATA_FIELD).jsonThenClose(dataJson);
    remember(room, seq, frame, from.index, to, nowMs);
    counters.deliveries += recipients;
    counters.bytesRelayed += frame.length * recipients;
    return frame.text();
  }

  let sendStamp = 0;
  /** `to: [...]`: each present slot once; the absent ones are reported back. Whether anyone got it. */
  function sendToList(ws: Socket, room: Room, sender: Member, to: number[], dataJson: string | undefined): boolean {
    const { targets, missing } = listTargets(room, to, ++sendStamp);
    if (targets.length > 0) {
      counters.relayedTargeted++;
      const frame = relayFrame(room, sender, dataJson, targets, targets.length, ws.data.lastSeenMs);
      // A delivery can evict a slow member, and with it others: look each socket up afresh.
      for (const index of targets) {
        const target = room.slots[index]!.ws;
        if (target) deliver(target, frame);
      }
    }
    if (missing) sendError(ws, "target_not_found", undefined, { missing: [...missing] });
    return targets.length > 0;
  }

  // ------------------------------------------------------------ resume log

  const resumeEnabled = options.resumeWindowMs > 0 && options.resumeRoomFrames > 0 && options.resumeRoomBytes > 0 && options.resumeTotalBytes > 0;
  const resumeLog = resumeEnabled ? new ResumeLog(options.resumeTotalBytes, options.resumeRoomFrames, options.resumeRoomBytes) : undefined;

  function remember(room: Room, seq: number, frame: FrameWriter, from: number, to: Recipients, atMs: number): void {
    const frames = (room.frames ??= new RoomFrames());
    if (resumeLog) resumeLog.keep(frames, seq, frame, from, to, atMs);
    else frames.forget(seq, from, to);
  }

  function replayMissed(ws: Socket, room: Room, index: number, after: number): void {
    if (!room.frames || !resumeLog) return;
    for (const frame of resumeLog.addressedTo(room.frames, index, after)) {
      counters.framesReplayed++;
      deliver(ws, frame);
    }
  }

  function handleSetState(ws: Socket, stateJson: string, n: number): void {
    const { room, member } = ws.data;
    if (!room || !member) return sendError(ws, "not_in_room");
    if (dropDuplicate(member, n)) return;
    if (member.index !== 0) return sendError(ws, "not_host", "Only the host can set state");
    const seq = ++room.seq;
    const frame = writerFor(stateJson).start(STATE_HEAD).uint(seq).raw(DATA_FIELD).jsonThenClose(stateJson);
    remember(room, seq, frame, member.index, undefined, ws.data.lastSeenMs);
    room.stateFrame = frame.text();
    publish(room, ws, room.stateFrame);
    accept(member, n);
  }

  function handleCloseRoom(ws: Socket): void {
    const { room, member } = ws.data;
    if (!room || !member) return sendError(ws, "not_in_room");
    if (member.index !== 0) return sendError(ws, "not_host", "Only the host can close the room");
    closeRoom(room, "closed_by_host");
  }

  /** Leave for good: the slot is released, and its clientId can no longer reclaim it. */
  function handleLeave(ws: Socket): void {
    const { room, member } = ws.data;
    if (!room || !member) return sendError(ws, "not_in_room");
    if (member.index === 0) return closeRoom(room, "host_left");
    release(room, member);
    vacate(room, member, ws);
    deliver(ws, JSON.stringify({ type: "left", room: room.code }));
  }

  /**
   * Host only: the member in slot `index` is closed with 4004 (the others get
   * `peer_left`), and the slot's clientId is barred for the room's life, even
   * when the slot is vacant or was left (a left slot's clientId is barred anew,
   * unless it has since taken another slot, which the host can kick in turn).
   */
  function handleKick(ws: Socket, index: number): void {
    const { room, member } = ws.data;
    if (!room || !member) return sendError(ws, "not_in_room");
    const verdict = kickVerdict(room, member, index);
    if (verdict.kind === "refuse") return sendError(ws, verdict.code, verdict.code === "not_host" ? "Only the host can kick" : undefined);
    if (verdict.kind === "already") return;
    bar(room, verdict.member);
    log.info("member_kicked", { room: room.code, index });
    if (verdict.member.ws) evict(verdict.member.ws, "kicked");
  }

  /** In a room, `received` tells a numbering client which of its frames it may forget (absent until there are any). */
  function handlePing(ws: Socket, msg: PingMessage): void {
    deliver(ws, JSON.stringify({ type: "pong", id: msg.id, t: Date.now(), received: ws.data.member?.received || undefined }));
  }

  function dispatch(ws: Socket, msg: Valid): void {
    switch (msg.type) {
      case "send":
        return handleSend(ws, msg);
      case "create":
        return handleCreate(ws, msg);
      case "join":
        return handleJoin(ws, msg);
      case "set_state":
        return handleSetState(ws, msg.stateJson, msg.n);
      case "close_room":
        return handleCloseRoom(ws);
      case "leave":
        return handleLeave(ws);
      case "kick":
        return handleKick(ws, msg.index);
      case "ping":
        return handlePing(ws, msg);
    }
  }

  const maxSlotsPerRoom = 4 * options.maxRoomClients;

  // ------------------------------------------------------------ frames in

  const rateTokensPerMs = options.rateLimitPerSec / 1000;
  /** The per-connection rate limit, on every frame: the bucket lives on the socket, so no timer and no lookup. */
  function allowFrame(conn: Conn, nowMs: number): boolean {
    return rateTokensPerMs === 0 || takeTokens(conn, 1, nowMs, rateTokensPerMs, options.rateLimitBurst);
  }

  function onFrame(ws: Socket, raw: string | Buffer): void {
    const conn = ws.data;
    if (conn.closing) return;
    const nowMs = Date.now();
    conn.lastSeenMs = nowMs;
    if (!allowFrame(conn, nowMs)) {
      counters.rateLimitedFrames++;
      if (nowMs - conn.rateErrorAtMs >= 1000) {
        conn.rateErrorAtMs = nowMs;
        sendError(ws, "rate_limited");
      }
      return;
    }
    // A UTF-16 length times 3 bounds the UTF-8 size, so most frames skip the count.
    const tooLarge =
      typeof raw === "string"
        ? raw.length * 3 > options.maxMessageBytes && utf8Bytes(raw) > options.maxMessageBytes
        : raw.byteLength > options.maxMessageBytes;
    if (tooLarge) {
      sendError(ws, "message_too_large", `Message larger than ${options.maxMessageBytes} bytes`);
      log.warn("abuse_close", { reason: "message_too_large", code: CLOSES.tooLarge.code });
      return evict(ws, "tooLarge");
    }
    if (typeof raw !== "string") return sendError(ws, "binary_unsupported");
    const msg = parseFrame(raw, options);
    if ("reject" in msg) return sendError(ws, msg.reject, msg.message);
    if (frozenByMove(conn, msg)) return sendError(ws, "moving");
    dispatch(ws, msg);
  }

  function onOpen(ws: Socket): void {
    const conn = ws.data;
    conn.ip ||= ws.remoteAddress || "unknown";
    conns.add(ws);
    originTotals(counters, conn.origin).connections++;
    const count = (connectionsByIp.get(conn.ip) ?? 0) + 1;
    connectionsByIp.set(conn.ip, count);
    if (count > options.maxConnectionsPerIp) {
      log.warn("abuse_close", { reason: "too_many_connections", code: CLOSES.policy.code });
      recordClose(ws, "policy");
    }
  }

  function onClose(ws: Socket): void {
    conns.delete(ws);
    const { ip, room, member } = ws.data;
    const left = (connectionsByIp.get(ip) ?? 1) - 1;
    if (left > 0) connectionsByIp.set(ip, left);
    else connectionsByIp.delete(ip);
    if (room && member && member.ws === ws) vacate(room, member, ws);
  }

  // ------------------------------------------------------------ heartbeat

  /**
   * One timer for the whole process. Bun resets its idle timer on every send,
   * so in a busy room a vanished phone would never be pinged; instead we
   * track the last frame or pong from each client, ping the quiet ones and
   * close the silent ones with 4003.
   */
  const heartbeat = setInterval(() => {
    const nowMs = Date.now();
    resumeLog?.expire(nowMs - options.resumeWindowMs);
    misses.sweep(nowMs);
    for (const ws of conns) {
      if (ws.data.closing) continue;
      const silentMs = nowMs - ws.data.lastSeenMs;
      if (silentMs > options.heartbeatTimeoutMs) {
        log.info("abuse_close", { reason: "unresponsive", code: CLOSES.unresponsive.code });
        evict(ws, "unresponsive");
      } else if (silentMs >= options.heartbeatIntervalMs) {
        ws.ping();
      }
    }
  }, options.heartbeatIntervalMs);
  heartbeat.unref();

  // ------------------------------------------------------------ hand-off (deploys)
  //
  // On SIGTERM, with PEER_SECRET set, each room is offered to the region's other
  // machines in turn (rooms spread round robin). While an offer is out the room is
  // frozen: members' frames get `moving` and nothing is relayed, so the value sent
  // stays exact. On 201/200 every member gets `moved` and close 4005, and requests
  // for the code are replayed to the peer until exit; otherwise the room thaws and
  // drains here as before. A draining machine refuses adoption (503), so two
  // machines draining at once never pass rooms back and forth.

  const handoffEnabled = options.peerSecret !== "" && options.flyAppName !== "";
  const handoffs = new Map<HandoffResult, number>(HANDOFF_RESULTS.map((r) => [r, 0]));
  const handoffSeconds = { sum: 0, count: 0 };
  let roomsAdopted = 0;
  const sha256 = (text: string) => createHash("sha256").update(text).digest();
  const secretDigest = sha256(options.peerSecret);
  const transferBytesMax = maxTransferBytes(options, 4 * options.maxRoomClients);

  /** Digests have equal lengths whatever was sent, so the compare takes the same time. */
  function secretMatches(given: string | null): boolean {
    return given !== null && timingSafeEqual(sha256(given), secretDigest);
  }

  /** A member's frame, or a join, for a room being handed off: refused with `moving`; pings still answer. */
  function frozenByMove(conn: Conn, msg: Valid): boolean {
    if (conn.room) return conn.room.moving === true && msg.type !== "ping";
    return msg.type === "join" && rooms.get(msg.room)?.moving === true;
  }

  /** An adopted room waits, empty, for its members until the moving grace ends. */
  function awaitsMembers(room: Room): boolean {
    return room.movingGraceUntilMs !== undefined && Date.now() < room.movingGraceUntilMs;
  }

  /** The room comes to life here with nobody present; the host's slot counts as vacated at the move. */
  function adopt(t: RoomTransfer): void {
    const nowMs = Date.now();
    const room = roomFromTransfer<Socket>(t, resumeLog, nowMs);
    room.movingGraceUntilMs = nowMs + options.movingGraceMs;
    rooms.set(room.code, room);
    startHostGrace(room, t.hostGraceMs ?? options.hostGraceMs);
    setTimeout(() => {
      if (!room.closed && room.present === 0) deleteRoom(room, "moving_grace_expired");
    }, options.movingGraceMs).unref();
    roomsAdopted++;
    log.info("room_adopted", { room: room.code, peer: t.source });
  }

  const peerAnswer = (status: number, body: Record<string, unknown>) => json(body, status);

  /** POST /peer/rooms: a draining peer hands us a room. Every refusal is a 4xx/503 naming a field, never a value. */
  async function receiveRoom(req: Request): Promise<Response> {
    if (!secretMatches(req.headers.get(PEER_SECRET_HEADER))) return peerAnswer(401, { error: "peer secret required" });
    if (req.method !== "POST") return peerAnswer(405, { error: "POST only" });
    if (draining) return peerAnswer(503, { error: "draining" });
    const body = await readBounded(req, transferBytesMax);
    if (body === undefined) return peerAnswer(413, { error: `body over ${transferBytesMax} bytes` });
    let value: unknown;
    try {
      value = JSON.parse(body);
    } catch {
      return peerAnswer(400, { error: "body is not JSON" });
    }
    const t = parseTransfer(value, options, region, maxSlotsPerRoom);
    if ("status" in t) return peerAnswer(t.status, { error: t.error });
    const held = rooms.get(t.code);
    if (held) return held.transferId === t.transfer ? peerAnswer(200, { room: t.code, transfer: t.transfer }) : peerAnswer(409, { error: "code held here" });
    // Checked again after the body: we may have started draining, or the sender given up (no orphan copy).
    if (draining || req.signal.aborted) return peerAnswer(503, { error: "draining" });
    if (rooms.size >= options.maxRooms) return peerAnswer(503, { error: "full" });
    adopt(t);
    return peerAnswer(201, { room: t.code, transfer: t.transfer });
  }

  /** The body as text, or undefined past `maxBytes` (declared or streamed). */
  async function readBounded(req: Request, maxBytes: number): Promise<string | undefined> {
    if (Number(req.headers.get("content-length") ?? 0) > maxBytes) return undefined;
    const chunks: Uint8Array[] = [];
    let total = 0;
    const reader = req.body?.getReader();
    for (let next = await reader?.read(); next && !next.done; next = await reader!.read()) {
      total += next.value.byteLength;
      if (total > maxBytes) {
        await reader!.cancel();
        return undefined;
      }
      chunks.push(next.value);
    }
    return Buffer.concat(chunks).toString("utf8");
  }

  /** Offers the room to one peer. The room freezes first, so nothing changes after it is written out. */
  async function offer(room: Room, peer: string, transfer: string): Promise<HandoffResult> {
    room.moving = true;
    const body = JSON.stringify(roomToTransfer(room, resumeLog, transfer, instanceId, Date.now()));
    const signal = AbortSignal.timeout(options.handoffTimeoutMs);
    try {
      const address = await router.addressOf(peer);
      const res = await globalThis.fetch(`http://${address}:${server.port}${PEER_ROOMS_PATH}`, {
        method: "POST",
        headers: { "content-type": "application/json", [PEER_SECRET_HEADER]: options.peerSecret },
        body,
        signal,
      });
      // Only a peer that names this transfer took the room (an old release answers this path with its status page).
      const answer: unknown = await res.json().catch(() => undefined);
      if ((res.status === 201 || res.status === 200) && isObject(answer) && answer.transfer === transfer) return "moved";
      log.warn("handoff_failed", { room: room.code, peer, reason: String(res.status) });
      return "refused";
    } catch {
      log.warn("handoff_failed", { room: room.code, peer, reason: signal.aborted ? "timeout" : "unreachable" });
      return "failed";
    }
  }

  /** Each peer in turn until one takes the room; with none, it thaws and drains here. */
  async function handOff(room: Room, peers: string[]): Promise<void> {
    const transfer = crypto.randomUUID();
    const startedMs = performance.now();
    for (const peer of peers) {
      if (room.closed) return;
      const result = await offer(room, peer, transfer);
      bump(handoffs, result);
      if (result !== "moved") continue;
      handoffSeconds.sum += (performance.now() - startedMs) / 1000;
      handoffSeconds.count++;
      return finishMove(room, peer);
    }
    room.moving = false;
    bump(handoffs, "no_peer");
    log.warn("handoff_failed", { room: room.code, peer: null, reason: "no_peer" });
  }

  function finishMove(room: Room, peer: string): void {
    movedTo.set(room.code, peer);
    log.info("room_moved", { room: room.code, peer });
    const moved = JSON.stringify({ type: "moved", instance: peer });
    for (const member of room.slots) if (member.ws) deliver(member.ws, moved);
    closeRoom(room, "moved", "moved");
  }

  /** Every room, HANDOFF_CONCURRENCY at a time, spread over the region's peers. */
  async function handOffAll(): Promise<void> {
    const peers = (await router.regionPeers()).map((p) => p.id);
    const queue = [...rooms.values()];
    if (peers.length === 0) {
      for (const room of queue) log.warn("handoff_failed", { room: room.code, peer: null, reason: "no_peer" });
      return bump(handoffs, "no_peer", queue.length);
    }
    let turn = 0;
    const worker = async () => {
      for (let room = queue.shift(); room; room = queue.shift()) {
        const first = turn++ % peers.length;
        await handOff(room, [...peers.slice(first), ...peers.slice(0, first)]);
      }
    };
    await Promise.all(Array.from({ length: Math.min(HANDOFF_CONCURRENCY, queue.length) }, worker));
  }

  // ------------------------------------------------------------ HTTP

  const corsHeaders = { "Access-Control-Allow-Origin": "*" };
  const json = (body: unknown, status = 200, headers: Record<string, string> = {}) =>
    Response.json(body, { status, headers: { ...corsHeaders, ...headers } });
  const text = (body: string, contentType: string, status = 200, headers: Record<string, string> = {}) =>
    new Response(body, { status, headers: { ...corsHeaders, "Content-Type": contentType, ...headers } });

  const clientJs = new Bun.Transpiler({ loader: "ts", target: "browser" }).transformSync(clientSource);
  const clientEtag = `"${Bun.hash(clientJs).toString(36)}"`;

  function serveClient(req: Request): Response {
    if (req.headers.get("if-none-match") === clientEtag) {
      return new Response(null, { status: 304, headers: { ...corsHeaders, ETag: clientEtag } });
    }
    return text(clientJs, "text/javascript; charset=utf-8", 200, { ETag: clientEtag, "Cache-Control": "no-cache" });
  }

  /** Party-Sockets' fields, and nothing more: no slots, no clientIds, no instance beyond the header. */
  function roomInfo(rawCode: string, asker: string | null): Response {
    let code: string;
    try {
      code = decodeURIComponent(rawCode);
    } catch {
      return json({ error: "Bad room code" }, 400, { "X-Instance-Id": instanceId });
    }
    const room = rooms.get(code);
    if (!room) {
      if (asker !== null) misses.charge(asker, Date.now());
      return json({ error: "Room not found" }, 404, { "X-Instance-Id": instanceId });
    }
    const body = { clients: room.present, maxClients: room.maxClients, origin: room.origin, url: room.url };
    return json(body, 200, { "X-Instance-Id": instanceId });
  }

  /**
   * Who a `/room/<code>` lookup is charged to: the client's IP, or null for a
   * peer's probe. A probe comes over Fly's private network, never through its
   * proxy, so it has no Fly-Client-IP; the client it probes for is charged by
   * the machine it asked. Anything through the proxy that claims to be a probe is charged.
   */
  function lookupAsker(req: Request, srv: Server<Conn>): string | null {
    const probe = options.flyAppName !== "" && req.headers.has(PROBE_HEADER) && !req.headers.has("fly-client-ip");
    return probe ? null : clientIp(req, srv);
  }

  /** The miss budget is spent: 429 before any routing or probing, whether the room exists or not. */
  function refuseLookup(asker: string | null): Response | undefined {
    const nowMs = Date.now();
    if (asker === null || misses.mayAsk(asker, nowMs)) return undefined;
    bump(counters.lookupsRefused, "http");
    const retryAfterS = Math.max(1, Math.ceil(misses.retryAfterMs(asker, nowMs) / 1000));
    return json({ error: "Too many unknown room codes" }, 429, { "Retry-After": String(retryAfterS), "X-Instance-Id": instanceId });
  }

  function statusSnapshot(req: Request): Response {
    if (options.dashboardUrl) return new Response(null, { status: 302, headers: { ...corsHeaders, Location: options.dashboardUrl } });
    const { rooms: roomCount, clients } = stats();
    if (req.headers.get("accept")?.includes("text/html")) {
      return text(statusPageHtml({ rooms: roomCount, clients, instance: instanceId, region, version: VERSION }), "text/html; charset=utf-8");
    }
    return text(`rooms: ${roomCount}\nclients: ${clients}\n`, "text/plain; charset=utf-8");
  }

  const routes: Record<string, (req: Request) => Response> = {
    "/health": () => json({ status: "ok" }),
    "/metrics": () => text(renderMetrics(), "text/plain; version=0.0.4; charset=utf-8"),
    "/client.js": serveClient,
  };

  const originAllowed = options.allowedOrigins.length > 0 ? originAllowList(options.allowedOrigins) : () => true;
  let originRefusalLoggedAtMs = 0;

  /** `ALLOWED_ORIGINS`: an HTTP 403 before the upgrade, so a refused page never gets a socket. */
  function refuseOrigin(origin: string | null): Response | undefined {
    const refusal: OriginRefusal | undefined = origin
      ? originAllowed(origin) ? undefined : "not_listed"
      : options.allowedOriginsRequire ? "missing" : undefined;
    if (!refusal) return undefined;
    bump(counters.originRefusals, refusal);
    const nowMs = Date.now();
    if (nowMs - originRefusalLoggedAtMs >= ORIGIN_REFUSED_LOG_EVERY_MS) {
      originRefusalLoggedAtMs = nowMs;
      log.warn("origin_refused", { origin: (origin ?? "").slice(0, 200), reason: refusal });
    }
    return text("Origin not allowed\n", "text/plain", 403);
  }

  /** The IP every per-IP limit counts, for an HTTP request (a socket's is read on open, the same way). */
  function clientIp(req: Request, srv: Server<Conn>): string {
    return flyClientIp(req) || srv.requestIP(req)?.address || "unknown";
  }

  /** On Fly its proxy is the socket's peer, so its header names the client; anywhere else it could be forged. */
  function flyClientIp(req: Request): string {
    return (options.flyAppName && req.headers.get("fly-client-ip")) || "";
  }

  function upgrade(req: Request, srv: Server<Conn>): Response | undefined {
    const header = req.headers.get("origin");
    const refused = refuseOrigin(header);
    if (refused) return refused;
    const nowMs = Date.now();
    const origin = (header || "unknown").slice(0, 200);
    const conn: Conn = {
      // Off Fly the socket's own address, read on open: `requestIP` here measured 11 % of churn's CPU samples.
      ip: flyClientIp(req),
      origin,
      room: null,
      member: null,
      tokens: options.rateLimitBurst,
      bucketAtMs: nowMs,
      rateErrorAtMs: 0,
      lastSeenMs: nowMs,
      closing: false,
    };
    if (srv.upgrade(req, { data: conn })) return undefined;
    return text("Expected a WebSocket upgrade\n", "text/plain", 400);
  }

  /** Routing first (SPEC §5: maybe a fly-replay elsewhere), then this machine's own answer. */
  function fetch(req: Request, srv: Server<Conn>): Response | undefined | Promise<Response | undefined> {
    const url = new URL(req.url);
    const upgrading = isUpgrade(req);
    const lookup = !upgrading && url.pathname.startsWith("/room/");
    const asker = lookup ? lookupAsker(req, srv) : null;
    const refused = lookup ? refuseLookup(asker) : undefined;
    if (refused) return refused;
    const routed = router.route(req, url);
    if (routed instanceof Promise) return routed.then((answer) => answer ?? serveHere(req, url, srv, upgrading, asker));
    return routed ?? serveHere(req, url, srv, upgrading, asker);
  }

  function serveHere(req: Request, url: URL, srv: Server<Conn>, upgrading: boolean, asker: string | null): Response | undefined | Promise<Response> {
    if (upgrading) return upgrade(req, srv);
    // Without PEER_SECRET the peer endpoint does not exist: that path is as unknown as any other.
    if (handoffEnabled && url.pathname === PEER_ROOMS_PATH) return receiveRoom(req);
    const route = routes[url.pathname];
    if (route) return route(req);
    if (url.pathname.startsWith("/room/")) return roomInfo(url.pathname.slice("/room/".length), asker);
    return statusSnapshot(req);
  }

  // ------------------------------------------------------------ metrics

  function stats(): { rooms: number; clients: number } {
    let clients = 0;
    for (const room of rooms.values()) clients += room.present;
    return { rooms: rooms.size, clients };
  }

  function renderMetrics(): string {
    const base = `instance="${escapeLabel(instanceId)}",region="${escapeLabel(regionLabel)}",version="${escapeLabel(VERSION)}"`;
    const out: string[] = [];
    const family = (name: string, type: "gauge" | "counter", help: string, samples: [string, number][]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [labels, value] of samples) out.push(`${name}{${base}${labels}} ${value}`);
    };
    const one = (value: number): [string, number][] => [["", value]];
    const byLabel = <K>(label: string, map: Map<K, number>): [string, number][] =>
      [...map].map(([k, v]) => [`,${label}="${escapeLabel(String(k))}"`, v]);

    const live = new Map<string, { rooms: number; clients: number }>();
    for (const room of rooms.values()) {
      const entry = live.get(room.origin) ?? { rooms: 0, clients: 0 };
      entry.rooms++;
      entry.clients += room.present;
      live.set(room.origin, entry);
    }
    const { rooms: roomCount, clients } = stats();
    const originSeries = rankOrigins(live);
    const originSamples = (value: (o: string) => number): [string, number][] =>
      originSeries.map((names) => [`,origin="${escapeLabel(names.label)}"`, names.members.reduce((s, o) => s + value(o), 0)]);
    const memory = process.memoryUsage();

    family("party_sockets_clients", "gauge", "Present room members on this machine", one(clients));
    family("party_sockets_rooms", "gauge", "Live rooms on this machine", one(roomCount));
    family("party_sockets_clients_by_origin", "gauge", "Present members by page origin", originSamples((o) => live.get(o)?.clients ?? 0));
    family("party_sockets_rooms_by_origin", "gauge", "Live rooms by page origin", originSamples((o) => live.get(o)?.rooms ?? 0));
    family("party_sockets_connections_total", "counter", "WebSocket connections opened since start, by origin", originSamples((o) => counters.origins.get(o)?.connections ?? 0));
    family("party_sockets_rooms_created_total", "counter", "Rooms created since start, by origin", originSamples((o) => counters.origins.get(o)?.rooms ?? 0));
    family("party_sockets_origins_tracked", "gauge", "Origins with their own totals (capped)", one(counters.origins.size));
    family("party_sockets_open_connections", "gauge", "Open WebSocket connections, in a room or not", one(conns.size));
    family("party_sockets_draining", "gauge", "1 while the relay drains for shutdown", one(draining ? 1 : 0));
    family("party_sockets_messages_relayed_total", "counter", "Relayed send frames by kind", [
      [`,kind="broadcast"`, counters.relayedBroadcast],
      [`,kind="targeted"`, counters.relayedTargeted],
    ]);
    family("party_sockets_deliveries_total", "counter", "Relayed message frames handed to recipients", one(counters.deliveries));
    family("party_sockets_bytes_relayed_total", "counter", "Bytes of relayed message frames handed to recipients", one(counters.bytesRelayed));
    family("party_sockets_rate_limited_frames_total", "counter", "Frames dropped by the rate limit", one(counters.rateLimitedFrames));
    family("party_sockets_errors_total", "counter", "Error frames sent, by code", byLabel("code", counters.errors));
    family("party_sockets_closes_total", "counter", "Closes the relay initiated, by close code", byLabel("code", counters.closes));
    family("party_sockets_probes_total", "counter", "Probes this machine sent to same-region peers, by result", byLabel("result", router.probes));
    family("party_sockets_probes_answered_total", "counter", "Peer probes this machine answered from local state", byLabel("result", router.answered));
    family("party_sockets_replays_total", "counter", "fly-replay answers sent, by kind", byLabel("kind", router.replays));
    family("party_sockets_resumes_total", "counter", "Joins with resume, by result", [
      [`,result="resumed"`, counters.resumes.get("resumed") ?? 0],
      [`,result="too_old"`, counters.resumes.get("too_old") ?? 0],
    ]);
    family("party_sockets_origin_refusals_total", "counter", "WebSocket upgrades refused by ALLOWED_ORIGINS, by reason", byLabel("reason", counters.originRefusals));
    family("party_sockets_lookups_refused_total", "counter", "Joins and /room lookups refused by the per-IP miss budget, by how they came", byLabel("via", counters.lookupsRefused));
    family("party_sockets_miss_budget_ips", "gauge", "IPs with a miss budget in use (capped)", one(misses.trackedIps()));
    family("party_sockets_frames_replayed_total", "counter", "Frames replayed to resuming members", one(counters.framesReplayed));
    family("party_sockets_duplicate_frames_total", "counter", "Numbered frames dropped because their n was already accepted", one(counters.duplicateFrames));
    family("party_sockets_resume_buffer_bytes", "gauge", "UTF-8 bytes of relayed frames kept for resume", one(resumeLog?.held ?? 0));
    family("party_sockets_handoffs_total", "counter", "Attempts to hand a room to a peer on SIGTERM, by result (no_peer: per room left here)", byLabel("result", handoffs));
    family("party_sockets_rooms_adopted_total", "counter", "Rooms this machine adopted from a draining peer", one(roomsAdopted));
    out.push(
      "# HELP party_sockets_handoff_seconds Time from the first offer of a room to the peer's confirmation",
      "# TYPE party_sockets_handoff_seconds summary",
      `party_sockets_handoff_seconds_sum{${base}} ${handoffSeconds.sum}`,
      `party_sockets_handoff_seconds_count{${base}} ${handoffSeconds.count}`,
    );
    family("process_resident_memory_bytes", "gauge", "Resident set size", one(memory.rss));
    family("process_heap_used_bytes", "gauge", "JavaScript heap in use", one(memory.heapUsed));
    family("process_uptime_seconds", "gauge", "Seconds since the relay started", one((Date.now() - startedAtMs) / 1000));
    return out.join("\n") + "\n";
  }

  /** The busiest origins get a series each; the rest are summed under `__other__`. */
  function rankOrigins(live: Map<string, { clients: number }>): { label: string; members: string[] }[] {
    const names = new Set([...live.keys(), ...counters.origins.keys()]);
    const score = (o: string) => (live.get(o)?.clients ?? 0) * 1e9 + (counters.origins.get(o)?.connections ?? 0);
    const ranked = [...names].sort((a, b) => score(b) - score(a));
    const own = ranked.slice(0, options.maxOriginSeries).filter((o) => o !== OTHER_ORIGIN);
    const rest = ranked.filter((o) => !own.includes(o));
    const series = own.map((o) => ({ label: o, members: [o] }));
    if (rest.length > 0) series.push({ label: OTHER_ORIGIN, members: rest });
    return series;
  }

  // ------------------------------------------------------------ lifecycle

  const server: Server<Conn> = Bun.serve<Conn>({
    port: options.port,
    hostname: options.hostname,
    tls: options.tls ? { cert: Bun.file(options.tls.certFile), key: Bun.file(options.tls.keyFile) } : undefined,
    fetch,
    error(err) {
      log.error("http_error", { message: String(err) });
      return text("Internal error\n", "text/plain", 500);
    },
    websocket: {
      // Bun's own limits sit above ours so that ours act first with a clear
      // code: frames up to 4x the limit get `message_too_large` + 1009 from us
      // (bigger ones Bun cuts off with a bare 1009); and Bun would silently
      // drop sends past its backpressure limit, so it must never be reached.
      maxPayloadLength: options.maxMessageBytes * 4,
      backpressureLimit: options.backpressureLimitBytes + 8 * options.maxMessageBytes,
      closeOnBackpressureLimit: false,
      // Liveness is the heartbeat sweep's job (see above).
      idleTimeout: 0,
      sendPings: false,
      open: onOpen,
      message: onFrame,
      close: onClose,
      pong(ws) {
        ws.data.lastSeenMs = Date.now();
      },
    },
  });

  const port = server.port ?? options.port;
  const scheme = options.tls ? "https" : "http";
  log.info("start", {
    port,
    instance: instanceId,
    region,
    version: VERSION,
    maxMessageBytes: options.maxMessageBytes,
    rateLimitPerSec: options.rateLimitPerSec,
    backpressureLimitBytes: options.backpressureLimitBytes,
    hostGraceMs: options.hostGraceMs,
    drainTimeoutMs: options.drainTimeoutMs,
  });

  function drain(): Promise<void> {
    drainPromise ??= new Promise<void>((resolve) => {
      draining = true;
      log.info("drain_start", { rooms: rooms.size });
      drained = () => {
        clearTimeout(drainTimer);
        log.info("drain_end", { rooms: rooms.size });
        resolve();
      };
      if (rooms.size === 0) return drained();
      if (handoffEnabled) void handOffAll();
      if (options.drainTimeoutMs > 0) {
        drainTimer = setTimeout(() => {
          for (const room of [...rooms.values()]) closeRoom(room, "drain_timeout", "shutdown");
        }, options.drainTimeoutMs);
      }
    });
    return drainPromise;
  }

  async function stop(): Promise<void> {
    clearInterval(heartbeat);
    clearTimeout(drainTimer);
    for (const room of rooms.values()) clearTimeout(room.hostGraceTimer);
    await server.stop(true);
  }

  return {
    url: `${scheme}://127.0.0.1:${port}`,
    wsUrl: `${scheme === "https" ? "wss" : "ws"}://127.0.0.1:${port}`,
    port,
    instanceId,
    region,
    stats,
    drain,
    stop,
  };
}

// ================================================================ run directly

if (import.meta.main) {
  const relay = startRelay(optionsFromEnv());
  const shutdown = async () => {
    await relay.drain();
    await relay.stop();
    process.exit(0);
  };
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);
}
