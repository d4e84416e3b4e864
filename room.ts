// The room model of party-sockets: a room is plain data, and the functions here
// read or change it without touching a socket, a timer or the network (the relay
// in server.ts wires them to Bun's sockets). Read top to bottom: the room and its
// slots, the relayed-frame encoder and the resume ring, the rules (who gets which
// slot on a join, what a resume replays), then the transfer value a deploy hands
// to another machine, with the two functions that write and read it.
//
// Types are generic over the socket handle `S`, so this file needs nothing from Bun
// and test/room.test.ts drives it with no socket at all.

/** `}`: closes every relayed frame (and ends a `send` frame the fast path splices). */
export const CLOSE_BRACE = 125;

// ================================================================ the room

/** A slot: its index is stable for the room's life and never given to another clientId. */
export interface Member<S = unknown> {
  index: number;
  clientId: string;
  ws: S | null;
  /** The room's `seq` when this slot was created: nothing older was ever addressed to it. */
  sinceSeq: number;
  /** Send-batch stamp, to deliver a `to: [...]` message once per slot without allocating. */
  stamp: number;
  /** Removed by the host: the slot's clientId can never join this room again. */
  kicked: boolean;
  /**
   * Lossless sends: the highest `n` accepted (relayed or stored) from this
   * slot, 0 if none. Per slot, not per socket, so it outlives reconnects; a
   * room handed to another machine must carry it.
   */
  received: number;
}

export interface Room<S = unknown> {
  code: string;
  /** Bun pub/sub topic of the room's present members. */
  topic: string;
  maxClients: number;
  origin: string;
  creatorIp: string;
  url?: string;
  slots: Member<S>[];
  byClientId: Map<string, Member<S>>;
  present: number;
  /** The last `set_state`, already serialised as a `state` frame. */
  stateFrame?: string;
  /** Last sequence number given to a relayed frame. */
  seq: number;
  /** Recent relayed frames, for `join` with `resume`; made on the first one (idle rooms cost nothing). */
  ring?: FrameRing;
  hostGraceTimer?: Timer;
  /** When the host grace ends (a transfer carries what is left of it). */
  hostGraceUntilMs?: number;
  /** Being handed to another machine: members' frames get `moving`, nothing is relayed. */
  moving?: boolean;
  /** Adopted rooms: the transfer that brought it here (a repeat of it is answered 200). */
  transferId?: string;
  /** Adopted rooms: kept with nobody present until then, so the members have time to arrive. */
  movingGraceUntilMs?: number;
  closed: boolean;
  /** Bytes published to the room since its members' backlogs were last checked. */
  uncheckedBytes: number;
}

/** Whom a relayed frame was addressed to: everyone but its sender, one slot, or a list of slots. */
export type Recipients = undefined | number | number[];

// First allocation of a room's ring; it doubles from there. Small, because most
// rooms are short: in the churn bench (one frame per room) the first ring's
// allocations took 8 % of CPU samples with eight typed arrays and 2 KiB, 4 % with
// one index array and 512 bytes.
const RING_MIN_BYTES = 512;
const RING_MIN_FRAMES = 8;
// A busy room's index grows from RING_MIN_FRAMES to its bound in a few steps rather than
// ten. The bytes only double: a room's buffer is about twice what it holds, and growing it
// faster measured 500 busy rooms at 250 MB of heap instead of 130 MB.
const RING_INDEX_GROWTH = 4;

/** `{"type":"message","from":` */
export const MESSAGE_HEAD = Buffer.from('{"type":"message","from":');
/** `{"type":"state","seq":` */
export const STATE_HEAD = Buffer.from('{"type":"state","seq":');
export const SEQ_FIELD = Buffer.from(',"seq":');
export const DATA_FIELD = Buffer.from(',"data":');
/** The longest fixed part of a relayed frame, with two numbers of up to 16 digits. */
export const FRAME_OVERHEAD_BYTES = MESSAGE_HEAD.length + SEQ_FIELD.length + DATA_FIELD.length + 2 * 16 + 1;

/**
 * Builds each relayed frame as UTF-8 in one reused buffer, then reads it back
 * as one flat string. The bytes are what the resume ring keeps, so a frame is
 * encoded once; and in the saturated fanout bench a concatenated frame (a rope
 * Bun must flatten) cost more per delivery: the relay went from 0.53 to 0.45 µs
 * (Bun 1.4.5; at an unsaturated fixed rate the two ways cost the same).
 */
export class FrameWriter {
  private buf: Buffer;
  /** Bytes written since `start`. */
  length = 0;
  private ascii = true;
  private head: Uint8Array | undefined;

  constructor(capacity: number) {
    this.buf = Buffer.allocUnsafe(capacity);
  }

  /** Begins a frame with `head`, which stays in place from the last frame of the same kind. */
  start(head: Uint8Array): this {
    this.ascii = true;
    this.length = head.length;
    if (this.head !== head) {
      this.buf.set(head, 0);
      this.head = head;
    }
    return this;
  }

  /** A few constant bytes: a loop, because a native copy costs more than it saves at this size. */
  raw(bytes: Uint8Array): this {
    const buf = this.buf;
    let at = this.length;
    for (let i = 0; i < bytes.length; i++) buf[at++] = bytes[i]!;
    this.length = at;
    return this;
  }

  /** A non-negative integer in decimal. */
  uint(n: number): this {
    let end = this.length + 1;
    for (let rest = n; rest >= 10; rest = Math.floor(rest / 10)) end++;
    for (let at = end - 1, rest = n; at >= this.length; at--, rest = Math.floor(rest / 10)) this.buf[at] = 48 + (rest % 10);
    this.length = end;
    return this;
  }

  /** JSON text already validated, then the closing brace. */
  jsonThenClose(json: string): this {
    // UTF-8 takes at most 3 bytes per UTF-16 unit.
    const needed = this.length + json.length * 3 + 1;
    if (needed > this.buf.length) this.grow(needed);
    const written = this.buf.write(json, this.length, "utf8");
    // Any character past ASCII takes more bytes than UTF-16 units.
    if (written !== json.length) this.ascii = false;
    this.length += written;
    return this.close();
  }

  close(): this {
    this.buf[this.length++] = CLOSE_BRACE;
    return this;
  }

  /** The frame as a string: Latin-1 decoding is exact, and cheaper, when every byte is ASCII. */
  text(): string {
    return this.buf.toString(this.ascii ? "latin1" : "utf8", 0, this.length);
  }

  copyTo(target: Buffer, at: number): void {
    this.buf.copy(target, at, 0, this.length);
  }

  private grow(needed: number): void {
    const bigger = Buffer.allocUnsafe(Math.max(needed, this.buf.length * 2));
    this.buf.copy(bigger, 0, 0, this.length);
    this.buf = bigger;
  }
}

// Zero-length, never written: an empty ring allocates nothing.
const NO_BYTES = Buffer.alloc(0);
const NO_F64 = new Float64Array(0);
// A frame's record in the ring's index: RECORD numbers, at these positions.
const REC_SEQ = 0;
const REC_AT_MS = 1;
const REC_OFFSET = 2;
const REC_LENGTH = 3;
/** The sender's slot. */
const REC_FROM = 4;
/** -1: everyone but the sender; -2: the list in `lists`; else the one target slot. */
const REC_TO = 5;
const RECORD = 6;

/**
 * A room's recently relayed frames, kept for `join` with `resume`. Frames stay
 * for seconds: long enough that, kept as strings, the garbage collector would
 * promote them and pay for full collections at message rate (measured: about a
 * third of the relay's CPU in a busy room). So each frame is copied as UTF-8
 * into one circular byte buffer, described by records in one Float64Array: no
 * object per frame, and two allocations for a room's first frame. Both grow on
 * demand up to the room's bounds and are freed when emptied.
 */
export class FrameRing {
  private bytes = NO_BYTES;
  /** Frame records (REC_*), a circular array of `capacity` records starting at `head`. */
  private index = NO_F64;
  private capacity = 0;
  private lists: Map<number, number[]> | undefined;
  /** The last broadcast given up, and the last one given up from any other sender. */
  private lostBroadcast = { seq: 0, from: -1 };
  private lostBroadcastOtherSeq = 0;
  /** Per slot, the last targeted frame given up. */
  private lostTargeted: Map<number, number> | undefined;
  private head = 0;
  private writeAt = 0;
  count = 0;
  /** UTF-8 bytes held. */
  size = 0;

  constructor(private readonly maxFrames: number, private readonly maxBytes: number) {}

  /** The oldest seq held, if any. */
  oldest(): number | undefined {
    return this.count > 0 ? this.index[this.head * RECORD + REC_SEQ] : undefined;
  }

  /** Keeps a frame, dropping the oldest as needed; a frame larger than the whole bound is given up with all the rest. */
  push(seq: number, frame: Pick<FrameWriter, "length" | "copyTo">, from: number, to: Recipients, atMs: number): void {
    const length = frame.length;
    if (length > this.maxBytes) {
      while (this.count > 0) this.dropOldest();
      this.release();
      return this.forget(seq, from, to);
    }
    while (this.count > 0 && (this.count >= this.maxFrames || this.size + length > this.maxBytes)) this.dropOldest();
    this.reserve(length);
    const at = this.place(length);
    frame.copyTo(this.bytes, at);
    const r = this.record(this.count);
    const index = this.index;
    index[r + REC_SEQ] = seq;
    index[r + REC_AT_MS] = atMs;
    index[r + REC_OFFSET] = at;
    index[r + REC_LENGTH] = length;
    index[r + REC_FROM] = from;
    index[r + REC_TO] = to === undefined ? -1 : typeof to === "number" ? to : -2;
    if (Array.isArray(to)) (this.lists ??= new Map()).set(seq, to);
    this.count++;
    this.size += length;
    this.writeAt = at + length;
  }

  /** Drops frames older than `cutoffMs`; an emptied ring gives its memory back. */
  expire(cutoffMs: number): void {
    while (this.count > 0 && this.index[this.head * RECORD + REC_AT_MS]! < cutoffMs) this.dropOldest();
    if (this.count === 0 && this.bytes.length > 0) this.release();
  }

  dropOldest(): void {
    const r = this.head * RECORD;
    const seq = this.index[r + REC_SEQ]!;
    const to = this.index[r + REC_TO]!;
    this.forget(seq, this.index[r + REC_FROM]!, to === -1 ? undefined : to === -2 ? this.lists!.get(seq) : to);
    if (to === -2) this.lists!.delete(seq);
    this.size -= this.index[r + REC_LENGTH]!;
    this.head = (this.head + 1) % this.capacity;
    this.count--;
  }

  /**
   * Records that frame `seq` can no longer be replayed to its recipients, so a
   * resume is refused exactly when something addressed to that member is gone.
   * Frames are given up oldest first, so the latest one given up is the highest.
   */
  forget(seq: number, from: number, to: Recipients): void {
    if (to === undefined) {
      if (from !== this.lostBroadcast.from) {
        this.lostBroadcastOtherSeq = this.lostBroadcast.seq;
        this.lostBroadcast.from = from;
      }
      this.lostBroadcast.seq = seq;
    } else if (typeof to === "number") {
      (this.lostTargeted ??= new Map()).set(to, seq);
    } else {
      for (const slot of to) (this.lostTargeted ??= new Map()).set(slot, seq);
    }
  }

  /** Whether a frame after `afterSeq` addressed to slot `index` was given up. */
  lostSince(index: number, afterSeq: number): boolean {
    const broadcast = this.lostBroadcast.from !== index ? this.lostBroadcast.seq : this.lostBroadcastOtherSeq;
    return broadcast > afterSeq || (this.lostTargeted?.get(index) ?? 0) > afterSeq;
  }

  /** Every frame held, oldest first, as plain data (a transfer carries them). */
  *records(): Generator<RingRecord> {
    for (let i = 0; i < this.count; i++) {
      const r = this.record(i);
      const seq = this.index[r + REC_SEQ]!;
      const to = this.index[r + REC_TO]!;
      const offset = this.index[r + REC_OFFSET]!;
      yield {
        seq,
        atMs: this.index[r + REC_AT_MS]!,
        from: this.index[r + REC_FROM]!,
        to: to === -1 ? undefined : to === -2 ? this.lists!.get(seq)! : to,
        frame: this.bytes.toString("utf8", offset, offset + this.index[r + REC_LENGTH]!),
      };
    }
  }

  /** What was given up, as plain data, so an adopted ring refuses exactly the resumes this one would. */
  lostRecord(): LostRecord {
    return {
      broadcastSeq: this.lostBroadcast.seq,
      broadcastFrom: this.lostBroadcast.from,
      broadcastOtherSeq: this.lostBroadcastOtherSeq,
      targeted: [...(this.lostTargeted ?? [])],
    };
  }

  restoreLost(lost: LostRecord): void {
    this.lostBroadcast = { seq: lost.broadcastSeq, from: lost.broadcastFrom };
    this.lostBroadcastOtherSeq = lost.broadcastOtherSeq;
    this.lostTargeted = lost.targeted.length > 0 ? new Map(lost.targeted) : undefined;
  }

  /** Frees the buffers of an empty ring (what was given up stays recorded). */
  private release(): void {
    this.bytes = NO_BYTES;
    this.index = NO_F64;
    this.lists = undefined;
    this.capacity = this.head = this.writeAt = this.count = this.size = 0;
  }

  /** Every frame after `afterSeq` addressed to `index`, oldest first. */
  *addressedTo(index: number, afterSeq: number): Generator<string> {
    for (let i = 0; i < this.count; i++) {
      const r = this.record(i);
      const seq = this.index[r + REC_SEQ]!;
      if (seq <= afterSeq) continue;
      const to = this.index[r + REC_TO]!;
      const addressed = to === -1 ? this.index[r + REC_FROM] !== index : to === -2 ? this.lists!.get(seq)!.includes(index) : to === index;
      const offset = this.index[r + REC_OFFSET]!;
      if (addressed) yield this.bytes.toString("utf8", offset, offset + this.index[r + REC_LENGTH]!);
    }
  }

  /** Where the record of the i-th oldest frame starts in `index`. */
  private record(i: number): number {
    return ((this.head + i) % this.capacity) * RECORD;
  }

  /** Grows the buffers (up to the bounds) so a frame of `length` bytes has room. */
  private reserve(length: number): void {
    if (this.count === this.capacity) this.growIndex(Math.min(this.maxFrames, Math.max(RING_MIN_FRAMES, this.capacity * RING_INDEX_GROWTH)));
    // Half the buffer free keeps wrap-around from dropping frames early, until it reaches its bound.
    const wanted = Math.min(this.maxBytes, Math.max(RING_MIN_BYTES, 2 * (this.size + length)));
    if (wanted > this.bytes.length) this.growBytes(Math.max(wanted, Math.min(this.maxBytes, this.bytes.length * 2)));
  }

  /** Where the next `length` bytes go: after the newest frame, or wrapped to the start, dropping what is in the way. */
  private place(length: number): number {
    let at = this.writeAt + length <= this.bytes.length ? this.writeAt : 0;
    while (this.count > 0) {
      const r = this.head * RECORD;
      const start = this.index[r + REC_OFFSET]!;
      const overlaps = start < at + length && at < start + this.index[r + REC_LENGTH]!;
      if (!overlaps) break;
      this.dropOldest();
      if (this.count === 0) at = 0;
    }
    return at;
  }

  /** Copies the records, oldest first, into a larger index; the bytes stay where they are. */
  private growIndex(frameCapacity: number): void {
    const index = new Float64Array(frameCapacity * RECORD);
    for (let i = 0; i < this.count; i++) {
      const from = this.record(i);
      for (let k = 0; k < RECORD; k++) index[i * RECORD + k] = this.index[from + k]!;
    }
    Object.assign(this, { index, capacity: frameCapacity, head: 0 });
  }

  /** Copies the live frames, oldest first and packed, into a larger buffer. */
  private growBytes(byteCapacity: number): void {
    const bytes = Buffer.allocUnsafe(byteCapacity);
    let at = 0;
    for (let i = 0; i < this.count; i++) {
      const r = this.record(i);
      const offset = this.index[r + REC_OFFSET]!;
      const length = this.index[r + REC_LENGTH]!;
      this.bytes.copy(bytes, at, offset, offset + length);
      this.index[r + REC_OFFSET] = at;
      at += length;
    }
    Object.assign(this, { bytes, writeAt: at });
  }
}

// ================================================================ rules

/** The fields a new or adopted room starts from; everything else starts empty. */
export interface RoomStart {
  code: string;
  maxClients: number;
  origin: string;
  /** The creator's address, for the per-IP room cap ("" for an adopted room). */
  creatorIp: string;
  url?: string;
}

/** Every field written, optional ones too, so that every room has one shape (created or adopted). */
export function newRoom<S>(start: RoomStart): Room<S> {
  return {
    code: start.code,
    // The code itself: topics are per server and nothing else subscribes (one string fewer per room).
    topic: start.code,
    maxClients: start.maxClients,
    origin: start.origin,
    creatorIp: start.creatorIp,
    url: start.url,
    slots: [],
    byClientId: new Map(),
    present: 0,
    stateFrame: undefined,
    seq: 0,
    ring: undefined,
    hostGraceTimer: undefined,
    hostGraceUntilMs: undefined,
    moving: false,
    transferId: undefined,
    movingGraceUntilMs: undefined,
    closed: false,
    uncheckedBytes: 0,
  };
}

/** A new slot for `clientId`, at the next index: slots are never reused. */
export function addMember<S>(room: Room<S>, clientId: string): Member<S> {
  const member: Member<S> = { index: room.slots.length, clientId, ws: null, sinceSeq: room.seq, stamp: 0, kicked: false, received: 0 };
  room.slots.push(member);
  room.byClientId.set(clientId, member);
  return member;
}

/** The other present slots, ascending. */
export function presentPeers<S>(room: Room<S>, except: Member<S>): number[] {
  const peers: number[] = [];
  for (const m of room.slots) if (m.ws && m !== except) peers.push(m.index);
  return peers;
}

/** What a `join` with this clientId may do here (the caller asks the miss budget first and moves the sockets). */
export type JoinVerdict<S> =
  | { kind: "refuse"; code: "kicked" | "room_full" }
  /** The clientId's slot is live on another socket: this one takes it over (4000 to the old one). */
  | { kind: "replace"; member: Member<S> }
  /** Its own vacant slot comes back. */
  | { kind: "reclaim"; member: Member<S> }
  /** A new slot, at the next index. */
  | { kind: "new" };

/**
 * The join rules: a kicked slot's clientId never comes back; a live slot is
 * taken over even in a full room (no one is added); otherwise `maxClients`
 * caps present members, and `maxSlots` caps the slots a room may ever make.
 */
export function joinVerdict<S>(room: Room<S>, clientId: string, maxSlots: number): JoinVerdict<S> {
  const owned = room.byClientId.get(clientId);
  if (owned?.kicked) return { kind: "refuse", code: "kicked" };
  if (owned?.ws) return { kind: "replace", member: owned };
  if (room.present >= room.maxClients) return { kind: "refuse", code: "room_full" };
  if (owned) return { kind: "reclaim", member: owned };
  if (room.slots.length >= maxSlots) return { kind: "refuse", code: "room_full" };
  return { kind: "new" };
}

/** Lossless reconnect: whether a `join` with `resume` gets every missed frame (after `after`), or the snapshot. */
export interface ResumePlan {
  resumed: boolean;
  /** Replay what came after this seq (nothing older than the slot itself). */
  after: number;
  /** The oldest seq still held, for `joined.oldest` when not resumed. */
  oldest: number;
}

/** `resume` undefined: a join that did not ask, or a new slot (which has missed nothing it could get back). */
export function resumePlan<S>(room: Room<S>, member: Member<S>, resume: number | undefined): ResumePlan {
  const after = Math.max(resume ?? 0, member.sinceSeq);
  const resumed = resume !== undefined && after <= room.seq && !room.ring?.lostSince(member.index, after);
  return { resumed, after, oldest: room.ring?.oldest() ?? room.seq + 1 };
}

// ======================================================= the transfer value
//
// On SIGTERM a room is written out as this plain, versioned value and posted to
// a peer of the region, which checks it (server.ts, parseTransfer) as strictly as
// a client frame before adopting the room under the same code. A receiver takes
// its own version and the previous one (v1 is the first), so old and new releases
// hand rooms to each other during a rolling deploy.


export interface RingRecord {
  seq: number;
  atMs: number;
  from: number;
  to: Recipients;
  /** The frame exactly as relayed. */
  frame: string;
}

export interface LostRecord {
  broadcastSeq: number;
  broadcastFrom: number;
  broadcastOtherSeq: number;
  /** [slot, the last targeted seq given up for it]. */
  targeted: [number, number][];
}

/** One slot. `clientId: null`: released by `leave` (never reclaimable). */
export interface TransferSlot {
  clientId: string | null;
  /** The room's `seq` when the slot was created. */
  since: number;
  /** Kicked by the host: its clientId stays barred (absent means false). */
  kicked?: boolean;
  /** Lossless sends: the highest `n` accepted from the slot (absent means 0), so a resend after the move is not relayed twice. */
  received?: number;
}

export interface TransferFrame {
  seq: number;
  /** Age rather than a timestamp: the machines' clocks need not agree. */
  ageMs: number;
  from: number;
  /** -1: everyone but the sender; a slot; or a list of slots. */
  to: number | number[];
  frame: string;
}

export interface RoomTransfer {
  v: 1;
  /** Names this hand-off: the same room offered twice is adopted once. */
  transfer: string;
  /** The sending machine (logged as the peer). */
  source: string;
  code: string;
  maxClients: number;
  origin: string;
  url?: string;
  slots: TransferSlot[];
  /** The last `state` frame as relayed. */
  state?: string;
  seq: number;
  frames: TransferFrame[];
  lost: LostRecord;
  /** What is left of the host grace when the host's slot is vacant. */
  hostGraceMs?: number;
}

/** The versions this release adopts: its own and the previous one. */
export const TRANSFER_VERSIONS: readonly number[] = [1];

const NOTHING_LOST: LostRecord = { broadcastSeq: 0, broadcastFrom: -1, broadcastOtherSeq: 0, targeted: [] };

/** The room as a transfer value. A slot released by `leave` (its clientId no longer maps to it) travels without one. */
export function roomToTransfer<S>(room: Room<S>, transfer: string, source: string, nowMs: number): RoomTransfer {
  return {
    v: 1,
    transfer,
    source,
    code: room.code,
    maxClients: room.maxClients,
    origin: room.origin,
    url: room.url,
    slots: room.slots.map((m) => ({ clientId: room.byClientId.get(m.clientId) === m ? m.clientId : null, since: m.sinceSeq, kicked: m.kicked, received: m.received })),
    state: room.stateFrame,
    seq: room.seq,
    frames: [...(room.ring?.records() ?? [])].map((r) => ({ seq: r.seq, ageMs: Math.max(0, nowMs - r.atMs), from: r.from, to: r.to ?? -1, frame: r.frame })),
    lost: room.ring?.lostRecord() ?? NOTHING_LOST,
    hostGraceMs: room.hostGraceUntilMs === undefined ? undefined : Math.max(0, room.hostGraceUntilMs - nowMs),
  };
}

/** Resume-ring bounds of the adopting machine; `keepFrames: false` when its resume buffer is off. */
export interface RingBounds {
  maxFrames: number;
  maxBytes: number;
  keepFrames: boolean;
}

/**
 * The room a transfer describes, with nobody present: same code, slots (with their
 * clientIds, kicked flags and highest `n`), state, `seq`, and a resume ring that
 * refuses exactly the resumes the sender's would have. Frames past `bounds` are
 * given up oldest first, as the ring always does.
 */
export function roomFromTransfer<S>(t: RoomTransfer, bounds: RingBounds, nowMs: number): Room<S> {
  const room = newRoom<S>({ code: t.code, maxClients: t.maxClients, origin: t.origin, creatorIp: "", url: t.url });
  room.seq = t.seq;
  room.stateFrame = t.state;
  room.transferId = t.transfer;
  for (const [index, slot] of t.slots.entries()) {
    const member: Member<S> = { index, clientId: slot.clientId ?? "", ws: null, sinceSeq: slot.since, stamp: 0, kicked: slot.kicked === true, received: slot.received ?? 0 };
    room.slots.push(member);
    if (slot.clientId !== null) room.byClientId.set(slot.clientId, member);
  }
  const ring = (room.ring = new FrameRing(bounds.maxFrames, bounds.maxBytes));
  ring.restoreLost(t.lost);
  for (const f of t.frames) {
    const to = f.to === -1 ? undefined : f.to;
    if (!bounds.keepFrames) {
      ring.forget(f.seq, f.from, to);
      continue;
    }
    const bytes = Buffer.from(f.frame, "utf8");
    ring.push(f.seq, { length: bytes.length, copyTo: (target, at) => void bytes.copy(target, at) }, f.from, to, nowMs - f.ageMs);
  }
  return room;
}
