// The room model (room.ts) driven without a socket: slots, the join and resume
// rules, the resume log and the transfer value a deploy hands to another machine.
// The "socket" of a member is a plain string here; the model only asks whether
// there is one.
import { describe, expect, test } from "bun:test";
import {
  accept,
  addMember,
  bar,
  DATA_FIELD,
  FrameWriter,
  isDuplicate,
  joinVerdict,
  kickVerdict,
  listTargets,
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
  type Recipients,
  type Room,
} from "../room.ts";

const NOW_MS = 1_000_000;
/** A machine's resume log: 1 MiB, and per room at most `roomFrames` frames of 64 KiB in all. */
const log = (roomFrames = 64) => new ResumeLog(1024 * 1024, roomFrames, 64 * 1024);

/** Relays `data` from slot `from` as the relay does: numbered, kept in the log. */
function relay(into: ResumeLog, room: Room<string>, from: number, data: unknown, to: Recipients = undefined): void {
  const seq = ++room.seq;
  const frame = new FrameWriter(Buffer.alloc(1024)).start(MESSAGE_HEAD).uint(from).raw(SEQ_FIELD).uint(seq).raw(DATA_FIELD).jsonThenClose(JSON.stringify(data));
  into.keep((room.frames ??= new RoomFrames()), seq, frame, from, to, NOW_MS);
}

/** A room with a host and three players, some traffic, a left slot and a kicked one. */
function playedRoom(into: ResumeLog): Room<string> {
  const room = newRoom<string>({ code: "abcdef", maxClients: 8, origin: "https://party.example", creatorIp: "1.2.3.4", url: "https://party.example/abcdef" });
  for (const id of ["host", "p1", "p2", "p3"]) addMember(room, id).ws = `socket-${id}`;
  room.present = 4;
  relay(into, room, 0, { round: 1 });
  relay(into, room, 1, "to host", 0);
  relay(into, room, 2, "to two", [1, 3]);
  room.stateFrame = '{"type":"state","seq":4,"data":{"round":1}}';
  room.seq = 4;
  // p2 leaves for good (its clientId no longer maps to its slot), p3 is kicked.
  room.byClientId.delete("p2");
  room.slots[3]!.kicked = true;
  room.slots[1]!.received = 17;
  return room;
}

/** Over the wire and back, as JSON, from the log `from` to the log `to` (undefined: resume off there). */
function moved(room: Room<string>, from: ResumeLog, to: ResumeLog | undefined): Room<string> {
  const value = JSON.parse(JSON.stringify(roomToTransfer(room, from, "transfer-1", "old-machine", NOW_MS)));
  return roomFromTransfer<string>(value, to, NOW_MS);
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
    const room = playedRoom(log());
    room.slots[2]!.ws = null;
    expect(presentPeers(room, room.slots[1]!)).toEqual([0, 3]);
  });
});

describe("the transfer value", () => {
  test("a moved room has the same code, limits, url, state, seq and slots, with nobody present", () => {
    const before = playedRoom(log());
    const after = moved(before, log(), log());
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
    const from = log();
    const room = playedRoom(from);
    expect(roomToTransfer(room, from, "t", "s", NOW_MS).slots[2]!.clientId).toBeNull();
    const after = moved(room, from, log());
    expect(after.byClientId.has("p2")).toBe(false);
    expect(after.byClientId.get("p3")?.kicked).toBe(true);
  });

  test("the resume frames replay the same to each slot after the move", () => {
    const from = log();
    const to = log();
    const before = playedRoom(from);
    const after = moved(before, from, to);
    for (let slot = 0; slot < 4; slot++) {
      expect([...to.addressedTo(after.frames!, slot, 0)]).toEqual([...from.addressedTo(before.frames!, slot, 0)]);
    }
    expect([...to.addressedTo(after.frames!, 3, 0)]).toEqual(['{"type":"message","from":0,"seq":1,"data":{"round":1}}', '{"type":"message","from":2,"seq":3,"data":"to two"}']);
    expect([...to.addressedTo(after.frames!, 0, 0)]).toEqual(['{"type":"message","from":1,"seq":2,"data":"to host"}']);
  });

  test("a resume refused before the move is refused after it, and one accepted stays accepted", () => {
    const from = log(2); // keeps 2 frames per room
    const before = newRoom<string>({ code: "abcdef", maxClients: 8, origin: "o", creatorIp: "" });
    for (const id of ["host", "p1", "p2"]) addMember(before, id);
    for (let i = 0; i < 5; i++) relay(from, before, i % 2, i); // slots 0 and 1 broadcast
    const after = moved(before, from, log());
    for (let slot = 0; slot < 3; slot++) {
      for (let seq = 0; seq <= 5; seq++) expect(after.frames!.lostSince(slot, seq)).toBe(before.frames!.lostSince(slot, seq));
    }
    expect(after.frames!.lostSince(2, 2)).toBe(true);
    expect(after.frames!.lostSince(2, 3)).toBe(false);
  });

  test("an adopting machine that keeps fewer frames per room gives up the oldest, and knows it", () => {
    const from = log();
    const after = moved(playedRoom(from), from, log(1));
    expect(after.frames!.count).toBe(1);
    expect(after.frames!.lostSince(1, 0)).toBe(true);
  });

  test("with resume off on the adopting machine, every frame is recorded as given up", () => {
    const from = log();
    const after = moved(playedRoom(from), from, undefined);
    expect(after.frames!.count).toBe(0);
    expect(after.frames!.lostSince(1, 0)).toBe(true);
  });

  test("frame ages travel, not timestamps; the adopting log keeps them a window from the adoption (it stays in time order)", () => {
    const from = log();
    const value = roomToTransfer(playedRoom(from), from, "t", "s", NOW_MS + 250);
    expect(value.frames.map((f) => f.ageMs)).toEqual([250, 250, 250]);
    const to = log();
    const after = roomFromTransfer<string>(value, to, 5_000_000);
    expect([...to.framesOf(after.frames!)].map((r) => r.atMs)).toEqual([5_000_000, 5_000_000, 5_000_000]);
  });

  test("what is left of the host grace travels; none when the host is present", () => {
    const from = log();
    const room = playedRoom(from);
    expect(roomToTransfer(room, from, "t", "s", NOW_MS).hostGraceMs).toBeUndefined();
    room.hostGraceUntilMs = NOW_MS + 40_000;
    expect(roomToTransfer(room, from, "t", "s", NOW_MS + 1_000).hostGraceMs).toBe(39_000);
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
  test("a resume inside the log replays what came after it; never anything older than the slot", () => {
    const into = log();
    const r = playedRoom(into);
    expect(resumePlan(r, r.slots[1]!, 1, into)).toEqual({ resumed: true, after: 1, oldest: 1 });
    r.slots[1]!.sinceSeq = 3;
    expect(resumePlan(r, r.slots[1]!, 0, into).after).toBe(3);
  });

  test("a resume from the future, one whose frames were given up, or none at all is not resumed", () => {
    const into = log(2); // keeps the last 2 frames of the 3
    const r = playedRoom(into);
    expect(resumePlan(r, r.slots[1]!, 99, into).resumed).toBe(false);
    expect(resumePlan(r, r.slots[1]!, undefined, into).resumed).toBe(false);
    expect(resumePlan(r, r.slots[3]!, 0, into)).toEqual({ resumed: false, after: 0, oldest: 2 });
  });
});

/** A room whose slots 0 (host), 1 and 2 are present and 3 is vacant. */
function fourSlots(): Room<string> {
  const room = newRoom<string>({ code: "abcdef", maxClients: 8, origin: "o", creatorIp: "" });
  for (const id of ["host", "p1", "p2", "p3"]) addMember(room, id).ws = `socket-${id}`;
  room.slots[3]!.ws = null;
  room.present = 3;
  return room;
}

describe("the kick rules", () => {
  test("only the host kicks; never itself, nor a slot that never existed", () => {
    const room = fourSlots();
    const host = room.slots[0]!;
    const p1 = room.slots[1]!;
    expect(kickVerdict(room, p1, 2)).toEqual({ kind: "refuse", code: "not_host" });
    expect(kickVerdict(room, host, 0)).toEqual({ kind: "refuse", code: "target_not_found" });
    expect(kickVerdict(room, host, 9)).toEqual({ kind: "refuse", code: "target_not_found" });
    expect(kickVerdict(room, host, 2)).toEqual({ kind: "kick", member: room.slots[2]! });
    expect(kickVerdict(room, host, 3)).toEqual({ kind: "kick", member: room.slots[3]! });
  });

  test("a barred slot is kicked once and its clientId never joins again, vacant or left", () => {
    const room = fourSlots();
    const host = room.slots[0]!;
    bar(room, room.slots[3]!);
    expect(kickVerdict(room, host, 3)).toEqual({ kind: "already" });
    expect(joinVerdict(room, "p3", 64)).toEqual({ kind: "refuse", code: "kicked" });
    // p2 left for good, then is kicked: its clientId is barred anew rather than taking a new slot.
    release(room, room.slots[2]!);
    expect(joinVerdict(room, "p2", 64)).toEqual({ kind: "new" });
    bar(room, room.slots[2]!);
    expect(joinVerdict(room, "p2", 64)).toEqual({ kind: "refuse", code: "kicked" });
  });

  test("a left slot whose clientId took a new slot keeps that new slot", () => {
    const room = fourSlots();
    release(room, room.slots[1]!);
    const again = addMember(room, "p1");
    bar(room, room.slots[1]!);
    expect(room.byClientId.get("p1")).toBe(again);
    expect(joinVerdict(room, "p1", 64).kind).not.toBe("refuse");
  });
});

describe("lossless sends", () => {
  test("a numbered frame at or below the slot's highest accepted n is a duplicate; an unnumbered one never", () => {
    const member = fourSlots().slots[1]!;
    expect(isDuplicate(member, 1)).toBe(false);
    accept(member, 3);
    expect([1, 2, 3, 4].map((n) => isDuplicate(member, n))).toEqual([true, true, true, false]);
    expect(isDuplicate(member, 0)).toBe(false);
    accept(member, 2); // an older n never lowers it
    expect(member.received).toBe(3);
  });
});

describe("the to-list rule", () => {
  test("present slots once each, in the order given; absent ones reported", () => {
    const room = fourSlots();
    expect(listTargets(room, [2, 1, 2, 3, 7, 0], 1)).toEqual({ targets: [2, 1, 0], missing: new Set([3, 7]) });
    expect(listTargets(room, [1, 1], 2)).toEqual({ targets: [1], missing: undefined });
  });
});
