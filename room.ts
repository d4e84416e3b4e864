// The room model of party-sockets: a room is plain data, and the functions here
// read or change it without touching a socket, a timer or the network (the relay
// in server.ts wires them to Bun's sockets). Read top to bottom: the room and its
// slots, the relayed-frame encoder and the resume log, the rules (who gets which
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
  /** What the room keeps for `join` with `resume`; made on its first relayed frame (idle rooms cost nothing). */
  frames?: RoomFrames;
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

/** `{"type":"message","from":` */
export const MESSAGE_HEAD = Buffer.from('{"type":"message","from":');
/** `{"type":"state","seq":` */
export const STATE_HEAD = Buffer.from('{"type":"state","seq":');
export const SEQ_FIELD = Buffer.from(',"seq":');
export const DATA_FIELD = Buffer.from(',"data":');
/** The longest fixed part of a relayed frame, with two numbers of up to 16 digits. */
export const FRAME_OVERHEAD_BYTES = MESSAGE_HEAD.length + SEQ_FIELD.length + DATA_FIELD.length + 2 * 16 + 1;

/**
 * Builds each relayed frame as UTF-8 at a place in a buffer, then reads it back
 * as one flat string: in the saturated fanout bench a concatenated frame (a
 * rope Bun must flatten) cost more per delivery, 0.53 against 0.45 µs (Bun
 * 1.4.5; at an unsaturated fixed rate the two ways cost the same). The place is
 * the head of the resume log when the log can keep the frame, so a frame is
 * encoded once and never copied; otherwise a spare buffer of the relay's.
 */
export class FrameWriter {
  private buf: Buffer;
  private base = 0;
  /** Bytes written since `start`. */
  length = 0;
  private ascii = true;

  constructor(buf: Buffer) {
    this.buf = buf;
  }

  /** The next frame goes at `base` of `buf`. */
  at(buf: Buffer, base: number): this {
    this.buf = buf;
    this.base = base;
    return this;
  }

  /** Begins a frame with `head`. */
  start(head: Uint8Array): this {
    this.ascii = true;
    this.length = 0;
    return this.raw(head);
  }

  /** A few constant bytes: a loop, because a native copy costs more than it saves at this size. */
  raw(bytes: Uint8Array): this {
    const buf = this.buf;
    let at = this.base + this.length;
    for (let i = 0; i < bytes.length; i++) buf[at++] = bytes[i]!;
    this.length = at - this.base;
    return this;
  }

  /** A non-negative integer in decimal. */
  uint(n: number): this {
    const from = this.base + this.length;
    let end = from + 1;
    for (let rest = n; rest >= 10; rest = Math.floor(rest / 10)) end++;
    for (let at = end - 1, rest = n; at >= from; at--, rest = Math.floor(rest / 10)) this.buf[at] = 48 + (rest % 10);
    this.length = end - this.base;
    return this;
  }

  /** JSON text already validated, then the closing brace. The place has room for `maxFrameBytes(json)`. */
  jsonThenClose(json: string): this {
    const written = this.buf.write(json, this.base + this.length, "utf8");
    // Any character past ASCII takes more bytes than UTF-16 units.
    if (written !== json.length) this.ascii = false;
    this.length += written;
    return this.close();
  }

  close(): this {
    this.buf[this.base + this.length++] = CLOSE_BRACE;
    return this;
  }

  /** The frame as a string: Latin-1 decoding is exact, and cheaper, when every byte is ASCII. */
  text(): string {
    return this.buf.toString(this.ascii ? "latin1" : "utf8", this.base, this.base + this.length);
  }

  copyTo(target: Buffer, at: number): void {
    this.buf.copy(target, at, this.base, this.base + this.length);
  }
}

/** The most bytes a relayed frame around `json` can take: UTF-8 is at most 3 bytes per UTF-16 unit. */
export const maxFrameBytes = (json: string | undefined): number => FRAME_OVERHEAD_BYTES + (json?.length ?? 0) * 3;

const NO_BYTES = Buffer.alloc(0);
const NO_F64 = new Float64Array(0);
// A frame's record in the log: RECORD numbers, at these positions.
const REC_SEQ = 0;
const REC_AT_MS = 1;
const REC_OFFSET = 2;
const REC_LENGTH = 3;
/** The sender's slot. */
const REC_FROM = 4;
/** -1: everyone but the sender; -2: the list in the room's `lists`; else the one target slot. */
const REC_TO = 5;
/** The id of the same room's next record (valid while the room holds more than this one). */
const REC_NEXT = 6;
const RECORD = 7;
/** First size of the record array; it doubles from there. */
const LOG_MIN_RECORDS = 1024;
/**
 * The log holds at most one frame per this many of its bytes, so its index (64 bytes a record,
 * with the owner) stays within half the log. A game frame is about 160 bytes; frames shorter
 * than this on average (a bare `{"type":"message","from":0,"seq":1}` is 35) are bounded by the
 * record count instead, and the oldest still goes first.
 */
const LOG_BYTES_PER_RECORD = 128;

/**
 * What one room keeps for `join` with `resume`: its frames in the resume log, a
 * chain of record ids from oldest to newest, and what it had to give up.
 */
export class RoomFrames {
  /** Record ids of the oldest and newest frame held; -1 when none. */
  firstId = -1;
  lastId = -1;
  count = 0;
  /** UTF-8 bytes held. */
  size = 0;
  /** The recipients of the `to: [...]` frames held, by seq. */
  lists: Map<number, number[]> | undefined;
  /** The last broadcast given up, and the last one given up from any other sender. */
  private lostBroadcast = { seq: 0, from: -1 };
  private lostBroadcastOtherSeq = 0;
  /** Per slot, the last targeted frame given up. */
  private lostTargeted: Map<number, number> | undefined;

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

  /** What was given up, as plain data, so an adopted room refuses exactly the resumes this one would. */
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
}

/**
 * Every room's recently relayed frames, for `join` with `resume`, in one
 * circular byte buffer for the whole process. Frames stay for seconds: kept as
 * strings, the garbage collector would promote them and pay for full
 * collections at message rate (measured: about a third of the relay's CPU in a
 * busy room). Kept in a buffer per room, that buffer had to grow, copying itself
 * each time, and 500 busy rooms held 4-5 times the bytes they kept (RSS 240-300
 * MB for 32 MiB of frames). So each frame is copied once as UTF-8 to the head of
 * one log of `maxBytes`, allocated on the first frame and released when empty,
 * and described by a record in one Float64Array; a room links its own records.
 *
 * The oldest frame in the process goes first when the log is full, so under
 * pressure every room keeps the same span of time; a room's own bounds (frames,
 * bytes) drop its oldest early, and those bytes are reused when the log comes
 * round to them.
 */
export class ResumeLog {
  private bytes = NO_BYTES;
  /** Records (REC_*), a circular array of `capacity`: record `id` lives at slot `id % capacity`. */
  private records = NO_F64;
  /** The room whose frame each slot holds; undefined once the room gave it up. */
  private owners: (RoomFrames | undefined)[] = [];
  private capacity = 0;
  private readonly maxRecords: number;
  /** Ids of the oldest record and of the next one to be written. */
  private headId = 0;
  private nextId = 0;
  private writeAt = 0;
  /** Writes frames in place at the log's head; `reservedAt` is where, -1 when it is not reserved. */
  private readonly writer = new FrameWriter(NO_BYTES);
  private reservedAt = -1;
  /** UTF-8 bytes of the frames rooms still hold. */
  held = 0;

  constructor(
    private readonly maxBytes: number,
    private readonly roomFrames: number,
    private readonly roomBytes: number,
  ) {
    this.maxRecords = Math.max(LOG_MIN_RECORDS, Math.ceil(maxBytes / LOG_BYTES_PER_RECORD));
  }

  /**
   * A writer at the head of the log with room for a frame of up to `maxLength`
   * bytes, to be passed to `keep`; undefined when a frame that long might not be kept.
   */
  writerFor(maxLength: number): FrameWriter | undefined {
    if (maxLength > this.roomBytes || maxLength > this.maxBytes) return undefined;
    if (this.bytes.length === 0) this.bytes = Buffer.allocUnsafeSlow(this.maxBytes);
    this.reservedAt = this.place(maxLength);
    return this.writer.at(this.bytes, this.reservedAt);
  }

  /**
   * Keeps a frame of `room`: in place if `frame` is this log's writer, else
   * copied in. One larger than the room's bound is given up with all the room holds.
   */
  keep(room: RoomFrames, seq: number, frame: Pick<FrameWriter, "length" | "copyTo">, from: number, to: Recipients, atMs: number): void {
    const length = frame.length;
    let at = frame === this.writer ? this.reservedAt : -1;
    this.reservedAt = -1;
    if (length > this.roomBytes || length > this.maxBytes) {
      while (room.count > 0) this.dropOldestOf(room);
      return room.forget(seq, from, to);
    }
    while (room.count > 0 && (room.count >= this.roomFrames || room.size + length > this.roomBytes)) this.dropOldestOf(room);
    if (at < 0) {
      if (this.bytes.length === 0) this.bytes = Buffer.allocUnsafeSlow(this.maxBytes);
      at = this.place(length);
      frame.copyTo(this.bytes, at);
    }
    if (this.nextId - this.headId === this.capacity) this.growRecords();
    const id = this.nextId++;
    const r = this.slot(id);
    const records = this.records;
    records[r + REC_SEQ] = seq;
    records[r + REC_AT_MS] = atMs;
    records[r + REC_OFFSET] = at;
    records[r + REC_LENGTH] = length;
    records[r + REC_FROM] = from;
    records[r + REC_TO] = to === undefined ? -1 : typeof to === "number" ? to : -2;
    this.owners[id % this.capacity] = room;
    if (room.count > 0) records[this.slot(room.lastId) + REC_NEXT] = id;
    else room.firstId = id;
    room.lastId = id;
    room.count++;
    room.size += length;
    this.held += length;
    if (Array.isArray(to)) (room.lists ??= new Map()).set(seq, to);
    this.writeAt = at + length;
  }

  /** The oldest seq `room` holds, if any. */
  oldest(room: RoomFrames): number | undefined {
    return room.count > 0 ? this.records[this.slot(room.firstId) + REC_SEQ] : undefined;
  }

  /** Every frame of `room` after `afterSeq` addressed to slot `index`, oldest first. */
  *addressedTo(room: RoomFrames, index: number, afterSeq: number): Generator<string> {
    for (let id = room.firstId, left = room.count; left > 0; left--) {
      const r = this.slot(id);
      const seq = this.records[r + REC_SEQ]!;
      const to = this.records[r + REC_TO]!;
      const addressed = to === -1 ? this.records[r + REC_FROM] !== index : to === -2 ? room.lists!.get(seq)!.includes(index) : to === index;
      const offset = this.records[r + REC_OFFSET]!;
      if (seq > afterSeq && addressed) yield this.bytes.toString("utf8", offset, offset + this.records[r + REC_LENGTH]!);
      id = this.records[r + REC_NEXT]!;
    }
  }

  /** Every frame `room` holds, oldest first, as plain data (a transfer carries them). */
  *framesOf(room: RoomFrames): Generator<RingRecord> {
    for (let id = room.firstId, left = room.count; left > 0; left--) {
      const r = this.slot(id);
      const seq = this.records[r + REC_SEQ]!;
      const to = this.records[r + REC_TO]!;
      const offset = this.records[r + REC_OFFSET]!;
      yield {
        seq,
        atMs: this.records[r + REC_AT_MS]!,
        from: this.records[r + REC_FROM]!,
        to: to === -1 ? undefined : to === -2 ? room.lists!.get(seq)! : to,
        frame: this.bytes.toString("utf8", offset, offset + this.records[r + REC_LENGTH]!),
      };
      id = this.records[r + REC_NEXT]!;
    }
  }

  /** Drops frames older than `cutoffMs` (the log is in time order); an emptied log gives its memory back. */
  expire(cutoffMs: number): void {
    while (this.headId < this.nextId && this.records[this.slot(this.headId) + REC_AT_MS]! < cutoffMs) this.evictHead();
    if (this.headId === this.nextId && this.bytes.length > 0) {
      this.bytes = NO_BYTES;
      this.records = NO_F64;
      this.owners = [];
      this.capacity = this.writeAt = 0;
    }
  }

  /** A room that ends lets go of its frames (nobody can resume them). */
  release(room: RoomFrames): void {
    for (let id = room.firstId; room.count > 0; room.count--) {
      const r = this.slot(id);
      this.owners[id % this.capacity] = undefined;
      this.held -= this.records[r + REC_LENGTH]!;
      id = this.records[r + REC_NEXT]!;
    }
    room.firstId = room.lastId = -1;
    room.size = 0;
    room.lists = undefined;
  }

  /** Gives up the oldest frame `room` holds; its bytes stay in the log until the log comes round. */
  private dropOldestOf(room: RoomFrames): void {
    const id = room.firstId;
    const r = this.slot(id);
    const seq = this.records[r + REC_SEQ]!;
    const to = this.records[r + REC_TO]!;
    room.forget(seq, this.records[r + REC_FROM]!, to === -1 ? undefined : to === -2 ? room.lists!.get(seq) : to);
    if (to === -2) room.lists!.delete(seq);
    const length = this.records[r + REC_LENGTH]!;
    room.size -= length;
    this.held -= length;
    this.owners[id % this.capacity] = undefined;
    if (--room.count > 0) room.firstId = this.records[r + REC_NEXT]!;
    else room.firstId = room.lastId = -1;
  }

  /** The log's oldest record goes; if a room still held it, that room gives it up. */
  private evictHead(): void {
    const owner = this.owners[this.headId % this.capacity];
    if (owner) this.dropOldestOf(owner);
    this.headId++;
  }

  /**
   * Where the next `length` bytes go: after the newest frame, or wrapped to the
   * start. Wrapping, every frame still lying past the newest one is older than
   * all before it and goes first; then whatever overlaps the new frame goes.
   */
  private place(length: number): number {
    let at = this.writeAt;
    if (at + length > this.bytes.length) {
      while (this.headId < this.nextId && this.records[this.slot(this.headId) + REC_OFFSET]! >= this.writeAt) this.evictHead();
      at = 0;
    }
    while (this.headId < this.nextId) {
      const r = this.slot(this.headId);
      const start = this.records[r + REC_OFFSET]!;
      if (!(start < at + length && at < start + this.records[r + REC_LENGTH]!)) break;
      this.evictHead();
    }
    return at;
  }

  /** Doubles the record array (re-placing each live record by its id), or at its bound frees the oldest slot. */
  private growRecords(): void {
    if (this.capacity >= this.maxRecords) return this.evictHead();
    const capacity = Math.min(this.maxRecords, Math.max(LOG_MIN_RECORDS, this.capacity * 2));
    const records = new Float64Array(capacity * RECORD);
    const owners: (RoomFrames | undefined)[] = new Array(capacity);
    for (let id = this.headId; id < this.nextId; id++) {
      const from = this.slot(id);
      const to = (id % capacity) * RECORD;
      for (let k = 0; k < RECORD; k++) records[to + k] = this.records[from + k]!;
      owners[id % capacity] = this.owners[id % this.capacity];
    }
    Object.assign(this, { records, owners, capacity });
  }

  /** Where record `id` starts in `records`. */
  private slot(id: number): number {
    return (id % this.capacity) * RECORD;
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
    frames: undefined,
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
export function resumePlan<S>(room: Room<S>, member: Member<S>, resume: number | undefined, log: ResumeLog | undefined): ResumePlan {
  const after = Math.max(resume ?? 0, member.sinceSeq);
  const resumed = resume !== undefined && after <= room.seq && !room.frames?.lostSince(member.index, after);
  return { resumed, after, oldest: (room.frames && log?.oldest(room.frames)) ?? room.seq + 1 };
}

/** What a `kick` of slot `index` by `by` does: only the host kicks, never itself, and a slot once. */
export type KickVerdict<S> =
  | { kind: "refuse"; code: "not_host" | "target_not_found" }
  | { kind: "already" }
  | { kind: "kick"; member: Member<S> };

export function kickVerdict<S>(room: Room<S>, by: Member<S>, index: number): KickVerdict<S> {
  if (by.index !== 0) return { kind: "refuse", code: "not_host" };
  const target = room.slots[index];
  if (!target || target === by) return { kind: "refuse", code: "target_not_found" };
  if (target.kicked) return { kind: "already" };
  return { kind: "kick", member: target };
}

/**
 * Bars a slot's clientId for the room's life, even when the slot is vacant or
 * was left: a left slot's clientId is barred anew, unless it has since taken
 * another slot (which the host can kick in turn). The caller closes its socket.
 */
export function bar<S>(room: Room<S>, member: Member<S>): void {
  member.kicked = true;
  if (!room.byClientId.has(member.clientId)) room.byClientId.set(member.clientId, member);
}

/** `leave`: the slot is released for good; its clientId no longer reclaims it (a later join takes a new slot). */
export function release<S>(room: Room<S>, member: Member<S>): void {
  room.byClientId.delete(member.clientId);
}

/** Lossless sends: a frame numbered `n` (0: not numbered) that the slot already had accepted is a duplicate. */
export function isDuplicate<S>(member: Member<S>, n: number): boolean {
  return n !== 0 && n <= member.received;
}

/** Lossless sends: the frame numbered `n` was relayed or stored. */
export function accept<S>(member: Member<S>, n: number): void {
  if (n > member.received) member.received = n;
}

/**
 * `to: [...]`: the present slots, each once and in the order given, and the
 * absent ones. `stamp` must be new for each send: it marks a slot already taken
 * without a set per send.
 */
export function listTargets<S>(room: Room<S>, to: readonly number[], stamp: number): { targets: number[]; missing: Set<number> | undefined } {
  const targets: number[] = [];
  let missing: Set<number> | undefined;
  for (const index of to) {
    const member = room.slots[index];
    if (!member?.ws) {
      (missing ??= new Set()).add(index);
    } else if (member.stamp !== stamp) {
      member.stamp = stamp;
      targets.push(index);
    }
  }
  return { targets, missing };
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
/** `log` is the process's resume log (undefined when resume is off). */
export function roomToTransfer<S>(room: Room<S>, log: ResumeLog | undefined, transfer: string, source: string, nowMs: number): RoomTransfer {
  const held = room.frames && log ? [...log.framesOf(room.frames)] : [];
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
    frames: held.map((r) => ({ seq: r.seq, ageMs: Math.max(0, nowMs - r.atMs), from: r.from, to: r.to ?? -1, frame: r.frame })),
    lost: room.frames?.lostRecord() ?? NOTHING_LOST,
    hostGraceMs: room.hostGraceUntilMs === undefined ? undefined : Math.max(0, room.hostGraceUntilMs - nowMs),
  };
}

/**
 * The room a transfer describes, with nobody present: same code, slots (with their
 * clientIds, kicked flags and highest `n`), state, `seq`, and resume frames that
 * refuse exactly the resumes the sender's would have. The frames go into this
 * machine's resume log (`undefined`: resume is off here, and they count as given
 * up), within its bounds, oldest given up first. The log is kept in time order, so
 * an adopted frame's window starts at the adoption: a member gets a little longer
 * to resume, never less.
 */
export function roomFromTransfer<S>(t: RoomTransfer, log: ResumeLog | undefined, nowMs: number): Room<S> {
  const room = newRoom<S>({ code: t.code, maxClients: t.maxClients, origin: t.origin, creatorIp: "", url: t.url });
  room.seq = t.seq;
  room.stateFrame = t.state;
  room.transferId = t.transfer;
  for (const [index, slot] of t.slots.entries()) {
    const member: Member<S> = { index, clientId: slot.clientId ?? "", ws: null, sinceSeq: slot.since, stamp: 0, kicked: slot.kicked === true, received: slot.received ?? 0 };
    room.slots.push(member);
    if (slot.clientId !== null) room.byClientId.set(slot.clientId, member);
  }
  const frames = (room.frames = new RoomFrames());
  frames.restoreLost(t.lost);
  for (const f of t.frames) {
    const to = f.to === -1 ? undefined : f.to;
    if (!log) {
      frames.forget(f.seq, f.from, to);
      continue;
    }
    const bytes = Buffer.from(f.frame, "utf8");
    log.keep(frames, f.seq, { length: bytes.length, copyTo: (target, at) => void bytes.copy(target, at) }, f.from, to, nowMs);
  }
  return room;
}
