// The room model (room.ts) driven without a socket: slots, the join and resume
// rules, the resume ring and the transfer value a deploy hands to another machine. The "socket" of a member is a
// plain string here; the model only asks whether there is one.
import { describe, expect, test } from "bun:test";
import {
  addMember,
  DATA_FIELD,
  FrameRing,
  FrameWriter,
  joinVerdict,
  MESSAGE_HEAD,
  newRoom,
  presentPeers,
  resumePlan,
  roomFromTransfer,
  roomToTransfer,
  SEQ_FIELD,
  type Recipients,
  type Room,
} from "../room.ts";

const BOUNDS = { maxFrames: 64, maxBytes: 64 * 1024, keepFrames: true };
const NOW_MS = 1_000_000;

/** Relays `data` from slot `from` as the relay does: numbered, kept in the ring. */
function relay(room: Room<string>, from: number, data: unknown, to: Recipients = undefined, atMs = NOW_MS): void {
  const seq = ++room.seq;
  const frame = new FrameWriter(1024).start(MESSAGE_HEAD).uint(from).raw(SEQ_FIELD).uint(seq).raw(DATA_FIELD).jsonThenClose(JSON.stringify(data));
  (room.ring ??= new FrameRing(BOUNDS.maxFrames, BOUNDS.maxBytes)).push(seq, frame, from, to, atMs);
}

/** A room with a host and three players, some traffic, a left slot and a kicked one. */
function playedRoom(): Room<string> {
  const room = newRoom<string>({ code: "abcdef", maxClients: 8, origin: "https://party.example", creatorIp: "1.2.3.4", url: "https://party.example/abcdef" });
  for (const id of ["host", "p1", "p2", "p3"]) addMember(room, id).ws = `socket-${id}`;
  room.present = 4;
  relay(room, 0, { round: 1 });
  relay(room, 1, "to host", 0);
  relay(room, 2, "to two", [1, 3]);
  room.stateFrame = '{"type":"state","seq":4,"data":{"round":1}}';
  room.seq = 4;
  // p2 leaves for good (its clientId no longer maps to its slot), p3 is kicked.
  room.byClientId.delete("p2");
  room.slots[3]!.kicked = true;
  room.slots[1]!.received = 17;
  return room;
}

/** Over the wire and back, as JSON. */
function moved(room: Room<string>, bounds = BOUNDS, ageMs = 0): Room<string> {
  const value = JSON.parse(JSON.stringify(roomToTransfer(room, "transfer-1", "old-machine", NOW_MS)));
  return roomFromTransfer<string>(value, bounds, NOW_MS + ageMs);
}

describe("slots", () => {
  test("a new slot takes the next index and the room's seq; indices are never reused", () => {
    const room = newRoom<string>({ code: "abcdef", maxClients: 2, origin: "o", creatorIp: "" });
    expect(addMember(room, "a").index).toBe(0);
    room.seq = 9;
    const b = addMember(room, "b");
    expect([b.index, b.sinceSeq]).toEqual([1, 9]);
    room.slots.pop();
    expect(room.byClientId.get("b")).toBe(b);
  });

  test("presentPeers lists the other present slots, ascending", () => {
    const room = playedRoom();
    room.slots[2]!.ws = null;
    expect(presentPeers(room, room.slots[1]!)).toEqual([0, 3]);
  });
});

describe("the transfer value", () => {
  test("a moved room has the same code, limits, url, state, seq and slots, with nobody present", () => {
    const before = playedRoom();
    const after = moved(before);
    expect({ code: after.code, maxClients: after.maxClients, url: after.url, origin: after.origin, seq: after.seq, state: after.stateFrame }).toEqual({
      code: before.code,
      maxClients: before.maxClients,
      url: before.url,
      origin: before.origin,
      seq: before.seq,
      state: before.stateFrame,
    });
    expect(after.slots.map((m) => [m.index, m.sinceSeq, m.kicked, m.received, m.ws])).toEqual([
      [0, 0, false, 0, null],
      [1, 0, false, 17, null],
      [2, 0, false, 0, null],
      [3, 0, true, 0, null],
    ]);
    expect(after.present).toBe(0);
    expect(after.transferId).toBe("transfer-1");
  });

  test("a released slot travels without its clientId (never reclaimable); a kicked one keeps it (still barred)", () => {
    const after = moved(playedRoom());
    expect(after.byClientId.has("p2")).toBe(false);
    expect(after.byClientId.get("p3")?.kicked).toBe(true);
    expect(roomToTransfer(playedRoom(), "t", "s", NOW_MS).slots[2]!.clientId).toBeNull();
  });

  test("the resume ring replays the same frames to each slot after the move", () => {
    const before = playedRoom();
    const after = moved(before);
    for (let slot = 0; slot < 4; slot++) {
      expect([...after.ring!.addressedTo(slot, 0)]).toEqual([...before.ring!.addressedTo(slot, 0)]);
    }
    expect([...after.ring!.addressedTo(3, 0)]).toEqual(['{"type":"message","from":0,"seq":1,"data":{"round":1}}', '{"type":"message","from":2,"seq":3,"data":"to two"}']);
    expect([...after.ring!.addressedTo(0, 0)]).toEqual(['{"type":"message","from":1,"seq":2,"data":"to host"}']);
  });

  test("a resume refused before the move is refused after it, and one accepted stays accepted", () => {
    const before = playedRoom();
    before.ring = new FrameRing(2, BOUNDS.maxBytes);
    before.seq = 0;
    for (let i = 0; i < 5; i++) relay(before, i % 2, i); // slots 0 and 1 broadcast; the ring keeps 2
    const after = moved(before);
    for (let slot = 0; slot < 4; slot++) {
      for (let seq = 0; seq <= 5; seq++) expect(after.ring!.lostSince(slot, seq)).toBe(before.ring.lostSince(slot, seq));
    }
  });

  test("an adopting machine with a smaller ring gives up the oldest frames, and knows it", () => {
    const after = moved(playedRoom(), { ...BOUNDS, maxFrames: 1 });
    expect(after.ring!.count).toBe(1);
    expect(after.ring!.lostSince(1, 0)).toBe(true);
  });

  test("with the resume buffer off, every frame is recorded as given up", () => {
    const after = moved(playedRoom(), { ...BOUNDS, keepFrames: false });
    expect(after.ring!.count).toBe(0);
    expect(after.ring!.lostSince(1, 0)).toBe(true);
  });

  test("frame ages travel, not timestamps: the receiver's clock places them", () => {
    const before = playedRoom();
    const value = roomToTransfer(before, "t", "s", NOW_MS + 250);
    expect(value.frames.map((f) => f.ageMs)).toEqual([250, 250, 250]);
    const after = roomFromTransfer<string>(value, BOUNDS, 5_000_000);
    expect([...after.ring!.records()].map((r) => r.atMs)).toEqual([4_999_750, 4_999_750, 4_999_750]);
  });

  test("what is left of the host grace travels; none when the host is present", () => {
    const room = playedRoom();
    expect(roomToTransfer(room, "t", "s", NOW_MS).hostGraceMs).toBeUndefined();
    room.hostGraceUntilMs = NOW_MS + 40_000;
    expect(roomToTransfer(room, "t", "s", NOW_MS + 1_000).hostGraceMs).toBe(39_000);
  });
});

describe("the join rules", () => {
  const room = () => {
    const r = newRoom<string>({ code: "abcdef", maxClients: 2, origin: "o", creatorIp: "" });
    addMember(r, "host").ws = "socket-host";
    addMember(r, "away");
    r.present = 1;
    return r;
  };

  test("a kicked clientId is refused, even when its slot is vacant and the room has space", () => {
    const r = room();
    r.slots[1]!.kicked = true;
    expect(joinVerdict(r, "away", 8)).toEqual({ kind: "refuse", code: "kicked" });
  });

  test("a live slot is taken over, even in a full room", () => {
    const r = room();
    r.maxClients = 1;
    expect(joinVerdict(r, "host", 8)).toMatchObject({ kind: "replace", member: { index: 0 } });
  });

  test("a vacant own slot comes back while the room has space, and waits when it is full", () => {
    const r = room();
    expect(joinVerdict(r, "away", 8)).toMatchObject({ kind: "reclaim", member: { index: 1 } });
    r.present = 2;
    expect(joinVerdict(r, "away", 8)).toEqual({ kind: "refuse", code: "room_full" });
  });

  test("a new clientId gets a new slot until the room has made maxSlots of them", () => {
    const r = room();
    expect(joinVerdict(r, "new", 3)).toEqual({ kind: "new" });
    expect(joinVerdict(r, "new", 2)).toEqual({ kind: "refuse", code: "room_full" });
  });
});

describe("the resume rules", () => {
  test("a resume inside the ring replays what came after it; never anything older than the slot", () => {
    const r = playedRoom();
    expect(resumePlan(r, r.slots[1]!, 1)).toEqual({ resumed: true, after: 1, oldest: 1 });
    r.slots[1]!.sinceSeq = 3;
    expect(resumePlan(r, r.slots[1]!, 0).after).toBe(3);
  });

  test("a resume from the future, one whose frames were given up, or none at all is not resumed", () => {
    const r = playedRoom();
    expect(resumePlan(r, r.slots[1]!, 99).resumed).toBe(false);
    expect(resumePlan(r, r.slots[1]!, undefined).resumed).toBe(false);
    r.ring!.dropOldest();
    expect(resumePlan(r, r.slots[3]!, 0)).toEqual({ resumed: false, after: 0, oldest: 2 });
  });
});
