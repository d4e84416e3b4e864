// The party-sockets browser client, served by the relay as `GET /client.js`.
//
// One dependency-free ES module: the relay transpiles this file with Bun.Transpiler and serves
// it as is, so it may import *types* only (erased) and must not use enums or namespaces.
//
//   const room = await createRoom("https://relay.example", { maxClients: 8 });   // the TV
//   const room = await joinRoom("https://relay.example", code);                    // a phone
//   room.addEventListener("message", (e) => e.detail.from /* slot */, e.detail.data);
//
// What it adds over a bare WebSocket, and why (SPEC §8):
// - Reconnect with capped exponential backoff and full jitter on every attempt (a relay restart
//   must not bring every phone back in the same millisecond), pinned to the machine that holds
//   the room (`/<code>?instance=<id>`; the anycast address may land elsewhere), rejoining with the
//   same clientId so the slot, `peers` and `state` come back.
// - Terminal closes are never retried: 4000 "replaced" (another tab/device took the slot:
//   retrying would start a replace ping-pong), 4001 "room closed", 4004 "kicked" (the host
//   removed us; also when a rejoin is answered `kicked`), `leave()`, and `room_not_found` on a
//   rejoin (reported as `closed` 4001 "room not found").
// - Sends made while offline are queued (bounded in count and age) and flushed after the rejoin.
// - An application-level ping (browsers cannot send WebSocket pings) notices a dead link that
//   the browser has not noticed (phones switching networks keep a half-open TCP connection for
//   minutes); `online` and the page becoming visible again trigger an immediate check.
// - Lossless reconnect: frames may carry a per-room `seq`; the client remembers the
//   last one, sends it as `join.resume` on every rejoin, and drops any frame it has already seen.
// - Deploys: a relay that hands its room to a peer answers sends with `moving` while the room is
//   in flight, then sends `moved` and closes 4005. The refused sends go back to the front of the
//   queue, and the client follows at once (no backoff) to `/<code>?instance=<peer>` with resume.
// - Lossless sends, the other way: every `send`/`setState` carries `n`, this Room's own counter;
//   a frame is kept until the relay's `received` (on `pong` and `joined`) covers it, and what a
//   dead link swallowed is resent after the rejoin, where the relay drops what it already had.

import type {
  CLOSES,
  ClientMessage,
  CreateMessage,
  CreatedMessage,
  ErrorCode,
  JoinMessage,
  JoinedMessage,
  SendMessage,
  ServerMessage,
} from "./protocol.ts";

// ------------------------------------------------------------------------------- options

/** Every timing and bound of the client; all optional, defaults in `CLIENT_DEFAULTS`. */
export interface ClientTimings {
  /** Budget for one connection attempt: socket open + `created`/`joined` reply. */
  connectTimeoutMs: number;
  /** Ceiling of the first retry wait; each further attempt doubles the ceiling... */
  retryInitialMs: number;
  /** ...up to this cap. The actual wait is uniform in [0, ceiling) ("full jitter"). */
  retryMaxMs: number;
  /** A connection that stayed up this long resets the attempt count to 1. */
  retryResetMs: number;
  /** How often to send `{"type":"ping"}` while connected. */
  pingIntervalMs: number;
  /** With a ping outstanding, this long without receiving any frame means the link is dead. */
  pongTimeoutMs: number;
  /** Sends queued while offline, with those a dead link left unconfirmed: at most this many (past it the oldest is dropped)... */
  queueMaxMessages: number;
  /** ...and none older than this when the queue is flushed (older ones are dropped). */
  queueMaxAgeMs: number;
}

export const CLIENT_DEFAULTS: Readonly<ClientTimings> = Object.freeze({
  // A phone on a slow cellular link needs 1-3 s for TCP + TLS + reply; past 6 s a new attempt
  // (maybe on the new network) is likelier to succeed than waiting.
  connectTimeoutMs: 6000,
  // Ceilings 300, 600, 1200, 2400, 4800, then 5000 ms: the first retry is fast (a blip costs
  // ~150 ms on average), a long outage is retried every 2.5 s on average and never waits > 5 s.
  retryInitialMs: 300,
  retryMaxMs: 5000,
  retryResetMs: 5000,
  // A dead link is noticed 3-6 s after it died (one interval + one timeout at most).
  pingIntervalMs: 3000,
  pongTimeoutMs: 3000,
  // 100 messages in 10 s covers a player tapping through a few seconds of outage (at 20 Hz: 5 s
  // of sends, counted from the last confirmed one); a longer outage makes old inputs meaningless
  // to a live game, so they are dropped, not replayed.
  queueMaxMessages: 100,
  queueMaxAgeMs: 10_000,
});

/** Where the per-room clientId is kept: a Storage-like object (tests inject one). */
export interface ClientIdStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface CommonOptions extends Partial<ClientTimings> {
  /** The slot's bearer secret. Default: random, kept per room code in `storage`. */
  clientId?: string;
  /**
   * "session" (default): sessionStorage, so a reload of the tab reclaims the slot while two tabs
   * stay two players. "local": localStorage, survives closing the tab. "none": not kept.
   * Or any object with getItem/setItem/removeItem.
   */
  storage?: "session" | "local" | "none" | ClientIdStore;
  /** Random source in [0, 1) for the retry jitter (tests inject a fixed one). */
  random?: () => number;
  /** Receives `online` (default: `window` when there is one). */
  windowTarget?: EventTarget;
  /** Receives `visibilitychange` and has `visibilityState` (default: `document`). */
  documentTarget?: EventTarget & { readonly visibilityState?: string };
}

export interface CreateRoomOptions extends CommonOptions {
  maxClients: number;
  /** Controller-page template: absolute https URL with `{room}` / `{instance}` placeholders. */
  url?: string;
}

export type JoinRoomOptions = CommonOptions;

// -------------------------------------------------------------------------------- events

/** Error codes the client raises itself, besides the relay's `ErrorCode`s. */
export type ClientErrorCode =
  | "connect_failed" // the socket closed before `created`/`joined` (detail in the message)
  | "connect_timeout" // no `created`/`joined` within connectTimeoutMs
  | "queue_overflow" // an offline send pushed out the oldest queued one
  | "queue_expired" // queued sends older than queueMaxAgeMs were dropped at flush time
  | "unconfirmed_dropped"; // sends a dead link left unconfirmed were past the queue's bounds: not resent, may or may not have arrived

export type RoomErrorCode = ErrorCode | ClientErrorCode;

/** The `detail` of each event a `Room` dispatches (wire fields where the wire has them). */
export interface RoomEventDetails {
  message: { from: number; data: unknown; seq?: number };
  peer_joined: { index: number };
  peer_left: { index: number };
  /** The host's snapshot: on every `setState`, right after a join, and after a rejoin. */
  state: { data: unknown; seq?: number };
  /** A retry is scheduled in `delayMs`; `cause` says what ended the previous connection. */
  reconnecting: { attempt: number; delayMs: number; cause: string };
  /** Rejoined the same slot; `resumed` is the relay's answer to `resume` when it gave one. */
  reconnected: { resumed?: boolean };
  error: { code: RoomErrorCode; message: string; missing?: number[]; dropped?: number };
  /** Terminal: no more events, no more retries. */
  closed: { code: number; reason: string };
}

export type RoomEventType = keyof RoomEventDetails;
export type RoomEventMap = { [K in RoomEventType]: CustomEvent<RoomEventDetails[K]> };
export type RoomStatus = "connected" | "reconnecting" | "closed";

/** A rejected createRoom/joinRoom: `code` is the relay's error code or a `ClientErrorCode`. */
export class RoomError extends Error {
  readonly code: RoomErrorCode;
  constructor(code: RoomErrorCode, message: string) {
    super(message);
    this.name = "RoomError";
    this.code = code;
  }
}

// --------------------------------------------------------------------------- close codes

// Typed against protocol.ts's CLOSES table: a change there fails the type-check here.
const CLOSE_REPLACED: (typeof CLOSES)["replaced"]["code"] = 4000;
const CLOSE_ROOM_CLOSED: (typeof CLOSES)["roomClosed"]["code"] = 4001;
const CLOSE_KICKED: (typeof CLOSES)["kicked"]["code"] = 4004;
const KICKED_REASON: (typeof CLOSES)["kicked"]["reason"] = "kicked";
const CLOSE_MOVED: (typeof CLOSES)["moved"]["code"] = 4005;
/**
 * A room still `moving` this long after its refused sends were counted may have stayed where it
 * was (no peer took it): they are sent again (if it is still moving, they come back as `moving`).
 * A hand-off takes milliseconds on a region's private network; one second costs little either way.
 */
const MOVING_RETRY_MS = 1000;
/** What `closed` reports after `leave()` (the relay sends `left`, the client closes normally). */
const CLOSE_LEFT = 1000;

/** Closes after which a reconnect cannot help. Everything else (1001, 1006, 1008, 1009, 4002,
 *  4003, a failed heartbeat) is retried. */
function isTerminalClose(code: number): boolean {
  return code === CLOSE_REPLACED || code === CLOSE_ROOM_CLOSED || code === CLOSE_KICKED;
}

/** Join errors after which this clientId is of no more use for the code: it is forgotten. */
function isForgotten(code: RoomErrorCode): boolean {
  return code === "room_not_found" || code === "kicked";
}

// ------------------------------------------------------------------------------- helpers

/** The wait before retry `attempt` (1-based): uniform in [0, min(max, initial × 2^(attempt-1))). */
export function retryDelayMs(
  attempt: number,
  timings: Pick<ClientTimings, "retryInitialMs" | "retryMaxMs">,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(timings.retryMaxMs, timings.retryInitialMs * 2 ** Math.max(0, attempt - 1));
  return Math.floor(random() * ceiling);
}

/** ws(s):// or http(s):// (absolute, or relative to the page) → a ws(s) base ending in "/". */
function socketBase(relayUrl: string): URL {
  const href = (globalThis as { location?: { href?: string } }).location?.href;
  const base = new URL(relayUrl, href);
  if (base.protocol === "http:") base.protocol = "ws:";
  else if (base.protocol === "https:") base.protocol = "wss:";
  else if (base.protocol !== "ws:" && base.protocol !== "wss:") {
    throw new TypeError(`relayUrl must be ws(s):// or http(s)://, got ${relayUrl}`);
  }
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  base.search = "";
  base.hash = "";
  return base;
}

/** `/<code>` routes a fresh join to the room's region; `?instance=` pins a rejoin to its machine. */
function roomSocketUrl(base: URL, code: string, instance?: string): string {
  const url = new URL(encodeURIComponent(code), base);
  if (instance) url.searchParams.set("instance", instance);
  return url.href;
}

/** 128 random bits. getRandomValues, not randomUUID: the latter needs a secure context, and
 *  phones on a LAN dev server (http://192.168.x.y) are not one. */
function randomClientId(): string {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const STORAGE_PREFIX = "party-sockets:clientId:";

/** The chosen store, or null. Web storage can throw (disabled cookies, sandboxed iframes). */
/** Browsers run a timer of more than 2^31 - 1 ms (or Infinity, or NaN) at once: never what was meant. */
const MAX_TIMER_MS = 2 ** 31 - 1;

function checkedTiming(key: keyof ClientTimings, value: unknown): number {
  if (typeof value !== "number") throw new TypeError(`${key} must be a number`);
  const isCount = key === "queueMaxMessages";
  const valid = isCount ? Number.isSafeInteger(value) && value >= 0 : value >= 0 && value <= MAX_TIMER_MS;
  if (!valid) throw new RangeError(`${key} must be ${isCount ? "a whole number >= 0" : `from 0 to ${MAX_TIMER_MS} ms`}, got ${value}`);
  return value;
}

function pickStore(choice: CommonOptions["storage"]): ClientIdStore | null {
  if (choice && typeof choice === "object") return choice;
  if (choice === "none") return null;
  try {
    const g = globalThis as { localStorage?: ClientIdStore; sessionStorage?: ClientIdStore };
    return (choice === "local" ? g.localStorage : g.sessionStorage) ?? null;
  } catch {
    return null;
  }
}

function storeGet(store: ClientIdStore | null, code: string): string | null {
  try {
    return store?.getItem(STORAGE_PREFIX + code) ?? null;
  } catch {
    return null;
  }
}
function storeSet(store: ClientIdStore | null, code: string, clientId: string): void {
  try {
    store?.setItem(STORAGE_PREFIX + code, clientId);
  } catch {
    /* full or disabled: the slot just won't survive a reload */
  }
}
/** Forgets `clientId` for `code`, unless a newer Room for the same code has stored its own since. */
function storeRemove(store: ClientIdStore | null, code: string, clientId: string): void {
  try {
    if (store?.getItem(STORAGE_PREFIX + code) === clientId) store.removeItem(STORAGE_PREFIX + code);
  } catch {
    /* as above */
  }
}

function defaultWindow(): EventTarget | undefined {
  const w = (globalThis as { window?: EventTarget }).window;
  return w && typeof w.addEventListener === "function" ? w : undefined;
}
function defaultDocument(): CommonOptions["documentTarget"] {
  const d = (globalThis as { document?: CommonOptions["documentTarget"] }).document;
  return d && typeof d.addEventListener === "function" ? d : undefined;
}

// ---------------------------------------------------------------------------------- room

/**
 * With this share of queueMaxMessages sent and unconfirmed, the client pings at once instead of
 * waiting for the heartbeat, so the relay's `received` comes back sooner. Without it, a link that
 * dies leaves interval + timeout (6 s) of sends unconfirmed when it is noticed: at 20 Hz 120
 * frames, past the 100 the queue keeps. With it: 25 + 3 s × 20 = 85, and room for the rejoin.
 */
const CONFIRM_AT_QUEUE_SHARE = 1 / 4;

/** Module-private: only createRoom/joinRoom start a Room. */
const START = Symbol("start");

/** Monotonic where available: a wall-clock jump must not expire the queue or fake a timeout. */
const nowMs: () => number =
  typeof performance !== "undefined" && typeof performance.now === "function" ? () => performance.now() : () => Date.now();

type Phase =
  | "handshake" // socket opening or first frame sent, waiting for created/joined
  | "connected" // joined: sends go straight out
  | "waiting" // between attempts (backoff timer running)
  | "leaving" // `leave` sent, waiting for `left` (or 4001 for the host)
  | "closed"; // terminal

interface Pending {
  resolve(room: Room): void;
  reject(error: RoomError): void;
}

interface Queued {
  frame: string;
  atMs: number;
  /**
   * A `set_state` or `close_room`: never dropped by the queue's bounds, since the host's
   * `room.state` (or the room's end) already counts on it. A newer `set_state` replaces an older one.
   */
  kind?: "set_state" | "close_room";
  /** The frame's `n` (lossless sends), when the relay numbers. */
  n?: number;
  /** Went out on a connection that died before the relay confirmed it: it may have arrived. */
  unconfirmed?: boolean;
}

/** A member's view of one room. Create with `createRoom` / `joinRoom`. */
export class Room extends EventTarget {
  /** The 6-character room code (known once `created`/`joined` arrived). */
  code = "";
  /** This member's slot; the host is 0. */
  index = -1;
  /** The other present slots, ascending; kept current by peer events and by each rejoin. */
  peers: number[] = [];
  /** The relay machine holding the room; reconnects are pinned to it. */
  instance = "";
  region = "";
  /** The filled controller-page URL when the host gave a template. */
  url: string | undefined = undefined;
  /** The latest host snapshot (`setState` on the host, `state` events elsewhere); null if none. */
  state: unknown = null;
  /** Last measured round trip of a ping, ms (NaN until the first pong). */
  rttMs = Number.NaN;
  /** Estimated server clock minus local clock, ms (from the last pong). */
  serverTimeOffsetMs = 0;

  readonly #timings: ClientTimings;
  readonly #random: () => number;
  readonly #store: ClientIdStore | null;
  readonly #storeClientId: boolean;
  readonly #base: URL;
  readonly #clientId: string;
  readonly #windowTarget: EventTarget | undefined;
  readonly #documentTarget: CommonOptions["documentTarget"];

  #phase: Phase = "handshake";
  #ws: WebSocket | null = null;
  #pending: Pending | null = null;
  #attempt = 0;
  #joinedAtMs = -1;
  /** Frames waiting for a connection, oldest first: after a loss, the unconfirmed ones lead. */
  #queue: Queued[] = [];
  /** Numbered frames sent on the current connection that no `received` covers yet, oldest first. */
  #unconfirmed: Queued[] = [];
  /** Lossless sends: whether the relay numbers (its `created`/`joined` carry `seq`). */
  #numbering = false;
  /** The last `n` given to a frame; the relay's `received` can only raise it. */
  #lastN = 0;
  /** The last `n` sent on the current connection, and its value when the outstanding ping went out. */
  #lastSentN = 0;
  #pingCoversN = 0;
  /** Highest `seq` delivered to the game (undefined: the relay does not number frames). */
  #lastSeq: number | undefined = undefined;
  /** Right after a `joined` that did not resume: the `state` replay is a snapshot, whatever its seq. */
  #snapshotNext = false;
  #lastReceivedMs = 0;
  #pingId = 0;
  #pingSentMs = 0;
  #pingOutstanding = false;
  #connectTimer: ReturnType<typeof setTimeout> | undefined;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #pingTimer: ReturnType<typeof setInterval> | undefined;
  #pongTimer: ReturnType<typeof setTimeout> | undefined;
  #leaveDone: (() => void) | null = null;
  /** The room is moving: sends queue until it moved (or stayed). */
  #held = false;
  /** The ping after the first `moving`: once it is answered, every refusal before it has arrived. */
  #movingBarrier: string | undefined = undefined;
  #movingRetryTimer: ReturnType<typeof setTimeout> | undefined;

  /** Use createRoom / joinRoom. `storedClientId`: the one kept for this room code, if any. */
  constructor(relayUrl: string, options: CommonOptions, storedClientId?: string) {
    super();
    const timings = { ...CLIENT_DEFAULTS };
    for (const key of Object.keys(CLIENT_DEFAULTS) as (keyof ClientTimings)[]) {
      const value = options[key];
      if (value !== undefined) timings[key] = checkedTiming(key, value);
    }
    this.#timings = timings;
    this.#random = options.random ?? Math.random;
    this.#store = pickStore(options.storage);
    this.#storeClientId = options.clientId === undefined;
    this.#base = socketBase(relayUrl);
    this.#clientId = options.clientId ?? storedClientId ?? randomClientId();
    this.#windowTarget = options.windowTarget ?? defaultWindow();
    this.#documentTarget = options.documentTarget ?? defaultDocument();
  }

  /** "connected", "reconnecting" (offline, sends are queued) or "closed" (terminal). */
  get status(): RoomStatus {
    if (this.#phase === "closed") return "closed";
    return this.#phase === "connected" || this.#phase === "leaving" ? "connected" : "reconnecting";
  }

  /** Sends queued while offline, waiting for the rejoin (not counting resends of unconfirmed ones). */
  get queuedCount(): number {
    return this.#queue.filter((q) => !q.unconfirmed).length;
  }

  // ----------------------------------------------------------------- typed events

  override addEventListener<K extends RoomEventType>(
    type: K,
    listener: (this: Room, event: RoomEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  override addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  override addEventListener(type: string, listener: never, options?: boolean | AddEventListenerOptions): void {
    super.addEventListener(type, listener, options);
  }

  override removeEventListener<K extends RoomEventType>(
    type: K,
    listener: (this: Room, event: RoomEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  override removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
  override removeEventListener(type: string, listener: never, options?: boolean | EventListenerOptions): void {
    super.removeEventListener(type, listener, options);
  }

  #emit<K extends RoomEventType>(type: K, detail: RoomEventDetails[K]): void {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ----------------------------------------------------------------- public API

  /**
   * Relay `data` to every other present member, or to slot `to`, or to the listed slots.
   * Offline: queued (see queueMaxMessages / queueMaxAgeMs). Returns false once the room is
   * closed, and offline when queueMaxMessages is 0 (the send is dropped with a queue_overflow error).
   */
  send(data: unknown, to?: number | number[]): boolean {
    // Field order is wire order: `n` right before `data` is the shape the relay's fast path reads.
    const frame: SendMessage = to === undefined ? { type: "send", n: undefined, data } : { type: "send", to, n: undefined, data };
    return this.#sendOrQueue(frame);
  }

  /** Host only: replace the snapshot the relay replays to every (re)joining member. */
  setState(data: unknown): boolean {
    if (this.#phase === "closed") return false;
    this.state = data;
    return this.#sendOrQueue({ type: "set_state", n: undefined, data });
  }

  /** Host only: end the room for everyone (each member, this one too, gets `closed` 4001). */
  closeRoom(): boolean {
    return this.#sendOrQueue({ type: "close_room" });
  }

  /**
   * Host only: remove the member in slot `index` for the room's life (it gets `closed` 4004
   * "kicked", the others `peer_left`). The relay answers a bad `index` with an `error` event
   * `target_not_found`, a non-host with `not_host`.
   */
  kick(index: number): boolean {
    return this.#sendOrQueue({ type: "kick", index });
  }

  /**
   * Leave for good: the slot is released and this clientId forgets the room. Resolves once the
   * relay confirmed (or at once when offline: then only this side stops; the relay keeps the
   * slot vacant until the room ends). A host's leave closes the room (`closed` 4001).
   */
  leave(): Promise<void> {
    if (this.#phase === "closed") return Promise.resolve();
    if (this.#phase === "leaving") return new Promise((resolve) => this.addEventListener("closed", () => resolve()));
    const ws = this.#ws;
    if (this.#phase !== "connected" || !ws || ws.readyState !== WebSocket.OPEN) {
      this.#end(CLOSE_LEFT, "left");
      return Promise.resolve();
    }
    this.#phase = "leaving";
    this.#stopHeartbeat();
    ws.send(JSON.stringify({ type: "leave" } satisfies ClientMessage));
    return new Promise((resolve) => {
      this.#leaveDone = resolve;
      // A relay that never answers must not leave the caller hanging.
      this.#connectTimer = setTimeout(() => this.#end(CLOSE_LEFT, "left"), this.#timings.connectTimeoutMs);
    });
  }

  // ----------------------------------------------------------------- lifecycle

  /** First connection (createRoom/joinRoom only); settles once created/joined or an error arrives. */
  [START](first: (clientId: string) => CreateMessage | JoinMessage): Promise<Room> {
    const frame = first(this.#clientId);
    if (frame.type === "join") {
      this.code = frame.room;
      // Stored before connecting: a reload during the join must come back as the same player.
      if (this.#storeClientId) storeSet(this.#store, frame.room, this.#clientId);
    }
    return new Promise((resolve, reject) => {
      this.#pending = { resolve, reject };
      this.#connect(frame.type === "join" ? roomSocketUrl(this.#base, frame.room) : this.#base.href, frame);
    });
  }

  #connect(url: string, first: ClientMessage): void {
    this.#phase = "handshake";
    this.#held = false;
    this.#movingBarrier = undefined;
    let ws: WebSocket;
    try {
      ws = new WebSocket(url);
    } catch (error) {
      this.#connectionLost(`connect_failed: ${(error as Error).message}`);
      return;
    }
    this.#ws = ws;
    this.#connectTimer = setTimeout(() => {
      if (ws === this.#ws) this.#connectionLost("connect_timeout");
    }, this.#timings.connectTimeoutMs);
    ws.onopen = () => {
      if (ws === this.#ws) ws.send(JSON.stringify(first));
    };
    ws.onmessage = (event: MessageEvent) => {
      if (ws === this.#ws && typeof event.data === "string") this.#onFrame(event.data);
    };
    ws.onclose = (event: CloseEvent) => {
      if (ws === this.#ws) this.#onClose(event.code, event.reason);
    };
  }

  /** Forget the current socket (its late events are ignored) and close it. */
  #dropSocket(): void {
    const ws = this.#ws;
    this.#ws = null;
    clearTimeout(this.#connectTimer);
    clearTimeout(this.#movingRetryTimer);
    this.#stopHeartbeat();
    if (ws && ws.readyState !== WebSocket.CLOSED) {
      try {
        ws.close(1000);
      } catch {
        /* already closing */
      }
    }
  }

  #onClose(code: number, reason: string): void {
    this.#ws = null;
    clearTimeout(this.#connectTimer);
    clearTimeout(this.#movingRetryTimer);
    this.#stopHeartbeat();
    if (this.#pending) {
      this.#fail("connect_failed", `the relay closed the connection (${code}${reason ? ` ${reason}` : ""})`);
    } else if (this.#phase === "leaving") {
      // The host's leave closes the room: the relay answers with 4001 instead of `left`.
      this.#end(code === CLOSE_ROOM_CLOSED ? code : CLOSE_LEFT, code === CLOSE_ROOM_CLOSED ? reason : "left");
    } else if (isTerminalClose(code)) {
      this.#end(code, reason);
    } else if (code === CLOSE_MOVED) {
      this.#followMove();
    } else {
      this.#connectionLost(`close ${code}${reason ? ` ${reason}` : ""}`);
    }
  }

  /** The connection is gone but the slot is not: reject a first attempt, else retry. */
  #connectionLost(cause: string): void {
    this.#dropSocket();
    this.#requeueUnconfirmed();
    if (this.#pending) {
      const code: ClientErrorCode = cause === "connect_timeout" ? "connect_timeout" : "connect_failed";
      this.#fail(code, cause === code ? "no reply from the relay in time" : cause);
      return;
    }
    if (this.#phase === "closed" || this.#phase === "waiting") return;
    if (this.#joinedAtMs >= 0 && nowMs() - this.#joinedAtMs >= this.#timings.retryResetMs) this.#attempt = 0;
    this.#joinedAtMs = -1;
    this.#attempt += 1;
    const delayMs = retryDelayMs(this.#attempt, this.#timings, this.#random);
    this.#phase = "waiting";
    this.#addLifecycleListeners();
    this.#retryTimer = setTimeout(() => this.#rejoin(), delayMs);
    this.#emit("reconnecting", { attempt: this.#attempt, delayMs, cause });
  }

  /** 4005: the room lives on `instance` now (set by `moved`); go there at once, no backoff. */
  #followMove(): void {
    // Sends refused with `moving` are unconfirmed: they go out again on the peer, above `joined.received`.
    this.#requeueUnconfirmed();
    this.#joinedAtMs = -1;
    this.#phase = "waiting";
    this.#emit("reconnecting", { attempt: this.#attempt, delayMs: 0, cause: "moved" });
    this.#rejoin();
  }

  #rejoin(): void {
    clearTimeout(this.#retryTimer);
    if (this.#phase !== "waiting") return;
    const join: JoinMessage = { type: "join", clientId: this.#clientId, room: this.code };
    if (this.#lastSeq !== undefined) join.resume = this.#lastSeq;
    this.#connect(roomSocketUrl(this.#base, this.code, this.instance), join);
  }

  /** First attempt failed: reject createRoom/joinRoom, release everything, no events. */
  #fail(code: RoomErrorCode, message: string): void {
    const pending = this.#pending;
    this.#pending = null;
    this.#dropSocket();
    this.#phase = "closed";
    if (isForgotten(code) && this.#storeClientId) storeRemove(this.#store, this.code, this.#clientId);
    pending?.reject(new RoomError(code, message));
  }

  /** Terminal: stop everything and tell the game once. */
  #end(code: number, reason: string): void {
    if (this.#phase === "closed") return;
    this.#phase = "closed";
    this.#dropSocket();
    clearTimeout(this.#retryTimer);
    this.#removeLifecycleListeners();
    this.#queue = [];
    this.#unconfirmed = [];
    // 4000: another tab/device now owns the slot with this clientId; it stays stored for it.
    if (code !== CLOSE_REPLACED && this.#storeClientId && this.code) storeRemove(this.#store, this.code, this.#clientId);
    this.#emit("closed", { code, reason });
    const done = this.#leaveDone;
    this.#leaveDone = null;
    done?.();
  }

  // ----------------------------------------------------------------- frames in

  #onFrame(text: string): void {
    this.#lastReceivedMs = nowMs();
    let msg: ServerMessage;
    try {
      msg = JSON.parse(text) as ServerMessage;
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (this.#phase === "handshake") return this.#onHandshakeFrame(msg);
    const snapshot = this.#snapshotNext && msg.type === "state";
    this.#snapshotNext = false;
    switch (msg.type) {
      case "message":
        if (this.#isDuplicate(msg)) return;
        this.#emit("message", withSeq({ from: msg.from, data: msg.data }, msg));
        return;
      case "state":
        if (!snapshot && this.#isDuplicate(msg)) return;
        this.state = msg.data;
        this.#emit("state", withSeq({ data: msg.data }, msg));
        return;
      case "peer_joined":
        if (!this.peers.includes(msg.index)) this.peers = [...this.peers, msg.index].sort((a, b) => a - b);
        this.#emit("peer_joined", { index: msg.index });
        return;
      case "peer_left":
        this.peers = this.peers.filter((index) => index !== msg.index);
        this.#emit("peer_left", { index: msg.index });
        return;
      case "pong":
        if (this.#movingBarrier !== undefined && msg.id === this.#movingBarrier) return this.#onMovingBarrier(msg.received);
        return this.#onPong(msg.id, msg.t, msg.received);
      case "moved":
        if (typeof msg.instance === "string" && msg.instance) this.instance = msg.instance;
        return;
      case "left":
        return this.#end(CLOSE_LEFT, "left");
      case "error": {
        // The limit may have dropped our ping; this frame proves the link, so ping afresh later.
        if (msg.code === "rate_limited") this.#pingOutstanding = false;
        // Not a failure: the send goes out again after the move.
        if (msg.code === "moving") return this.#onMoving();
        const detail: RoomEventDetails["error"] = { code: msg.code, message: msg.message };
        if (Array.isArray(msg.missing)) detail.missing = msg.missing;
        this.#emit("error", detail);
        if (this.#phase === "leaving" && msg.code === "not_in_room") this.#end(CLOSE_LEFT, "left");
        return;
      }
      default:
        return; // created/joined twice, or a type from a newer relay: ignore
    }
  }

  #onHandshakeFrame(msg: ServerMessage): void {
    if (msg.type === "created" || msg.type === "joined") return this.#onJoined(msg);
    if (msg.type !== "error") return;
    if (this.#pending) return this.#fail(msg.code, msg.message);
    if (msg.code === "room_not_found") return this.#end(CLOSE_ROOM_CLOSED, "room not found");
    // Kicked while away (the host kicked our vacant slot): the same end as the 4004 close.
    if (msg.code === "kicked") return this.#end(CLOSE_KICKED, KICKED_REASON);
    // e.g. room_full (our vacant slot is past the cap until someone leaves): tell and retry.
    // `moving`: the room is between machines; the retry finds it where it lands.
    if (msg.code !== "moving") this.#emit("error", { code: msg.code, message: msg.message });
    this.#connectionLost(msg.code);
  }

  #onJoined(msg: CreatedMessage | JoinedMessage): void {
    clearTimeout(this.#connectTimer);
    const first = this.#pending;
    const previousPeers = this.peers;
    this.code = msg.room;
    this.index = msg.index;
    this.instance = msg.instance;
    this.region = msg.region;
    this.url = msg.url;
    this.peers = msg.type === "joined" ? [...msg.peers].sort((a, b) => a - b) : [];
    const resumed = msg.type === "joined" && typeof msg.resumed === "boolean" ? msg.resumed : undefined;
    this.#trackSeq(msg, resumed);
    const received = msg.type === "joined" && typeof msg.received === "number" ? msg.received : 0;
    this.#numbering = typeof (msg as { seq?: unknown }).seq === "number";
    // A reload reclaiming the slot starts a new counter: it must go on above what the slot sent.
    this.#lastN = Math.max(this.#lastN, received);
    this.#lastSentN = 0;
    // The host is the authority on state: after its own reconnect the relay's snapshot is at best
    // what it holds and at worst older than a set_state it just flushed from its queue. Without
    // the snapshot flag that frame is an old seq, dropped as a duplicate.
    if (!first && this.index === 0) this.#snapshotNext = false;
    this.#phase = "connected";
    this.#joinedAtMs = nowMs();
    this.#startHeartbeat();
    if (first) {
      this.#pending = null;
      // A create learns its code only now; a join stored its clientId before connecting.
      if (this.#storeClientId) storeSet(this.#store, this.code, this.#clientId);
      this.#addLifecycleListeners();
      first.resolve(this);
      return;
    }
    // The queue goes out first, so whatever listeners send below stays behind it.
    this.#flushQueue(received);
    // Peers that came or went while we were away, as if we had seen it happen.
    for (const index of previousPeers) if (!this.peers.includes(index)) this.#emit("peer_left", { index });
    for (const index of this.peers) if (!previousPeers.includes(index)) this.#emit("peer_joined", { index });
    this.#emit("reconnected", resumed === undefined ? {} : { resumed });
  }

  /**
   * Lossless reconnect. `resumed: true`: every missed frame follows, numbered after the
   * last one we delivered, so `lastSeq` stands. Otherwise (a first join, or a ring that no longer
   * reached back): we start at the room's current `seq` (`created` says 0), and the `state`
   * replay that follows is a snapshot to deliver whatever its number. A relay without `seq`
   * leaves all of this off, and rejoins carry no `resume`.
   */
  #trackSeq(msg: CreatedMessage | JoinedMessage, resumed: boolean | undefined): void {
    this.#snapshotNext = false;
    if (resumed === true) return;
    const seq = (msg as { seq?: unknown }).seq;
    if (typeof seq !== "number") return;
    this.#lastSeq = seq;
    this.#snapshotNext = true;
  }

  /** Exactly once with the relay's `seq`: a frame at or below the last delivered seq was delivered. */
  #isDuplicate(msg: object): boolean {
    const seq = (msg as { seq?: unknown }).seq;
    if (typeof seq !== "number") return false;
    if (this.#lastSeq !== undefined && seq <= this.#lastSeq) return true;
    this.#lastSeq = seq;
    return false;
  }

  // ----------------------------------------------------------------- moving rooms

  /**
   * The relay refused a frame because the room is being handed to another machine, and it
   * refuses every later one until the move ends. Sends now queue; a ping marks the end of what
   * was sent, so its pong's `received` tells which of the frames before it were accepted.
   */
  #onMoving(): void {
    if (this.#held) return;
    this.#held = true;
    this.#movingBarrier = `moving-${nowMs()}`;
    this.#ws?.send(JSON.stringify({ type: "ping", id: this.#movingBarrier } satisfies ClientMessage));
  }

  /** Everything sent before the barrier was handled: what `received` does not cover was refused, and goes back to the front of the queue. */
  #onMovingBarrier(received: number | undefined): void {
    this.#movingBarrier = undefined;
    this.#confirm(received ?? 0);
    this.#requeueUnconfirmed();
    // No `moved` yet: the room may have stayed (no peer took it). Try again, in order.
    this.#movingRetryTimer = setTimeout(() => {
      this.#held = false;
      this.#flushQueue(received ?? 0);
    }, MOVING_RETRY_MS);
  }

  // ----------------------------------------------------------------- frames out

  #sendOrQueue(frame: ClientMessage): boolean {
    if (this.#phase === "closed" || this.#phase === "leaving") return false;
    const kind = frame.type === "set_state" || frame.type === "close_room" ? frame.type : undefined;
    // Assigned in place, so `n` keeps the position the caller gave it (undefined: not on the wire).
    if ("n" in frame && this.#numbering) frame.n = ++this.#lastN;
    const queued: Queued = { frame: JSON.stringify(frame), atMs: nowMs(), kind, n: "n" in frame ? frame.n : undefined };
    if (kind === "set_state") {
      this.#queue = this.#queue.filter((q) => q.kind !== "set_state");
      this.#unconfirmed = this.#unconfirmed.filter((q) => q.kind !== "set_state");
    }
    const ws = this.#ws;
    // While anything is queued, new sends queue behind it: order is per sender, always.
    if (this.#phase === "connected" && ws && ws.readyState === WebSocket.OPEN && this.#queue.length === 0 && !this.#held) {
      this.#transmit(ws, queued);
      return true;
    }
    this.#dropExpired();
    if (!kind && this.#timings.queueMaxMessages === 0) {
      this.#emit("error", { code: "queue_overflow", message: "offline queue disabled (queueMaxMessages: 0): dropped", dropped: 1 });
      return false;
    }
    if (!kind) this.#dropOverflow(1);
    this.#queue.push(queued);
    return true;
  }

  /** Out on the socket; a numbered frame is kept until a `received` covers it. */
  #transmit(ws: WebSocket, queued: Queued): void {
    ws.send(queued.frame);
    if (queued.n === undefined) return;
    this.#lastSentN = queued.n;
    queued.unconfirmed = false;
    this.#unconfirmed.push(queued);
    const confirmAt = Math.ceil(this.#timings.queueMaxMessages * CONFIRM_AT_QUEUE_SHARE);
    if (confirmAt > 0 && this.#unconfirmed.length >= confirmAt) this.#ping(); // a no-op while one is out
  }

  /** The relay has handled every numbered frame up to `n`: forget them. */
  #confirm(n: number): void {
    let handled = 0;
    while (handled < this.#unconfirmed.length && this.#unconfirmed[handled]!.n! <= n) handled++;
    this.#unconfirmed.splice(0, handled);
  }

  /** The connection died: what it left unconfirmed goes out again first after the rejoin. */
  #requeueUnconfirmed(): void {
    for (const q of this.#unconfirmed) q.unconfirmed = true;
    this.#queue = [...this.#unconfirmed, ...this.#queue];
    this.#unconfirmed = [];
  }

  /** Sends (not set_state/close_room) older than queueMaxAgeMs are dropped, with an error event. */
  #dropExpired(): void {
    const oldestKeptMs = nowMs() - this.#timings.queueMaxAgeMs;
    this.#dropSends((q) => q.atMs < oldestKeptMs, "queue_expired", `older than ${this.#timings.queueMaxAgeMs} ms`);
  }

  /** Past queueMaxMessages sends (counting `incoming` about to be added), the oldest are dropped, with an error event. */
  #dropOverflow(incoming: number): void {
    let excess = this.#queue.filter((q) => !q.kind).length + incoming - this.#timings.queueMaxMessages;
    if (excess > 0) this.#dropSends(() => excess-- > 0, "queue_overflow", `past the queue's ${this.#timings.queueMaxMessages} messages`);
  }

  /**
   * Drops the queued sends `doomed` picks (asked oldest first) and says so: `code` for those
   * never sent, `unconfirmed_dropped` for those a dead link may or may not have delivered.
   */
  #dropSends(doomed: (q: Queued) => boolean, code: "queue_expired" | "queue_overflow", why: string): void {
    let neverSent = 0;
    let unconfirmed = 0;
    this.#queue = this.#queue.filter((q) => {
      if (q.kind !== undefined || !doomed(q)) return true;
      if (q.unconfirmed) unconfirmed++;
      else neverSent++;
      return false;
    });
    if (unconfirmed > 0) {
      const message = `not resending ${unconfirmed} unconfirmed message(s) ${why}: each may or may not have arrived`;
      this.#emit("error", { code: "unconfirmed_dropped", message, dropped: unconfirmed });
    }
    if (neverSent > 0) this.#emit("error", { code, message: `dropped ${neverSent} queued message(s) ${why}`, dropped: neverSent });
  }

  /**
   * After a rejoin: what the relay accepted from the old link (`received`) was delivered; the
   * rest of the unconfirmed frames go out again, then the queue, oldest first, within its bounds.
   */
  #flushQueue(received: number): void {
    this.#queue = this.#queue.filter((q) => !(q.unconfirmed && q.n! <= received));
    this.#dropExpired();
    this.#dropOverflow(0);
    while (this.#queue.length > 0) {
      const ws = this.#ws;
      // A listener of an `error` above may have left the room: then nothing more goes out.
      if (this.#phase !== "connected" || !ws || ws.readyState !== WebSocket.OPEN || this.#held) return;
      this.#transmit(ws, this.#queue.shift()!);
    }
  }


  // ----------------------------------------------------------------- heartbeat

  #startHeartbeat(): void {
    this.#stopHeartbeat();
    this.#pingTimer = setInterval(() => this.#ping(), this.#timings.pingIntervalMs);
  }

  #stopHeartbeat(): void {
    clearInterval(this.#pingTimer);
    clearTimeout(this.#pongTimer);
    this.#pingOutstanding = false;
  }

  #ping(): void {
    const ws = this.#ws;
    if (this.#phase !== "connected" || !ws || ws.readyState !== WebSocket.OPEN || this.#pingOutstanding) return;
    this.#pingId += 1;
    this.#pingSentMs = nowMs();
    this.#pingOutstanding = true;
    this.#pingCoversN = this.#lastSentN;
    ws.send(JSON.stringify({ type: "ping", id: this.#pingId } satisfies ClientMessage));
    this.#armPongDeadline(this.#timings.pongTimeoutMs);
  }

  /**
   * Any frame since the ping proves the link is alive (a busy downlink delays the pong behind
   * messages, and the relay's rate limit may have dropped the ping): the next interval then pings
   * afresh. Only a link silent since the ping is dead.
   */
  #armPongDeadline(ms: number): void {
    clearTimeout(this.#pongTimer);
    this.#pongTimer = setTimeout(() => {
      if (!this.#pingOutstanding) return;
      if (this.#lastReceivedMs > this.#pingSentMs) {
        this.#pingOutstanding = false;
        return;
      }
      this.#connectionLost("heartbeat timeout");
    }, ms);
  }

  #onPong(id: unknown, serverTimeMs: number, received: number | undefined): void {
    if (!this.#pingOutstanding || id !== this.#pingId) return;
    this.#pingOutstanding = false;
    clearTimeout(this.#pongTimer);
    // The relay handles a socket's frames in order, so all sent before the ping are handled: up to
    // `received` accepted, the rest refused with an error event already raised. None is resent.
    // Not while the room is moving: frames refused with `moving` are to be resent, not forgotten.
    this.#confirm(this.#held ? (received ?? 0) : Math.max(received ?? 0, this.#pingCoversN));
    this.rttMs = nowMs() - this.#pingSentMs;
    // The server stamped `t` about half a round trip ago.
    if (typeof serverTimeMs === "number") this.serverTimeOffsetMs = serverTimeMs + this.rttMs / 2 - Date.now();
  }

  // ----------------------------------------------------------------- online / visible

  readonly #onWake = (event: Event): void => {
    if (event.type === "visibilitychange" && this.#documentTarget?.visibilityState !== "visible") return;
    if (this.#phase === "waiting") {
      this.#rejoin(); // skip the rest of the backoff wait
    } else if (this.#phase === "connected") {
      this.#ping(); // frozen tab or new network: prove the socket still works (no-op if one is out)
    }
  };

  #listening = false;

  #addLifecycleListeners(): void {
    if (this.#listening) return;
    this.#listening = true;
    this.#windowTarget?.addEventListener("online", this.#onWake);
    this.#documentTarget?.addEventListener("visibilitychange", this.#onWake);
  }

  #removeLifecycleListeners(): void {
    if (!this.#listening) return;
    this.#listening = false;
    this.#windowTarget?.removeEventListener("online", this.#onWake);
    this.#documentTarget?.removeEventListener("visibilitychange", this.#onWake);
  }
}

function withSeq<T extends object>(detail: T, msg: object): T & { seq?: number } {
  const seq = (msg as { seq?: unknown }).seq;
  return typeof seq === "number" ? { ...detail, seq } : detail;
}

// ------------------------------------------------------------------------------- entry points

/**
 * Create a room; resolves as the host (slot 0) once `created` arrives. Rejects with a
 * `RoomError` whose `code` is the relay's error code (e.g. `invalid_max_clients`, `draining`).
 */
export async function createRoom(relayUrl: string, options: CreateRoomOptions): Promise<Room> {
  const room = new Room(relayUrl, options);
  return room[START]((clientId) => {
    const create: CreateMessage = { type: "create", clientId, maxClients: options.maxClients };
    if (options.url !== undefined) create.url = options.url;
    return create;
  });
}

/**
 * Join room `code`, or reclaim this tab's slot in it (same clientId); resolves once `joined`
 * arrives. Rejects with a `RoomError`: `room_not_found`, `room_full`, ...
 */
export async function joinRoom(relayUrl: string, code: string, options: JoinRoomOptions = {}): Promise<Room> {
  const stored = options.clientId === undefined ? storeGet(pickStore(options.storage), code) : null;
  const room = new Room(relayUrl, options, stored ?? undefined);
  return room[START]((clientId) => ({ type: "join", clientId, room: code }));
}
