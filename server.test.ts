// In-process relays built by the factory, real sockets, one describe per area
// of SPEC.md. Test names state the rule they prove.

import { afterEach, describe, expect, setSystemTime, test } from "bun:test";
import { CLOSES, ERRORS } from "./protocol.ts";
import { optionsFromEnv, DEFAULTS, type RelayOptions } from "./server.ts";
import { createRoom, joinRoom, RawClient, TestClient, testRelay, upgradeStatus, within, type Frame } from "./test/helpers.ts";
import { startProxy } from "./test/tcp-proxy.ts";

const BASE58_CODE = /^[1-9A-HJ-NP-Za-km-z]{6}$/;

let relays: ReturnType<typeof testRelay>[] = [];
function relay(options: Partial<RelayOptions> = {}) {
  const r = testRelay(options);
  relays.push(r);
  return r;
}
afterEach(async () => {
  await Promise.all(relays.map((r) => r.stop()));
  relays = [];
});

describe("create", () => {
  test("the creator gets a 6-char base58 code, slot 0, instance and region", async () => {
    const r = relay({ instanceId: "m1", region: "fra" });
    const { created } = await createRoom(r);
    expect(created.room).toMatch(BASE58_CODE);
    expect(created).toMatchObject({ type: "created", index: 0, instance: "m1", region: "fra", seq: 0 });
  });

  test("the server picks the code: a client room field is ignored", async () => {
    const r = relay();
    const { created } = await createRoom(r, "h", 4, { room: "ZZZZZZ" });
    expect(created.room).not.toBe("ZZZZZZ");
  });

  test("codes are unique across many rooms", async () => {
    const r = relay({ maxRoomsPerIp: 1000 });
    const host = await TestClient.connect(r.wsUrl);
    const codes = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const c = await TestClient.connect(r.wsUrl);
      c.send({ type: "create", clientId: `h${i}`, maxClients: 2 });
      codes.add((await c.next("created")).room);
    }
    expect(codes.size).toBe(200);
    host.close();
  });

  test("url template: placeholders filled, percent-encoded, returned in created, joined and /room", async () => {
    const r = relay({ instanceId: "m 1" });
    const { code, created } = await createRoom(r, "h", 4, { url: "https://game.example/play/{room}?i={instance}" });
    const expected = `https://game.example/play/${code}?i=m%201`;
    expect(created.url).toBe(expected);
    const { joined } = await joinRoom(r, code);
    expect(joined.url).toBe(expected);
    expect((await (await fetch(`${r.url}/room/${code}`)).json()).url).toBe(expected);
  });

  test.each([
    // Party-Sockets' own text for every scheme that is not https.
    ["http://game.example/{room}", "url must be an https URL"],
    ["javascript:alert(1)", "url must be an https URL"],
    ["wss://game.example/{room}", "url must be an https URL"],
    ["ftp://game.example/{room}", "url must be an https URL"],
    ["data:text/html,hi", "url must be an https URL"],
    ["/relative/{room}", "url must be an https URL"],
    ["https://", "url must be an absolute URL"],
    // Every brace belongs to a whole {room} or {instance}.
    ["https://p.example/{room", "url may only use the {room} and {instance} placeholders"],
    ["https://p.example/room}", "url may only use the {room} and {instance} placeholders"],
    ["https://p.example/{}", "url may only use the {room} and {instance} placeholders"],
    ["https://p.example/{{room}}", "url may only use the {room} and {instance} placeholders"],
    ["https://p.example/{ROOM}", "url may only use the {room} and {instance} placeholders"],
    ["https://p.example/{room}/{instance", "url may only use the {room} and {instance} placeholders"],
    ["https://game.example/a b", "url must not contain spaces or control characters"],
    ["https://game.example/\u0001", "url must not contain spaces or control characters"],
    ["https://game.example/{code}", "url may only use the {room} and {instance} placeholders"],
    ["https://game.example/" + "é".repeat(250), "url must be at most 512 bytes"],
    [42, "url must be a string"],
  ])("invalid_url for %p", async (url, message) => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId: "h", maxClients: 4, url });
    expect(await c.error("invalid_url")).toMatchObject({ message });
    expect(r.stats().rooms).toBe(0);
  });

  test("a url of exactly 512 UTF-8 bytes is accepted", async () => {
    const r = relay();
    const url = "https://game.example/" + "a".repeat(512 - 21);
    const { created } = await createRoom(r, "h", 4, { url });
    expect(created.url).toBe(url);
  });
});

describe("join and slots", () => {
  test("a joiner gets the next index and the present peers; peers get peer_joined", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    expect(a.joined).toMatchObject({ type: "joined", room: code, index: 1, peers: [0], instance: r.instanceId });
    expect(await host.next("peer_joined")).toEqual({ type: "peer_joined", index: 1 });
    const b = await joinRoom(r, code);
    expect(b.joined.index).toBe(2);
    expect(b.joined.peers).toEqual([0, 1]);
  });

  test("peers lists only present slots, ascending", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    await joinRoom(r, code);
    a.client.close();
    await host.next("peer_left");
    const c = await joinRoom(r, code);
    expect(c.joined.index).toBe(3);
    expect(c.joined.peers).toEqual([0, 2]);
  });

  test("maxClients caps present members and a disconnect frees the spot at once", async () => {
    const r = relay();
    const { host, code } = await createRoom(r, "h", 2);
    const a = await joinRoom(r, code);
    const late = await TestClient.connect(r.wsUrl);
    late.send({ type: "join", clientId: "late", room: code });
    await late.error("room_full");
    a.client.close();
    await host.next("peer_left");
    late.send({ type: "join", clientId: "late", room: code });
    expect((await late.next("joined")).index).toBe(2);
  });

  test("same clientId on a new socket replaces the old one: 4000, same slot, peers see nothing", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const first = await joinRoom(r, code, "phone");
    await host.next("peer_joined");
    const second = await joinRoom(r, code, "phone");
    expect(second.joined.index).toBe(first.joined.index);
    expect(await first.client.closeCode()).toEqual({ code: 4000, reason: "replaced" });
    await host.barrier();
    expect(host.pending("peer_left")).toEqual([]);
    expect(host.pending("peer_joined")).toEqual([]);
    host.send({ type: "send", data: "after" });
    expect((await second.client.next("message")).data).toBe("after");
  });

  test("a vacant slot is reclaimed by its clientId: same index, peers get peer_joined", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    await host.next("peer_joined");
    a.client.close();
    expect(await host.next("peer_left")).toEqual({ type: "peer_left", index: 1 });
    const again = await joinRoom(r, code, "phone");
    expect(again.joined.index).toBe(1);
    expect(await host.next("peer_joined")).toEqual({ type: "peer_joined", index: 1 });
  });

  test("a reclaim after the room refilled gets Room is full", async () => {
    const r = relay();
    const { host, code } = await createRoom(r, "h", 2);
    const a = await joinRoom(r, code, "phone");
    a.client.close();
    await host.next("peer_left");
    await joinRoom(r, code, "someone-else");
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code });
    expect(await back.error("room_full")).toMatchObject({ message: "Room is full" });
  });

  test("a peer without the clientId cannot evict anyone", async () => {
    const r = relay();
    const { host, code } = await createRoom(r, "host-secret", 3);
    const a = await joinRoom(r, code, "phone-secret");
    const intruder = await joinRoom(r, code, "guess");
    expect(intruder.joined.index).toBe(2);
    await host.barrier();
    await a.client.barrier();
    expect(a.client.ws.readyState).toBe(WebSocket.OPEN);
    expect(host.ws.readyState).toBe(WebSocket.OPEN);
  });

  test("slot indices are never reassigned: a new clientId after churn takes a fresh index", async () => {
    const r = relay();
    const { host, code } = await createRoom(r, "h", 2);
    for (let i = 1; i <= 3; i++) {
      const g = await joinRoom(r, code, `g${i}`);
      expect(g.joined.index).toBe(i);
      g.client.close();
      await host.next("peer_left");
    }
  });

  test("room_not_found, invalid_room and already_in_room", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "join", clientId: "x", room: "nope12" });
    expect(await c.error("room_not_found")).toMatchObject({ message: "Room not found" });
    for (const room of [undefined, "", 42]) {
      c.send({ type: "join", clientId: "x", room });
      expect(await c.error("invalid_room")).toMatchObject({ message: "room is required" });
    }
    host.send({ type: "join", clientId: "y", room: code });
    expect(await host.error("already_in_room")).toMatchObject({ message: "Already in a room" });
    host.send({ type: "create", clientId: "y", maxClients: 2 });
    await host.error("already_in_room");
  });
});

describe("send", () => {
  test("a broadcast reaches every other present member, not the sender, with from = slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const b = await joinRoom(r, code);
    a.client.send({ type: "send", data: { n: 1, s: "é" } });
    for (const c of [host, b.client]) expect(await c.next("message")).toEqual({ type: "message", from: 1, seq: 1, data: { n: 1, s: "é" } });
    await a.client.barrier();
    expect(a.client.pending("message")).toEqual([]);
  });

  test("to: n reaches only slot n, including the sender's own slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const b = await joinRoom(r, code);
    host.send({ type: "send", to: 2, data: "for b" });
    expect(await b.client.next("message")).toEqual({ type: "message", from: 0, seq: 1, data: "for b" });
    host.send({ type: "send", to: 0, data: "self" });
    expect(await host.next("message")).toEqual({ type: "message", from: 0, seq: 2, data: "self" });
    await a.client.barrier();
    expect(a.client.pending("message")).toEqual([]);
  });

  test("to: [..] delivers once per present slot and lists the missing ones", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send({ type: "send", to: [1, 1, 7, 0, 7], data: "hi" });
    expect(await a.client.next("message")).toEqual({ type: "message", from: 0, seq: 1, data: "hi" });
    expect(await host.next("message")).toEqual({ type: "message", from: 0, seq: 1, data: "hi" });
    expect(await host.error("target_not_found")).toEqual({
      type: "error",
      code: "target_not_found",
      message: "Target peer not found",
      missing: [7],
    });
    await a.client.barrier();
    expect(a.client.pending("message")).toEqual([]);
  });

  test("to: n for an absent slot is target_not_found and nothing is delivered", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send({ type: "send", to: 5, data: "x" });
    expect(await host.error("target_not_found")).toMatchObject({ message: "Target peer not found" });
    await a.client.barrier();
    expect(a.client.pending("message")).toEqual([]);
  });

  test.each([[-1], [1.5], ["1"], ["0"], [-0.5], [1e300], [true], [[]], [[1, "2"]], [null], [{}]])(
    "to: %p is answered as Party-Sockets does, Target peer not found, and nothing is delivered",
    async (to) => {
      const r = relay();
      const { host, code } = await createRoom(r);
      const a = await joinRoom(r, code);
      host.send({ type: "send", to, data: "x" });
      expect(await host.error("target_not_found")).toEqual({ type: "error", code: "target_not_found", message: "Target peer not found" });
      await a.client.barrier();
      expect(a.client.pending("message")).toEqual([]);
    },
  );

  test("data of every JSON kind round-trips exactly; a send without data relays no data field", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const values = [null, 0, -1.5e300, "", "\u2028\ud83c\udf89\"\\", [1, [2]], { a: { b: [true, false] } }];
    for (const data of values) host.send({ type: "send", data });
    for (const data of values) expect((await a.client.next("message")).data).toEqual(data);
    host.send({ type: "send" });
    expect(await a.client.next("message")).toEqual({ type: "message", from: 0, seq: values.length + 1 });
  });

  test("frames from one sender arrive in order", async () => {
    const r = relay({ rateLimitPerSec: 0 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    for (let i = 0; i < 500; i++) host.send({ type: "send", data: i });
    for (let i = 0; i < 500; i++) expect((await a.client.next("message")).data).toBe(i);
  });

  test("peer_joined reaches a peer before any message from the new slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "join", clientId: "g", room: code });
    c.send({ type: "send", data: "first" });
    await host.next("message");
    await host.next("peer_joined");
    expect(host.raw.findIndex((t) => t.includes("peer_joined"))).toBeLessThan(host.raw.findIndex((t) => t.includes("first")));
  });

  test("data is relayed as written: the message is valid JSON with exactly the relay's fields", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const frames = [
      '{"type":"send","data":[1.0,1e2,"\\u00e9",-0]}',
      '{"type":"send","to":1,"data":{"k":[true,null]} }',
      '{"type":"send","data":1,"from":7,"seq":0}',
      '{"type":"send","data":{"a":1},"to":1}',
      '{"type":"send","data":"x","data":"y"}',
    ];
    for (const f of frames) host.send(f);
    for (let i = 0; i < frames.length; i++) {
      const m = await a.client.next("message");
      expect(Object.keys(m).sort()).toEqual(["data", "from", "seq", "type"]);
      expect(m.from).toBe(0);
      expect(m.seq).toBe(i + 1);
    }
    expect(a.client.raw.at(-5)).toEndWith(',"data":[1.0,1e2,"\\u00e9",-0]}');
    const data = a.client.raw.slice(-5).map((t) => JSON.parse(t).data);
    expect(data).toEqual([[1, 100, "é", -0], { k: [true, null] }, 1, { a: 1 }, "y"]);
  });

  test.each([
    ['{"type":"send","data":1,"type":"x"}', "unknown_type"],
    ['{"type":"send","to":01,"data":1}', "invalid_json"],
    ['{"type":"send","data":}', "invalid_json"],
    ['{"type":"send","data":1,}', "invalid_json"],
    ['{"type":"send","to":1.5,"data":1}', "target_not_found"],
    ['{"type":"send","to":-1,"data":1}', "target_not_found"],
    ['{"type":"send","to":9999999999,"data":1}', "target_not_found"],
  ])("%s is rejected with %s", async (frame, code) => {
    const r = relay();
    const { host, code: room } = await createRoom(r);
    const a = await joinRoom(r, room);
    host.send(frame);
    await host.error(code);
    await a.client.barrier();
    expect(a.client.pending("message")).toEqual([]);
  });

  test("send outside a room is not_in_room", async () => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "send", data: 1 });
    expect(await c.error("not_in_room")).toMatchObject({ message: "Not in a room" });
  });
});

describe("state", () => {
  test("set_state reaches the others and is replayed right after joined; null is a value", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send({ type: "set_state", data: { round: 2 } });
    expect(await a.client.next("state")).toEqual({ type: "state", seq: 1, data: { round: 2 } });
    host.send({ type: "set_state", data: null });
    expect(await a.client.next("state")).toEqual({ type: "state", seq: 2, data: null });
    const b = await TestClient.connect(r.wsUrl);
    b.send({ type: "join", clientId: "b", room: code });
    await b.next("joined");
    await b.next("state");
    expect(b.raw).toEqual([expect.stringContaining('"joined"'), JSON.stringify({ type: "state", seq: 2, data: null })]);
    await host.barrier();
    expect(host.pending("state")).toEqual([]);
  });

  test("no state frame after joined when no snapshot exists", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    const a = await joinRoom(r, code);
    await a.client.barrier();
    expect(a.client.pending("state")).toEqual([]);
  });

  test("only the host can set state", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    const a = await joinRoom(r, code);
    a.client.send({ type: "set_state", data: 1 });
    expect(await a.client.error("not_host")).toMatchObject({ message: "Only the host can set state" });
  });

  test("state_required without data; not_in_room outside a room", async () => {
    const r = relay();
    const { host } = await createRoom(r);
    host.send({ type: "set_state" });
    expect(await host.error("state_required")).toMatchObject({ message: "State data is required" });
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "set_state", data: 1 });
    await c.error("not_in_room");
  });

  test("the state cap counts UTF-8 bytes, not characters", async () => {
    const r = relay({ maxStateBytes: 100 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    // "é" is 2 bytes: 40 of them plus quotes is 82 bytes (fits), 50 is 102 (does not).
    host.send({ type: "set_state", data: "é".repeat(50) });
    expect(await host.error("state_too_large")).toMatchObject({ message: "State too large" });
    host.send({ type: "set_state", data: "é".repeat(40) });
    expect((await a.client.next("state")).data).toBe("é".repeat(40));
  });

  test("a rejected set_state keeps the previous snapshot", async () => {
    const r = relay({ maxStateBytes: 50 });
    const { host, code } = await createRoom(r);
    host.send({ type: "set_state", data: "keep" });
    host.send({ type: "set_state", data: "x".repeat(100) });
    await host.error("state_too_large");
    const a = await joinRoom(r, code);
    expect((await a.client.next("state")).data).toBe("keep");
  });
});

describe("close_room, leave, host grace", () => {
  test("close_room ends the room for everyone with 4001 and /room turns 404 at once", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send({ type: "close_room" });
    expect(await host.closeCode()).toEqual({ code: 4001, reason: "room closed" });
    expect(await a.client.closeCode()).toEqual({ code: 4001, reason: "room closed" });
    expect((await fetch(`${r.url}/room/${code}`)).status).toBe(404);
  });

  test("only the host can close the room; outside a room it is not_in_room", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    const a = await joinRoom(r, code);
    a.client.send({ type: "close_room" });
    expect(await a.client.error("not_host")).toMatchObject({ message: "Only the host can close the room" });
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "close_room" });
    await c.error("not_in_room");
  });

  test("leave: left to the leaver, peer_left to the others; the clientId then takes a new slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    await host.next("peer_joined");
    a.client.send({ type: "leave" });
    expect(await a.client.next("left")).toEqual({ type: "left", room: code });
    expect(await host.next("peer_left")).toEqual({ type: "peer_left", index: 1 });
    a.client.send({ type: "join", clientId: "phone", room: code });
    expect((await a.client.next("joined")).index).toBe(2);
  });

  test("after leave the socket stays open and may create a room", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    const a = await joinRoom(r, code);
    a.client.send({ type: "leave" });
    await a.client.next("left");
    a.client.send({ type: "create", clientId: "new", maxClients: 2 });
    expect((await a.client.next("created")).index).toBe(0);
  });

  test("a host leave closes the room: everyone, host included, gets 4001 and no left", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send({ type: "leave" });
    expect(await host.closeCode()).toEqual({ code: 4001, reason: "room closed" });
    expect(await a.client.closeCode()).toEqual({ code: 4001, reason: "room closed" });
    expect(host.pending("left")).toEqual([]);
  });

  test("leave outside a room is not_in_room", async () => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "leave" });
    await c.error("not_in_room");
  });

  test("a room with no present member is deleted at once", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    a.client.close();
    await host.next("peer_left");
    host.close();
    await host.closed;
    await within(
      (async () => {
        while ((await fetch(`${r.url}/room/${code}`)).status !== 404);
      })(),
      "the empty room to be deleted",
    );
    expect(r.stats()).toEqual({ rooms: 0, clients: 0 });
  });

  test("a host absent for HOST_GRACE_MS closes the room with 4001", async () => {
    const r = relay({ hostGraceMs: 150 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.close();
    expect(await a.client.next("peer_left")).toEqual({ type: "peer_left", index: 0 });
    expect(await a.client.closeCode()).toEqual({ code: 4001, reason: "room closed" });
    expect((await fetch(`${r.url}/room/${code}`)).status).toBe(404);
  });

  test("a host reclaim inside the grace window cancels the close", async () => {
    const graceMs = 300;
    const r = relay({ hostGraceMs: graceMs });
    const { host, code, clientId } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.close();
    await a.client.next("peer_left");
    const back = await joinRoom(r, code, clientId);
    expect(back.joined.index).toBe(0);
    expect(await a.client.next("peer_joined")).toEqual({ type: "peer_joined", index: 0 });
    // Proving a negative needs the deadline to pass: wait past the grace window.
    await Bun.sleep(graceMs * 2);
    await a.client.barrier();
    expect(a.client.ws.readyState).toBe(WebSocket.OPEN);
    expect((await fetch(`${r.url}/room/${code}`)).status).toBe(200);
  });
});

describe("kick", () => {
  test("a kicked member gets 4004 kicked, the others peer_left, the host no extra frame", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const b = await joinRoom(r, code);
    await host.next("peer_joined");
    await host.next("peer_joined");
    await a.client.next("peer_joined");
    host.send({ type: "kick", index: 1 });
    expect(await a.client.closeCode()).toEqual({ code: 4004, reason: "kicked" });
    expect(await host.next("peer_left")).toEqual({ type: "peer_left", index: 1 });
    expect(await b.client.next("peer_left")).toEqual({ type: "peer_left", index: 1 });
    await host.barrier();
    expect(host.frames).toEqual([]);
    expect(CLOSES.kicked).toEqual({ code: 4004, reason: "kicked" });
  });

  test("a kicked clientId cannot join again, with or without resume: kicked, and nothing changes", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "troll");
    await host.next("peer_joined");
    host.send({ type: "send", data: "for the troll", to: 1 });
    await a.client.next("message");
    host.send({ type: "kick", index: 1 });
    await a.client.closeCode();
    await host.next("peer_left");
    for (const resume of [undefined, 0]) {
      const again = await TestClient.connect(r.wsUrl);
      again.send({ type: "join", clientId: "troll", room: code, resume });
      expect(await again.error("kicked")).toEqual({ type: "error", code: "kicked", message: "Removed by the host" });
      await again.barrier();
      expect(again.frames).toEqual([]); // no joined, no replayed message, no state
    }
    await host.barrier();
    expect(host.pending("peer_joined")).toEqual([]);
    expect(ERRORS.kicked).toBe("Removed by the host");
  });

  test("a kicked slot frees its maxClients place at once; a new clientId takes a new slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r, "host", 2);
    await joinRoom(r, code);
    const full = await TestClient.connect(r.wsUrl);
    full.send({ type: "join", clientId: "newcomer", room: code });
    await full.error("room_full");
    host.send({ type: "kick", index: 1 });
    await host.next("peer_left");
    full.send({ type: "join", clientId: "newcomer", room: code });
    expect((await full.next("joined")).index).toBe(2);
  });

  test("kicking a vacant slot bars its clientId too, and tells nobody", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "dropped");
    await host.next("peer_joined");
    a.client.close();
    await host.next("peer_left");
    host.send({ type: "kick", index: 1 });
    await host.barrier();
    expect(host.frames).toEqual([]);
    const again = await TestClient.connect(r.wsUrl);
    again.send({ type: "join", clientId: "dropped", room: code });
    await again.error("kicked");
  });

  test("kicking a slot that left bars its clientId from coming back as a new slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "leaver");
    a.client.send({ type: "leave" });
    await a.client.next("left");
    await host.next("peer_left");
    host.send({ type: "kick", index: 1 });
    await host.barrier();
    a.client.send({ type: "join", clientId: "leaver", room: code });
    await a.client.error("kicked");
  });

  test("kicking an already kicked slot is a no-op without error", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    await host.next("peer_joined");
    host.send({ type: "kick", index: 1 });
    await a.client.closeCode();
    await host.next("peer_left");
    host.send({ type: "kick", index: 1 });
    await host.barrier();
    expect(host.frames).toEqual([]);
  });

  test("the host's own slot, a slot that never existed, a malformed index: target_not_found", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    for (const index of [0, 2, 1e9, -1, 1.5, "1", null, [1], undefined]) {
      host.send({ type: "kick", index });
      await host.error("target_not_found");
    }
    host.send({ type: "send", data: "still here" });
    expect((await a.client.next("message")).data).toBe("still here");
  });

  test("only the host can kick; outside a room it is not_in_room", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const b = await joinRoom(r, code);
    a.client.send({ type: "kick", index: 2 });
    expect(await a.client.error("not_host")).toMatchObject({ message: "Only the host can kick" });
    a.client.send({ type: "kick", index: 0 });
    await a.client.error("not_host");
    await b.client.barrier();
    expect(b.client.pending("peer_left")).toEqual([]);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "kick", index: 1 });
    await c.error("not_in_room");
  });

  test("a kick is logged with the room and slot, and counted as a 4004 close; no clientId anywhere", async () => {
    const r = relay();
    const { host, code } = await createRoom(r, "host-secret-id");
    const a = await joinRoom(r, code, "guest-secret-id");
    host.send({ type: "kick", index: 1 });
    await a.client.closeCode();
    const kick = r.logs.map((l) => JSON.parse(l)).find((l) => l.event === "member_kicked");
    expect(kick).toMatchObject({ room: code, index: 1 });
    const metrics = await (await fetch(`${r.url}/metrics`)).text();
    expect(metrics).toMatch(/party_sockets_closes_total\{[^}]*code="4004"\} 1/);
    expect(r.logs.join("\n") + metrics).not.toContain("secret-id");
  });
});

describe("origin allow-list (ALLOWED_ORIGINS)", () => {
  const origin = (value: string) => ({ Origin: value });

  test("empty by default: every page, `null` and no Origin at all are admitted, as before", async () => {
    const r = relay();
    for (const headers of [origin("https://anything.example"), origin("null"), {}]) expect(await upgradeStatus(r.port, headers)).toBe(101);
    const metrics = await (await fetch(`${r.url}/metrics`)).text();
    expect(metrics).toMatch(/party_sockets_origin_refusals_total\{[^}]*reason="not_listed"\} 0/);
  });

  test("exact origins: listed ones are admitted; other sites, schemes and ports get 403 before any upgrade", async () => {
    const r = relay({ allowedOrigins: ["https://game.example", "http://localhost:5173"] });
    expect(await upgradeStatus(r.port, origin("https://game.example"))).toBe(101);
    expect(await upgradeStatus(r.port, origin("http://localhost:5173"))).toBe(101);
    for (const refused of ["https://other.example", "http://game.example", "https://game.example:8443", "https://a.game.example", "http://localhost:3000"]) {
      expect(await upgradeStatus(r.port, origin(refused))).toBe(403);
    }
    const res = await fetch(r.url, { headers: { Upgrade: "websocket", Connection: "Upgrade", Origin: "https://other.example" } });
    expect(res.status).toBe(403);
    expect(await res.text()).toBe("Origin not allowed\n");
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
    // A refused page never had a socket: only the two admitted upgrades were ever opened.
    const metrics = await (await fetch(`${r.url}/metrics`)).text();
    const opened = [...metrics.matchAll(/^party_sockets_connections_total\{[^}]*\} (\d+)$/gm)].reduce((sum, m) => sum + Number(m[1]), 0);
    expect(opened).toBe(2);
    expect(metrics).toMatch(/party_sockets_origin_refusals_total\{[^}]*reason="not_listed"\} 6/);
  });

  test("a wildcard admits subdomains of any depth, with the same scheme and port, and nothing else", async () => {
    const r = relay({ allowedOrigins: ["https://*.game.example"] });
    for (const admitted of ["https://a.game.example", "https://a-b.c.game.example"]) expect(await upgradeStatus(r.port, origin(admitted))).toBe(101);
    const refused = [
      "https://game.example",
      "https://evilgame.example",
      "https://a.game.example.evil.example",
      "http://a.game.example",
      "https://a.game.example:444",
      "https://.game.example",
      "https://a@b.game.example",
    ];
    for (const o of refused) expect(await upgradeStatus(r.port, origin(o))).toBe(403);
  });

  test("case and a trailing slash do not matter, in the list or in the header", async () => {
    const r = relay({ allowedOrigins: ["https://Game.Example/", "https://*.Party.Example"] });
    for (const o of ["https://game.example", "HTTPS://GAME.EXAMPLE", "https://game.example/", "https://TV.party.example"]) {
      expect(await upgradeStatus(r.port, origin(o))).toBe(101);
    }
  });

  test("`null` (sandboxed frames, file: pages) is refused once a list is set, and cannot be listed", async () => {
    const r = relay({ allowedOrigins: ["https://game.example"] });
    expect(await upgradeStatus(r.port, origin("null"))).toBe(403);
    expect(() => testRelay({ allowedOrigins: ["null"] })).toThrow("ALLOWED_ORIGINS");
  });

  test("no Origin header (native apps, scripts) is admitted unless ALLOWED_ORIGINS_REQUIRE", async () => {
    const open = relay({ allowedOrigins: ["https://game.example"] });
    expect(await upgradeStatus(open.port)).toBe(101);
    const strict = relay({ allowedOrigins: ["https://game.example"], allowedOriginsRequire: true });
    expect(await upgradeStatus(strict.port)).toBe(403);
    expect(await upgradeStatus(strict.port, origin("https://game.example"))).toBe(101);
    const metrics = await (await fetch(`${strict.url}/metrics`)).text();
    expect(metrics).toMatch(/party_sockets_origin_refusals_total\{[^}]*reason="missing"\} 1/);
  });

  test("a refusal is logged with the origin only, at most once per second; HTTP routes are not affected", async () => {
    const r = relay({ allowedOrigins: ["https://game.example"] });
    for (let i = 0; i < 5; i++) expect(await upgradeStatus(r.port, origin("https://intruder.example"))).toBe(403);
    const lines = r.logs.map((l) => JSON.parse(l)).filter((l) => l.event === "origin_refused");
    expect(lines.length).toBe(1);
    const { t: _t, ...fields } = lines[0];
    expect(fields).toEqual({ level: "warn", event: "origin_refused", origin: "https://intruder.example", reason: "not_listed" });
    const health = await fetch(`${r.url}/health`, { headers: { Origin: "https://intruder.example" } });
    expect(health.status).toBe(200);
  });

  test("entries that are not origins stop the relay from starting, with the variable's name", () => {
    for (const bad of ["game.example", "https://game.example/play", "https://*game.example", "ftp://*.game.example", "https://game.example?x"]) {
      expect(() => testRelay({ allowedOrigins: [bad] })).toThrow("ALLOWED_ORIGINS");
    }
  });
});

describe("code guessing (per-IP miss budget)", () => {
  /** Frames from one socket, sent at once, then every answer awaited. */
  async function joinMany(c: TestClient, codes: string[]): Promise<Frame[]> {
    for (const room of codes) c.send({ type: "join", clientId: "guesser", room });
    const answers: Frame[] = [];
    for (let i = 0; i < codes.length; i++) answers.push(await c.next("error"));
    return answers;
  }
  const randomCodes = (n: number) => Array.from({ length: n }, () => crypto.randomUUID().slice(0, 6));
  const count = (xs: (string | number)[]) => Object.fromEntries([...new Set(xs)].map((x) => [x, xs.filter((y) => y === x).length]));
  async function lookupMany(base: string, codes: string[], headers: Record<string, string> = {}): Promise<Response[]> {
    const answers: Response[] = [];
    for (let at = 0; at < codes.length; at += 50) {
      answers.push(...(await Promise.all(codes.slice(at, at + 50).map((code) => fetch(`${base}/room/${code}`, { headers })))));
    }
    return answers;
  }
  const metric = async (r: { url: string }, name: string, label: string) => {
    const line = (await (await fetch(`${r.url}/metrics`)).text()).split("\n").find((l) => l.startsWith(name + "{") && l.includes(label));
    return Number(line?.split(" ").at(-1));
  };

  test("the defaults: 20 misses in a burst, then one per 3 s", () => {
    expect([DEFAULTS.missBurstMisses, DEFAULTS.missRefillMs]).toEqual([20, 3000]);
  });

  test("1000 joins and 1000 lookups of random codes from one IP: past the burst every miss is refused", async () => {
    // No refill within the test, so the counts are exact; the per-frame rate limit off to send 1000 joins at once.
    const r = relay({ hostname: DEFAULTS.hostname, missRefillMs: 3_600_000, rateLimitPerSec: 0 });
    const guesser = await TestClient.connect(`ws://127.0.0.1:${r.port}`);
    const joins = await joinMany(guesser, randomCodes(1000));
    expect(count(joins.map((f) => f.code))).toEqual({ room_not_found: 20, rate_limited: 980 });
    expect(joins.find((f) => f.code === "rate_limited")).toMatchObject({ message: "Too many unknown room codes; retry later" });
    expect(joins.find((f) => f.code === "rate_limited")!.retryAfterMs).toBeGreaterThan(0);
    // One budget per IP: the joins spent it, the lookups get 429 with Retry-After.
    const lookups = await lookupMany(`http://127.0.0.1:${r.port}`, randomCodes(1000));
    expect(count(lookups.map((res) => res.status))).toEqual({ 429: 1000 });
    expect(Number(lookups[0]!.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect(await lookups[0]!.json()).toEqual({ error: "Too many unknown room codes" });
    expect(lookups[0]!.headers.get("access-control-allow-origin")).toBe("*");
    expect(await metric(r, "party_sockets_lookups_refused_total", 'via="join"')).toBe(980);
    expect(await metric(r, "party_sockets_lookups_refused_total", 'via="http"')).toBe(1000);

    // Another IP (IPv6 loopback) has its own budget.
    const other = await TestClient.connect(`ws://[::1]:${r.port}`);
    expect(count((await joinMany(other, randomCodes(30))).map((f) => f.code))).toEqual({ room_not_found: 20, rate_limited: 10 });
    expect((await fetch(`http://[::1]:${r.port}/room/zzzzzz`)).status).toBe(429);
  });

  test("with the budget spent a live code gets the same refusal as a miss; a reclaim of one's own slot is never refused", async () => {
    const r = relay({ missBurstMisses: 3, missRefillMs: 3_600_000, rateLimitPerSec: 0 });
    const { host, code } = await createRoom(r);
    const player = await joinRoom(r, code, "player");
    await host.next("peer_joined");
    const guesser = await TestClient.connect(r.wsUrl);
    await joinMany(guesser, randomCodes(3));
    // Spent: a live room and a dead code now get one and the same answer.
    guesser.send({ type: "join", clientId: "guesser", room: code });
    expect(await guesser.error("rate_limited")).toMatchObject({ message: "Too many unknown room codes; retry later" });
    expect((await fetch(`${r.url}/room/${code}`)).status).toBe(429);
    // The player's phone drops and comes back from the same IP: its rejoin is a reclaim, never asked.
    player.client.close();
    await host.next("peer_left");
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "player", room: code, resume: 0 });
    expect(await back.next("joined")).toMatchObject({ index: 1, resumed: true });
    // Creating rooms is no lookup.
    const another = await TestClient.connect(r.wsUrl);
    another.send({ type: "create", clientId: "new-host", maxClients: 2 });
    await another.next("created");
  });

  test("hits never take a token: once one is back, a join to a live room succeeds and the next miss is still answered", async () => {
    // The clock jumps below: the heartbeat must not take that for silence.
    const r = relay({ missBurstMisses: 2, missRefillMs: 1000, rateLimitPerSec: 0, heartbeatIntervalMs: 600_000, heartbeatTimeoutMs: 600_000 });
    const { code } = await createRoom(r);
    const c = await TestClient.connect(r.wsUrl);
    try {
      await joinMany(c, randomCodes(2));
      c.send({ type: "join", clientId: "late-player", room: code });
      await c.error("rate_limited");
      setSystemTime(new Date(Date.now() + 1000));
      for (let i = 0; i < 3; i++) {
        const hit = await fetch(`${r.url}/room/${code}`);
        expect(hit.status).toBe(200);
      }
      c.send({ type: "join", clientId: "late-player", room: code });
      expect((await c.next("joined")).index).toBe(1);
      const d = await TestClient.connect(r.wsUrl);
      expect((await joinMany(d, randomCodes(2))).map((f) => f.code)).toEqual(["room_not_found", "rate_limited"]);
    } finally {
      setSystemTime();
    }
  });

  test("a flood from 100 000 addresses keeps the per-IP state bounded; past the cap new addresses share one budget", async () => {
    const r = relay({ flyAppName: "guess-test", missRefillMs: 3_600_000, logLevel: "warn" });
    const ipOf = (i: number) => `10.${i >> 16}.${(i >> 8) & 255}.${i & 255}`;
    Bun.gc(true);
    const heapBefore = process.memoryUsage().heapUsed;
    let next = 0;
    const statuses: number[] = [];
    await Promise.all(
      Array.from({ length: 64 }, async () => {
        for (let i = next++; i < 100_000; i = next++) {
          const res = await fetch(`${r.url}/room/nope`, { headers: { "Fly-Client-IP": ipOf(i) } });
          await res.arrayBuffer();
          statuses.push(res.status);
        }
      }),
    );
    // 10 000 addresses tracked (one miss each), then one shared bucket of 20 for all the rest.
    expect(count(statuses)).toEqual({ 404: 10_000 + 20, 429: 100_000 - 10_020 });
    expect(await metric(r, "party_sockets_miss_budget_ips", "")).toBe(10_000);
    Bun.gc(true);
    expect((process.memoryUsage().heapUsed - heapBefore) / 2 ** 20).toBeLessThan(32);
    // An address seen before keeps its own budget.
    expect((await fetch(`${r.url}/room/nope`, { headers: { "Fly-Client-IP": ipOf(0) } })).status).toBe(404);
  }, 60_000);

  test("buckets that are full again are forgotten by the sweep", async () => {
    const r = relay({ missRefillMs: 1000, heartbeatIntervalMs: 20, heartbeatTimeoutMs: 600_000 });
    await lookupMany(r.url, randomCodes(5));
    expect(await metric(r, "party_sockets_miss_budget_ips", "")).toBe(1);
    try {
      setSystemTime(new Date(Date.now() + 20 * 1000));
      await within(
        (async () => {
          while ((await metric(r, "party_sockets_miss_budget_ips", "")) !== 0) await new Promise((resolve) => setImmediate(resolve));
        })(),
        "the sweep to forget a refilled bucket",
      );
    } finally {
      setSystemTime();
    }
  });

  test("a peer's probe (no Fly-Client-IP) is never charged; a request through the proxy that claims to be one is", async () => {
    const r = relay({ flyAppName: "guess-test", missBurstMisses: 1, missRefillMs: 3_600_000 });
    const probe = { "x-party-sockets-probe": "peer-1" };
    for (let i = 0; i < 5; i++) expect((await fetch(`${r.url}/room/nope`, { headers: probe })).status).toBe(404);
    const forged = { ...probe, "Fly-Client-IP": "203.0.113.9" };
    expect((await fetch(`${r.url}/room/nope`, { headers: forged })).status).toBe(404);
    expect((await fetch(`${r.url}/room/nope`, { headers: forged })).status).toBe(429);
  });

  test("MISS_BURST_MISSES=0 turns the budget off", async () => {
    const r = relay({ missBurstMisses: 0, rateLimitPerSec: 0 });
    const c = await TestClient.connect(r.wsUrl);
    expect(count((await joinMany(c, randomCodes(100))).map((f) => f.code))).toEqual({ room_not_found: 100 });
    expect(count((await lookupMany(r.url, randomCodes(100))).map((res) => res.status))).toEqual({ 404: 100 });
  });

  test("/room/<code> tells clients, maxClients, origin and url, and nothing else (no slots, no instance in the body)", async () => {
    const r = relay({ instanceId: "m-9" });
    const { host, code } = await createRoom(r, "h", 4, { url: "https://game.example/{room}" });
    const a = await joinRoom(r, code, "kicked-one");
    await joinRoom(r, code, "stays");
    host.send({ type: "kick", index: 1 });
    await a.client.closeCode();
    const res = await fetch(`${r.url}/room/${code}`);
    const body = await res.json();
    expect(Object.keys(body).sort()).toEqual(["clients", "maxClients", "origin", "url"]);
    expect(body).toEqual({ clients: 2, maxClients: 4, origin: "unknown", url: `https://game.example/${code}` });
    expect(res.headers.get("x-instance-id")).toBe("m-9");
  });
});

describe("ping", () => {
  test("pong echoes id and carries the server clock", async () => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    const before = Date.now();
    c.send({ type: "ping", id: "abc" });
    const pong = await c.next("pong");
    expect(pong.id).toBe("abc");
    expect(pong.t).toBeGreaterThanOrEqual(before);
    expect(pong.t).toBeLessThanOrEqual(Date.now());
    c.send({ type: "ping" });
    expect(Object.keys(await c.next("pong")).sort()).toEqual(["t", "type"]);
  });
});

describe("validation errors", () => {
  test.each([["not json"], ["null"], ["[]"], ["5"], ['"str"'], ["true"], ["{"]])("%p is invalid_json", async (frame) => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    c.send(frame);
    expect(await c.error("invalid_json")).toEqual({ type: "error", code: "invalid_json", message: "Invalid JSON" });
    c.send({ type: "ping", id: 1 });
    expect((await c.next("pong")).id).toBe(1);
  });

  test.each([[{}], [{ type: "nope" }], [{ type: 5 }], [{ type: "toString" }], [{ type: "__proto__" }]])(
    "%p is unknown_type",
    async (frame) => {
      const r = relay();
      const c = await TestClient.connect(r.wsUrl);
      c.send(frame);
      expect(await c.error("unknown_type")).toMatchObject({ message: "Unknown message type" });
    },
  );

  test.each([[undefined], [""], [42], [{}], ["x".repeat(129)]])("clientId %p is invalid_client_id", async (clientId) => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId, maxClients: 4 });
    await c.error("invalid_client_id");
    c.send({ type: "join", clientId, room: "abcdef" });
    await c.error("invalid_client_id");
    expect(r.stats().rooms).toBe(0);
  });

  test("clientId of 1 and 128 characters is accepted", async () => {
    const r = relay();
    await createRoom(r, "x");
    await createRoom(r, "y".repeat(128));
    expect(r.stats().rooms).toBe(2);
  });

  test.each([[undefined], [0], [-1], [1.5], ["4"], [257], [Infinity]])("maxClients %p is invalid_max_clients", async (maxClients) => {
    const r = relay();
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId: "h", maxClients });
    await c.error("invalid_max_clients");
    expect(r.stats().rooms).toBe(0);
  });

  test("maxClients of MAX_ROOM_CLIENTS is accepted, one more is not", async () => {
    const r = relay({ maxRoomClients: 3 });
    await createRoom(r, "h", 3);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId: "h", maxClients: 4 });
    expect(await c.error("invalid_max_clients")).toMatchObject({ message: "maxClients must be a positive number" });
  });

  test("the Party-Sockets error texts are the default messages", () => {
    expect(ERRORS).toMatchObject({
      invalid_json: "Invalid JSON",
      unknown_type: "Unknown message type",
      invalid_client_id: "clientId is required",
      invalid_max_clients: "maxClients must be a positive number",
      invalid_room: "room is required",
      room_not_found: "Room not found",
      room_full: "Room is full",
      already_in_room: "Already in a room",
      not_in_room: "Not in a room",
      target_not_found: "Target peer not found",
      state_required: "State data is required",
      state_too_large: "State too large",
      draining: "Server draining",
    });
  });

  test("hostile keys and deep nesting change nothing and never crash the relay", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send('{"type":"send","__proto__":{"to":5},"constructor":{"prototype":{}},"data":{"__proto__":{"x":1}}}');
    const m = await a.client.next("message");
    expect(m.from).toBe(0);
    expect(JSON.stringify(m.data)).toBe('{"__proto__":{"x":1}}');
    host.send("[".repeat(60_000));
    await host.error("invalid_json");
    host.send('{"type":"send","data":' + "[".repeat(5000) + "]".repeat(5000) + "}");
    await a.client.next("message");
    expect((await fetch(`${r.url}/health`)).status).toBe(200);
  });
});

describe("HTTP", () => {
  test("the default host '::' answers on IPv4 and IPv6 loopback (Fly's private network is IPv6)", async () => {
    const r = relay({ hostname: DEFAULTS.hostname });
    for (const host of ["127.0.0.1", "[::1]"]) {
      const res = await fetch(`http://${host}:${r.port}/health`);
      expect(await res.json()).toEqual({ status: "ok" });
    }
  });

  test("/health is 200 ok with CORS", async () => {
    const r = relay();
    const res = await fetch(`${r.url}/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: "ok" });
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
  });

  test("/room/:code: fields, X-Instance-Id, CORS; 404 for unknown; 4xx for a malformed code", async () => {
    const r = relay({ instanceId: "m-7" });
    const host = await TestClient.connect(r.wsUrl, { Origin: "https://game.example" });
    host.send({ type: "create", clientId: "h", maxClients: 5 });
    const code = (await host.next("created")).room;
    await joinRoom(r, code);
    const res = await fetch(`${r.url}/room/${code}`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ clients: 2, maxClients: 5, origin: "https://game.example" });
    expect(res.headers.get("x-instance-id")).toBe("m-7");
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
    const missing = await fetch(`${r.url}/room/zzzzzz`);
    expect(missing.status).toBe(404);
    expect(await missing.json()).toEqual({ error: "Room not found" });
    expect(missing.headers.get("x-instance-id")).toBe("m-7");
    const bad = await fetch(`${r.url}/room/%ZZ`);
    expect(bad.status).toBeGreaterThanOrEqual(400);
    expect(bad.status).toBeLessThan(500);
  });

  test("GET / is a plain-text snapshot, or a 302 when DASHBOARD_URL is set", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    await joinRoom(r, code);
    const res = await fetch(`${r.url}/`);
    expect(await res.text()).toBe("rooms: 1\nclients: 2\n");
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
    const other = await fetch(`${r.url}/anything/else`);
    expect(await other.text()).toBe("rooms: 1\nclients: 2\n");
    const d = relay({ dashboardUrl: "https://grafana.example/d/1" });
    const redirect = await fetch(`${d.url}/`, { redirect: "manual" });
    expect(redirect.status).toBe(302);
    expect(redirect.headers.get("location")).toBe("https://grafana.example/d/1");
  });

  test("GET / for a browser is an HTML page of counts that never shows a room code", async () => {
    const r = relay();
    const { code } = await createRoom(r);
    const res = await fetch(`${r.url}/`, { headers: { Accept: "text/html,application/xhtml+xml" } });
    expect(res.headers.get("content-type")).toContain("text/html");
    const html = await res.text();
    expect(html).toContain("<!doctype html>");
    expect(html).toContain("/client.js");
    expect(html).not.toContain(code);
  });

  test("/client.js is a JavaScript module with an ETag that answers 304", async () => {
    const r = relay();
    const res = await fetch(`${r.url}/client.js`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/javascript");
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
    const etag = res.headers.get("etag")!;
    expect(etag).toBeTruthy();
    expect(await res.text()).not.toContain("import ");
    const again = await fetch(`${r.url}/client.js`, { headers: { "If-None-Match": etag } });
    expect(again.status).toBe(304);
  });

  test("/metrics exposes the Party-Sockets series with instance, region (upper case) and version", async () => {
    const r = relay({ instanceId: "m1", region: "fra" });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    host.send({ type: "send", data: 1 });
    await a.client.next("message");
    host.send("nope");
    await host.error("invalid_json");
    const body = await (await fetch(`${r.url}/metrics`)).text();
    const labels = 'instance="m1",region="FRA",version="';
    for (const name of [
      "party_sockets_clients",
      "party_sockets_rooms",
      "party_sockets_clients_by_origin",
      "party_sockets_rooms_by_origin",
      "party_sockets_connections_total",
      "party_sockets_rooms_created_total",
      "party_sockets_origins_tracked",
      "process_resident_memory_bytes",
      "process_heap_used_bytes",
      "process_uptime_seconds",
    ]) {
      expect(body).toContain(`# TYPE ${name} `);
      expect(body).toContain(`${name}{${labels}`);
    }
    expect(body).toContain("# TYPE process_uptime_seconds gauge");
    expect(body).toMatch(/party_sockets_clients\{[^}]*\} 2\n/);
    expect(body).toMatch(/party_sockets_messages_relayed_total\{[^}]*kind="broadcast"\} 1\n/);
    expect(body).toMatch(/party_sockets_deliveries_total\{[^}]*\} 1\n/);
    expect(body).toMatch(/party_sockets_errors_total\{[^}]*code="invalid_json"\} 1\n/);
  });

  test("origin series are capped with an __other__ bucket", async () => {
    const r = relay({ maxOriginSeries: 2 });
    for (const origin of ["https://a.example", "https://b.example", "https://c.example", "https://d.example"]) {
      const c = await TestClient.connect(r.wsUrl, { Origin: origin });
      c.send({ type: "create", clientId: "h", maxClients: 2 });
      await c.next("created");
    }
    const body = await (await fetch(`${r.url}/metrics`)).text();
    const series = body.split("\n").filter((l) => l.startsWith("party_sockets_rooms_by_origin{"));
    expect(series).toHaveLength(3);
    expect(series.some((l) => l.includes('origin="__other__"} 2'))).toBe(true);
  });
});

describe("secrecy of clientId", () => {
  test("no frame, HTTP body or header, metric or log line carries a clientId", async () => {
    const r = relay({ instanceId: "m1", region: "fra" });
    const secrets = ["S3cret-host-id", "S3cret-guest-a", "S3cret-guest-b"];
    const { host, code } = await createRoom(r, secrets[0], 4, { url: "https://g.example/{room}" });
    const a = await joinRoom(r, code, secrets[1]);
    const b = await joinRoom(r, code, secrets[2]);
    host.send({ type: "set_state", data: { s: 1 } });
    a.client.send({ type: "send", data: "hi" });
    b.client.send({ type: "send", to: [0, 9], data: "yo" });
    await b.client.error("target_not_found");
    const again = await joinRoom(r, code, secrets[1]); // replace
    await a.client.closeCode();
    again.client.send({ type: "leave" });
    await again.client.next("left");
    await host.barrier();
    await b.client.barrier();
    const http: string[] = [];
    for (const path of [`/room/${code}`, "/metrics", "/", "/health", "/room/nope"]) {
      const res = await fetch(r.url + path);
      http.push(await res.text(), JSON.stringify([...res.headers]));
    }
    host.send({ type: "close_room" });
    await host.closeCode();
    const everything = [host, a.client, b.client, again.client].flatMap((c) => c.raw).concat(http, r.logs).join("\n");
    expect(everything.length).toBeGreaterThan(1000);
    for (const secret of secrets) expect(everything).not.toContain(secret);
  });
});

describe("drain", () => {
  test("drain refuses creates but not joins, and resolves when the last room ends", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    let done = false;
    const drained = r.drain().then(() => (done = true));
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId: "late", maxClients: 2 });
    expect(await c.error("draining")).toMatchObject({ message: "Server draining" });
    c.send({ type: "join", clientId: "g", room: code });
    await c.next("joined");
    expect(done).toBe(false);
    expect(await (await fetch(`${r.url}/metrics`)).text()).toMatch(/party_sockets_draining\{[^}]*\} 1\n/);
    host.send({ type: "close_room" });
    await within(drained, "the drain to finish");
    expect(r.logs.map((l) => JSON.parse(l).event)).toContain("drain_end");
  });

  test("a drain with no rooms resolves at once", async () => {
    const r = relay();
    await within(r.drain(), "an empty drain");
  });

  test("past DRAIN_TIMEOUT_MS the remaining members get 1001", async () => {
    const r = relay({ drainTimeoutMs: 100 });
    const { host } = await createRoom(r);
    await within(r.drain(), "the bounded drain");
    expect(await host.closeCode()).toEqual({ code: 1001, reason: "server shutting down" });
  });

  test("run directly: SIGTERM drains and exits 0 once rooms are gone", async () => {
    const proc = Bun.spawn(["bun", "run", "server.ts"], {
      env: { ...process.env, PORT: "0", HOST: "127.0.0.1", LOG_LEVEL: "info" },
      stdout: "pipe",
      cwd: import.meta.dir,
    });
    const reader = proc.stdout.getReader();
    let out = "";
    while (!out.includes('"event":"start"')) out += new TextDecoder().decode((await reader.read()).value);
    const port = JSON.parse(out.split("\n").find((l) => l.includes('"start"'))!).port;
    const host = await TestClient.connect(`ws://127.0.0.1:${port}`);
    host.send({ type: "create", clientId: "h", maxClients: 2 });
    await host.next("created");
    proc.kill("SIGTERM");
    const late = await TestClient.connect(`ws://127.0.0.1:${port}`);
    late.send({ type: "create", clientId: "x", maxClients: 2 });
    await late.error("draining");
    host.send({ type: "close_room" });
    expect(await within(proc.exited, "the process to exit")).toBe(0);
  });
});

describe("options", () => {
  test("optionsFromEnv maps every documented variable and rejects nonsense", () => {
    expect(
      optionsFromEnv({
        PORT: "9000",
        MAX_MESSAGE_BYTES: "1000",
        RATE_LIMIT_PER_SEC: "0",
        FLY_MACHINE_ID: "abc",
        FLY_REGION: "fra",
        LOG_LEVEL: "warn",
        HOST_GRACE_MS: "",
      }),
    ).toEqual({ port: 9000, maxMessageBytes: 1000, rateLimitPerSec: 0, instanceId: "abc", region: "fra", logLevel: "warn" });
    expect(optionsFromEnv({ INSTANCE_ID: "x", FLY_MACHINE_ID: "y", REGION: "a", FLY_REGION: "b" })).toEqual({ instanceId: "x", region: "a" });
    expect(() => optionsFromEnv({ PORT: "abc" })).toThrow("PORT");
    expect(() => optionsFromEnv({ LOG_LEVEL: "loud" })).toThrow("LOG_LEVEL");
    expect(() => optionsFromEnv({ TLS_CERT_FILE: "a" })).toThrow("TLS");
    expect(optionsFromEnv({ ALLOWED_ORIGINS: " https://a.example, https://*.b.example ,", ALLOWED_ORIGINS_REQUIRE: "true" })).toEqual({
      allowedOrigins: ["https://a.example", "https://*.b.example"],
      allowedOriginsRequire: true,
    });
    expect(optionsFromEnv({ ALLOWED_ORIGINS: "", ALLOWED_ORIGINS_REQUIRE: "false" })).toEqual({ allowedOriginsRequire: false });
    expect(() => optionsFromEnv({ ALLOWED_ORIGINS_REQUIRE: "yes" })).toThrow("ALLOWED_ORIGINS_REQUIRE");
    expect(optionsFromEnv({ MISS_BURST_MISSES: "5", MISS_REFILL_MS: "1000" })).toEqual({ missBurstMisses: 5, missRefillMs: 1000 });
    expect(DEFAULTS.hostGraceMs).toBe(120_000);
    expect(CLOSES.replaced.code).toBe(4000);
  });
});

// The limits of SPEC §4 (issue 4).
describe("limits and abuse", () => {
  test("a frame over MAX_MESSAGE_BYTES gets message_too_large, then a 1009 close", async () => {
    const r = relay({ maxMessageBytes: 1000 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    a.client.send({ type: "send", data: "x".repeat(1000) });
    const err = await a.client.error("message_too_large");
    expect(err.message).toContain("1000");
    expect(await a.client.closeCode()).toEqual({ code: 1009, reason: "message too large" });
    expect(await host.next("peer_left")).toEqual({ type: "peer_left", index: 1 });
    await host.barrier();
    expect(host.pending("message")).toEqual([]);
  });

  test("the frame cap counts UTF-8 bytes", async () => {
    const r = relay({ maxMessageBytes: 1000 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const frame = JSON.stringify({ type: "send", data: "é".repeat(480) }); // ~990 bytes
    expect(Buffer.byteLength(frame)).toBeLessThanOrEqual(1000);
    a.client.send(frame);
    await host.next("message");
    a.client.send(JSON.stringify({ type: "send", data: "é".repeat(500) })); // ~1030 bytes, 530 chars
    await a.client.error("message_too_large");
  });

  test("a binary frame over MAX_MESSAGE_BYTES is message_too_large and 1009 too", async () => {
    const r = relay({ maxMessageBytes: 1000 });
    const c = await TestClient.connect(r.wsUrl);
    c.ws.send(new Uint8Array(1001));
    await c.error("message_too_large");
    expect((await c.closeCode()).code).toBe(1009);
  });

  test("binary frames get binary_unsupported and nothing is relayed", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    a.client.ws.send(new Uint8Array([1, 2, 3]));
    expect(await a.client.error("binary_unsupported")).toMatchObject({ code: "binary_unsupported" });
    await host.barrier();
    expect(host.pending("message")).toEqual([]);
    expect(a.client.ws.readyState).toBe(WebSocket.OPEN);
  });

  test("past the burst, frames are dropped with at most one rate_limited error per second", async () => {
    const r = relay({ rateLimitPerSec: 5, rateLimitBurst: 10 });
    const { host, code } = await createRoom(r); // the create takes one token
    const a = await joinRoom(r, code);
    for (let i = 0; i < 50; i++) host.send({ type: "send", data: i });
    expect(await host.error("rate_limited")).toMatchObject({ message: ERRORS.rate_limited });
    for (let i = 0; i < 9; i++) expect((await a.client.next("message")).data).toBe(i);
    const dropped = async () => {
      const metrics = await (await fetch(`${r.url}/metrics`)).text();
      return Number(/party_sockets_rate_limited_frames_total\{[^}]*\} (\d+)/.exec(metrics)![1]);
    };
    await within((async () => { while ((await dropped()) < 41); })(), "41 frames to be dropped");
    expect(host.pending("error")).toEqual([]);
    expect(a.client.pending("message")).toEqual([]);
  });

  test("RATE_LIMIT_PER_SEC=0 disables the limit", async () => {
    const r = relay({ rateLimitPerSec: 0, rateLimitBurst: 1 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    for (let i = 0; i < 300; i++) host.send({ type: "send", data: i });
    for (let i = 0; i < 300; i++) expect((await a.client.next("message")).data).toBe(i);
    expect(host.pending("error")).toEqual([]);
  });

  test("too_many_rooms per IP, freed when a room ends", async () => {
    const r = relay({ maxRoomsPerIp: 2 });
    await createRoom(r);
    const second = await createRoom(r);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId: "h3", maxClients: 2 });
    await c.error("too_many_rooms");
    second.host.send({ type: "close_room" });
    await second.host.closeCode();
    c.send({ type: "create", clientId: "h3", maxClients: 2 });
    await c.next("created");
  });

  test("MAX_ROOMS caps rooms per process", async () => {
    const r = relay({ maxRooms: 1 });
    await createRoom(r);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "create", clientId: "h2", maxClients: 2 });
    await c.error("too_many_rooms");
  });

  test("Fly-Client-IP is trusted only when FLY_APP_NAME is set", async () => {
    const off = relay({ maxRoomsPerIp: 1 });
    const a = await TestClient.connect(off.wsUrl, { "Fly-Client-IP": "10.0.0.1" });
    a.send({ type: "create", clientId: "h", maxClients: 2 });
    await a.next("created");
    const b = await TestClient.connect(off.wsUrl, { "Fly-Client-IP": "10.0.0.2" });
    b.send({ type: "create", clientId: "h", maxClients: 2 });
    await b.error("too_many_rooms"); // same socket address: the header was ignored
    const on = relay({ maxRoomsPerIp: 1, flyAppName: "app" });
    for (const ip of ["10.0.0.1", "10.0.0.2"]) {
      const c = await TestClient.connect(on.wsUrl, { "Fly-Client-IP": ip });
      c.send({ type: "create", clientId: "h", maxClients: 2 });
      await c.next("created");
    }
  });

  test("connections past MAX_CONNECTIONS_PER_IP are closed with 1008", async () => {
    const r = relay({ maxConnectionsPerIp: 2 });
    await TestClient.connect(r.wsUrl);
    await TestClient.connect(r.wsUrl);
    const third = await TestClient.connect(r.wsUrl);
    expect(await third.closeCode()).toEqual({ code: 1008, reason: "too many connections" });
  });

  test("a slot cap of 4 x MAX_ROOM_CLIENTS per room bounds churn with fresh clientIds", async () => {
    const r = relay({ maxRoomClients: 2 });
    const { host, code } = await createRoom(r, "h", 2);
    for (let i = 1; i < 8; i++) {
      const g = await joinRoom(r, code, `g${i}`);
      g.client.close();
      await host.next("peer_left");
    }
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "join", clientId: "g-last", room: code });
    expect(await c.error("room_full")).toMatchObject({ message: "Room is full" });
  });

  test.each([[4000], [60_000]])("a slow consumer is closed with 4002 after receiving every message up to then, with no gap (%p-byte frames)", async (padBytes) => {
    const r = relay({ rateLimitPerSec: 0, backpressureLimitBytes: 256 * 1024, resumeRoomBytes: 64 * 2 ** 20, resumeRoomFrames: 100_000 });
    const { host, code } = await createRoom(r);
    const fast = await joinRoom(r, code);
    const slow = await RawClient.connect(r.port);
    slow.send({ type: "join", clientId: "slow", room: code });
    await slow.until("joined", () => slow.texts.some((t) => t.includes('"joined"')));
    await host.next("peer_joined");
    slow.pause();
    const pad = "p".repeat(padBytes);
    let sent = 0;
    // Keep sending until the relay gives up on the slow member; the fast one must see it all.
    while (host.pending("peer_left").length === 0 && sent < 5000) {
      for (let i = 0; i < 50; i++) host.send({ type: "send", data: { n: sent++, pad } });
      await host.barrier();
    }
    expect(await host.next("peer_left")).toEqual({ type: "peer_left", index: 2 });
    for (let i = 0; i < sent; i++) expect((await fast.client.next("message")).data.n).toBe(i);
    slow.resume();
    await slow.endOrClose(10_000);
    const got = slow.frames().filter((f) => f.type === "message").map((f) => f.data.n);
    expect(got.length).toBeGreaterThan(0);
    expect(got).toEqual([...Array(got.length).keys()]);
    if (slow.closeCode !== undefined) expect(slow.closeCode).toBe(4002);
    const metrics = await (await fetch(`${r.url}/metrics`)).text();
    expect(metrics).toMatch(/party_sockets_closes_total\{[^}]*code="4002"\} 1\n/);
    // It rejoins with what it last saw, and gets the rest: lossless across the slow-consumer close.
    const lastSeen = slow.frames().filter((f) => f.type === "message").at(-1)!.seq;
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "slow", room: code, resume: lastSeen });
    expect(await back.next("joined")).toMatchObject({ resumed: true });
    const rest: number[] = [];
    while (got.length + rest.length < sent) rest.push((await back.next("message")).data.n);
    expect([...got, ...rest]).toEqual([...Array(sent).keys()]);
  });

  test("a member that stops answering pings in a busy room is closed with 4003 and its peers get peer_left", async () => {
    const r = relay({ rateLimitPerSec: 0, heartbeatIntervalMs: 100, heartbeatTimeoutMs: 400 });
    const { host, code } = await createRoom(r);
    const dead = await RawClient.connect(r.port); // never answers pings
    dead.send({ type: "join", clientId: "dead", room: code });
    await dead.until("joined", () => dead.texts.some((t) => t.includes('"joined"')));
    await host.next("peer_joined");
    const started = Date.now();
    const busy = setInterval(() => host.send({ type: "send", data: "tick" }), 20);
    try {
      expect(await host.next("peer_left", 3000)).toEqual({ type: "peer_left", index: 1 });
    } finally {
      clearInterval(busy);
    }
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    await dead.endOrClose();
    expect(dead.closeCode).toBe(4003);
  });

  test("a member that answers pings stays, however quiet", async () => {
    const r = relay({ heartbeatIntervalMs: 50, heartbeatTimeoutMs: 200 });
    const { host, code } = await createRoom(r);
    const quiet = await joinRoom(r, code); // Bun's client answers pings
    await host.next("peer_joined");
    await Bun.sleep(600); // several timeout windows pass with no frame from either
    await host.barrier();
    expect(host.pending("peer_left")).toEqual([]);
    expect(quiet.client.ws.readyState).toBe(WebSocket.OPEN);
  });
});

// Lossless reconnect (issue 9): seq on every relayed frame, a bounded ring, join with resume.
describe("resume", () => {
  const seqs = (frames: Record<string, any>[]) => frames.map((f) => f.seq);

  test("every relayed message and state carries one per-room seq, the same for every recipient", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code);
    const b = await joinRoom(r, code);
    host.send({ type: "send", data: 1 });
    await b.client.next("message");
    a.client.send({ type: "send", to: 2, data: 2 });
    await b.client.next("message");
    host.send({ type: "set_state", data: 3 });
    await b.client.next("state");
    expect(seqs([await a.client.next("message"), await a.client.next("state")])).toEqual([1, 3]);
    expect(seqs(b.client.raw.slice(1).map((t) => JSON.parse(t)))).toEqual([1, 2, 3]);
    const late = await joinRoom(r, code);
    expect(late.joined.seq).toBe(3);
  });

  test("frames of very different sizes from two rooms, wrapped many times round a small log, replay byte for byte", async () => {
    // Sizes from 20 to 1500 bytes in an 8 KiB log shared by two rooms: it wraps with the oldest
    // frame sometimes still lying past the write position, where a careless wrap overwrites newer frames.
    const r = relay({ rateLimitPerSec: 0, resumeTotalBytes: 8192 });
    const { host, code } = await createRoom(r);
    const other = await createRoom(r, "other-host");
    const otherGuest = (await joinRoom(r, other.code, "other-guest")).client;
    let phone = (await joinRoom(r, code, "phone")).client;
    const live = new Map<number, string>();
    let seed = 7;
    const nextSize = () => 20 + ((seed = (seed * 1103515245 + 12345) % 2 ** 31) % 1480);
    let replayed = 0;
    for (let round = 0; round < 60; round++) {
      for (let i = 0; i < 4; i++) {
        host.send({ type: "send", data: "x".repeat(nextSize()) });
        const m = await phone.next("message");
        live.set(m.seq, phone.raw.at(-1)!);
        other.host.send({ type: "send", data: "y".repeat(nextSize()) });
        await otherGuest.next("message");
      }
      const last = Math.max(...live.keys());
      const after = last - 1 - (round % 4);
      phone.close();
      await host.next("peer_left");
      phone = await TestClient.connect(r.wsUrl);
      phone.send({ type: "join", clientId: "phone", room: code, resume: after });
      const joined = await phone.next("joined");
      if (!joined.resumed) continue;
      for (let seq = after + 1; seq <= last; seq++) {
        await phone.next("message");
        expect(phone.raw.at(-1)).toBe(live.get(seq)!);
        replayed++;
      }
    }
    expect(replayed).toBeGreaterThan(20);
  });

  test("after a clean close, resume replays exactly the missed frames in order, then live traffic", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    const other = await joinRoom(r, code);
    host.send({ type: "send", data: "m1" });
    const last = (await a.client.next("message")).seq;
    a.client.close();
    await host.next("peer_left");
    host.send({ type: "send", data: "m2" });
    await other.client.next("message");
    other.client.send({ type: "send", data: "m3" });
    await host.next("message");
    host.send({ type: "send", to: [1, 2], data: "m4" }); // slot 1 is away: reported missing, not kept for it
    await host.error("target_not_found");
    host.send({ type: "set_state", data: "s5" });
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: last });
    const joined = await back.next("joined");
    expect(joined).toMatchObject({ index: 1, resumed: true, seq: 5 });
    expect(joined.oldest).toBeUndefined();
    await back.barrier();
    const replayed = back.frames.splice(0).filter((f) => f.type === "message" || f.type === "state");
    expect(replayed.map((f) => [f.type, f.seq, f.data])).toEqual([
      ["message", 2, "m2"],
      ["message", 3, "m3"],
      ["state", 5, "s5"],
    ]);
    host.send({ type: "send", data: "m6" });
    expect(await back.next("message")).toMatchObject({ seq: 6, data: "m6" });
  });

  test("text beyond ASCII (2-, 3- and 4-byte UTF-8) arrives intact live and in a replay, mixed with ASCII frames", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    const texts = ["plain", "é and ü", "日本語", "🎉 party 🎲", "x".repeat(100) + "🙂", "ok"];
    host.send({ type: "send", data: "first" });
    const last = (await a.client.next("message")).seq;
    a.client.close();
    await host.next("peer_left");
    const watcher = await joinRoom(r, code);
    for (const t of texts) host.send({ type: "send", data: { t } });
    host.send({ type: "set_state", data: { board: "♠♥♦♣" } });
    for (const t of texts) expect((await watcher.client.next("message")).data).toEqual({ t });
    expect((await watcher.client.next("state")).data).toEqual({ board: "♠♥♦♣" });
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await back.next("joined")).toMatchObject({ resumed: true });
    await back.barrier();
    const replayed = back.frames.splice(0).filter((f) => f.type === "message" || f.type === "state");
    expect(replayed.map((f) => f.data)).toEqual([...texts.map((t) => ({ t })), { board: "♠♥♦♣" }]);
  });

  test("after a dead link (no close, unread frames), resume on a new socket replays what was lost in flight", async () => {
    const r = relay({ rateLimitPerSec: 0 });
    const { host, code } = await createRoom(r);
    const other = await joinRoom(r, code);
    const phone = await RawClient.connect(r.port);
    phone.send({ type: "join", clientId: "phone", room: code });
    await phone.until("joined", () => phone.texts.some((t) => t.includes('"joined"')));
    host.send({ type: "send", data: "seen" });
    await phone.until("the first message", () => phone.frames().some((f) => f.type === "message"));
    const last = phone.frames().find((f) => f.type === "message")!.seq;
    phone.pause(); // the phone's network is gone; the relay does not know yet
    for (let i = 0; i < 20; i++) {
      host.send({ type: "send", data: `b${i}` });
      other.client.send({ type: "send", to: 2, data: `t${i}` });
      other.client.send({ type: "send", to: 0, data: `not-for-phone${i}` });
    }
    await host.barrier();
    await other.client.barrier();
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await back.next("joined")).toMatchObject({ index: 2, resumed: true });
    await back.barrier();
    const got = back.frames.splice(0).filter((f) => f.type === "message");
    // Two senders interleave freely; each one's frames keep their order, and seq only rises.
    expect(got.filter((m) => m.from === 0).map((m) => m.data)).toEqual(Array.from({ length: 20 }, (_, i) => `b${i}`));
    expect(got.filter((m) => m.from === 1).map((m) => m.data)).toEqual(Array.from({ length: 20 }, (_, i) => `t${i}`));
    expect(got.map((m) => m.seq)).toEqual(got.map((m) => m.seq).sort((x, y) => x - y));
    await host.barrier();
    expect(host.pending("peer_left")).toEqual([]); // a replace: the others saw nothing
  });

  test("a resume the ring no longer covers says resumed: false with the oldest seq, and sends the snapshot", async () => {
    const r = relay({ resumeRoomFrames: 5 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    host.send({ type: "set_state", data: "snap" });
    const last = (await a.client.next("state")).seq;
    a.client.close();
    await host.next("peer_left");
    for (let i = 0; i < 20; i++) host.send({ type: "send", data: i });
    await host.barrier();
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await back.next("joined")).toMatchObject({ resumed: false, oldest: 17, seq: 21 });
    expect(await back.next("state")).toEqual({ type: "state", seq: 1, data: "snap" });
    await back.barrier();
    expect(back.pending("message")).toEqual([]);
  });

  test("a resume is refused only when a frame addressed to this member is gone, not any frame", async () => {
    const r = relay({ resumeRoomFrames: 5 });
    const { host, code } = await createRoom(r);
    const other = await joinRoom(r, code);
    const phone = await joinRoom(r, code, "phone");
    host.send({ type: "send", data: "last seen" });
    const last = (await phone.client.next("message")).seq;
    phone.client.close();
    await host.next("peer_left");
    // 20 frames for someone else push everything out of a 5-frame ring.
    for (let i = 0; i < 20; i++) host.send({ type: "send", to: 1, data: i });
    for (let i = 0; i < 20; i++) await other.client.next("message");
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await back.next("joined")).toMatchObject({ resumed: true, seq: 21 });
    // ...but one broadcast (addressed to the phone too) that falls out of the ring is a loss.
    back.close();
    await host.next("peer_left");
    host.send({ type: "send", data: "for everyone" });
    for (let i = 0; i < 5; i++) host.send({ type: "send", to: 1, data: i });
    await host.barrier();
    const again = await TestClient.connect(r.wsUrl);
    again.send({ type: "join", clientId: "phone", room: code, resume: 21 });
    expect(await again.next("joined")).toMatchObject({ resumed: false, oldest: 23 });
  });

  test("a host's own broadcasts and states never make its resume fail (it was never sent them)", async () => {
    const r = relay({ resumeRoomFrames: 3 });
    const { host, code, clientId } = await createRoom(r);
    const guest = await joinRoom(r, code);
    for (let i = 0; i < 10; i++) host.send({ type: "send", data: i });
    host.send({ type: "set_state", data: "s" });
    await guest.client.next("state");
    host.close();
    await guest.client.next("peer_left");
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId, room: code, resume: 0 });
    expect(await back.next("joined")).toMatchObject({ index: 0, resumed: true });
    await back.barrier();
    expect(back.pending("message")).toEqual([]);
    expect(back.pending("state")).toEqual([]);
  });

  test("with resume off (RESUME_WINDOW_MS=0) a resume succeeds only when nothing was addressed to the member", async () => {
    const r = relay({ resumeWindowMs: 0 });
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code, "phone");
    host.send({ type: "send", data: 1 });
    const last = (await guest.client.next("message")).seq;
    guest.client.close();
    await host.next("peer_left");
    const quiet = await TestClient.connect(r.wsUrl);
    quiet.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await quiet.next("joined")).toMatchObject({ resumed: true });
    quiet.close();
    await host.next("peer_left");
    host.send({ type: "send", data: 2 });
    await host.barrier();
    const missed = await TestClient.connect(r.wsUrl);
    missed.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await missed.next("joined")).toMatchObject({ resumed: false });
  });

  test("resume on a fresh slot is resumed: false; without resume, joined has no resumed field", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    host.send({ type: "send", data: 1 });
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "join", clientId: "new", room: code, resume: 0 });
    expect(await c.next("joined")).toMatchObject({ resumed: false });
    const d = await joinRoom(r, code);
    expect(d.joined.resumed).toBeUndefined();
  });

  test("a resume from before the slot existed replays nothing older than the slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    host.send({ type: "send", data: "before" });
    await host.barrier();
    const a = await joinRoom(r, code, "phone");
    a.client.close();
    await host.next("peer_left");
    host.send({ type: "send", data: "after" });
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: 0 });
    expect(await back.next("joined")).toMatchObject({ resumed: true });
    await back.barrier();
    expect(back.pending("message").map((m) => m.data)).toEqual(["after"]);
  });

  test("RESUME_ROOM_FRAMES=0 turns the buffer off cleanly", async () => {
    const r = relay({ resumeRoomFrames: 0 });
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    host.send({ type: "send", data: 1 });
    const last = (await a.client.next("message")).seq;
    a.client.close();
    await host.next("peer_left");
    host.send({ type: "send", data: 2 });
    await host.barrier();
    expect(await bufferBytes(r)).toBe(0);
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: last });
    expect(await back.next("joined")).toMatchObject({ resumed: false });
  });

  test.each([[-1], [1.5], ["3"], [null]])("resume %p is invalid_resume", async (resume) => {
    const r = relay();
    const { code } = await createRoom(r);
    const c = await TestClient.connect(r.wsUrl);
    c.send({ type: "join", clientId: "x", room: code, resume });
    expect(await c.error("invalid_resume")).toMatchObject({ message: "resume must be a non-negative integer" });
  });

  test("the ring replays exactly the kept suffix through wrap-arounds, growth and drops (randomised, seeded)", async () => {
    const r = relay({ rateLimitPerSec: 0, resumeRoomBytes: 6000, resumeRoomFrames: 40 });
    const { host, code } = await createRoom(r);
    const other = await joinRoom(r, code);
    const phone = await joinRoom(r, code, "phone");
    phone.client.close();
    await host.next("peer_left");
    let seed = 7;
    const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    const sent: { seq: number; data: string; toPhone: boolean }[] = [];
    let seq = 0;
    const outcomes = { resumed: 0, tooOld: 0 };
    for (let round = 0; round < 30; round++) {
      const burst = 1 + Math.floor(random() * 25);
      for (let i = 0; i < burst; i++) {
        const data = "é".repeat(Math.floor(random() * 300)) + `#${seq + 1}`;
        const roll = random();
        if (roll < 0.6) host.send({ type: "send", data });
        else if (roll < 0.8) host.send({ type: "send", to: [1, 2], data }); // 2 (phone) is away: missing
        else host.send({ type: "send", to: 1, data });
        sent.push({ seq: ++seq, data, toPhone: roll < 0.6 });
      }
      await other.client.barrier();
      host.frames.length = 0;
      const resume = Math.max(0, seq - Math.floor(random() * 50));
      const back = await TestClient.connect(r.wsUrl);
      back.send({ type: "join", clientId: "phone", room: code, resume });
      const joined = await back.next("joined");
      await back.barrier();
      const replayed = back.frames.splice(0).filter((f) => f.type === "message");
      outcomes[joined.resumed ? "resumed" : "tooOld"]++;
      if (joined.resumed) {
        expect(replayed.map((m) => [m.seq, m.data])).toEqual(sent.filter((m) => m.seq > resume && m.toPhone).map((m) => [m.seq, m.data]));
      } else {
        expect(joined.oldest).toBeGreaterThan(resume + 1);
        expect(replayed).toEqual([]);
      }
      back.close();
      await host.next("peer_left");
    }
    expect(outcomes.resumed).toBeGreaterThan(5);
    expect(outcomes.tooOld).toBeGreaterThan(5);
    expect(await bufferBytes(r)).toBeLessThanOrEqual(6000);
  });

  async function bufferBytes(r: { url: string }): Promise<number> {
    const metrics = await (await fetch(`${r.url}/metrics`)).text();
    return Number(/party_sockets_resume_buffer_bytes\{[^}]*\} (\d+)/.exec(metrics)![1]);
  }

  test("the ring stays within its byte bounds under a flood, per room and per process", async () => {
    const r = relay({ rateLimitPerSec: 0, resumeRoomBytes: 20_000, resumeTotalBytes: 30_000 });
    const rooms = [await createRoom(r), await createRoom(r)];
    for (const { code } of rooms) await joinRoom(r, code);
    for (let i = 0; i < 500; i++) for (const { host } of rooms) host.send({ type: "send", data: "x".repeat(100) + i });
    for (const { host } of rooms) await host.barrier();
    const bytes = await bufferBytes(r);
    expect(bytes).toBeGreaterThan(10_000);
    expect(bytes).toBeLessThanOrEqual(30_000);
  });

  test("frames older than RESUME_WINDOW_MS are dropped even in a room that goes quiet", async () => {
    const r = relay({ resumeWindowMs: 100, heartbeatIntervalMs: 50 });
    const { host, code } = await createRoom(r);
    await joinRoom(r, code);
    host.send({ type: "send", data: "x".repeat(1000) });
    await host.barrier();
    expect(await bufferBytes(r)).toBeGreaterThan(1000);
    await within((async () => { while ((await bufferBytes(r)) > 0) await Bun.sleep(25); })(), "the ring to age out");
  });

  test("resumes and replays are counted", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const a = await joinRoom(r, code, "phone");
    a.client.close();
    await host.next("peer_left");
    host.send({ type: "send", data: 1 });
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code, resume: 0 });
    await back.next("message");
    const metrics = await (await fetch(`${r.url}/metrics`)).text();
    expect(metrics).toMatch(/party_sockets_resumes_total\{[^}]*result="resumed"\} 1\n/);
    expect(metrics).toMatch(/party_sockets_frames_replayed_total\{[^}]*\} 1\n/);
  });
});

describe("numbered sends (lossless sends)", () => {
  const datas = (frames: Record<string, any>[]) => frames.map((f) => f.data);
  const duplicatesCounted = async (r: { url: string }) =>
    Number((await (await fetch(`${r.url}/metrics`)).text()).match(/party_sockets_duplicate_frames_total\{[^}]*\} (\d+)\n/)![1]);

  test("a numbered send is relayed once; one whose n is not above the slot's highest is dropped without an error, and counted", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code);
    const frames = [
      '{"type":"send","n":1,"data":"a"}',
      '{"type":"send","to":0,"n":2,"data":"b"}',
      '{"data":"b again","n":2,"type":"send"}', // any field order: the general path checks it too
      '{"type":"send","n":1,"data":"a again"}',
      '{"n":5,"to":[0],"type":"send","data":"c"}', // numbers may skip: only "above the highest" counts
      '{"type":"send","n":4,"data":"late"}',
      '{"type":"send","data":"plain"}', // a frame without n is never a duplicate
      '{"type":"send","data":"plain"}',
    ];
    for (const f of frames) guest.client.send(f);
    await guest.client.barrier();
    await host.barrier();
    expect(datas(host.pending("message"))).toEqual(["a", "b", "c", "plain", "plain"]);
    expect(guest.client.pending("error")).toEqual([]);
    expect(await duplicatesCounted(r)).toBe(3);
  });

  test("set_state shares the slot's numbers; a duplicate is neither stored nor relayed", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code);
    host.send({ type: "set_state", n: 1, data: "s1" });
    host.send({ type: "send", n: 2, data: "m2" });
    host.send({ type: "set_state", n: 2, data: "s2 is a duplicate" });
    await host.barrier();
    await guest.client.barrier();
    expect(guest.client.frames.filter((f) => f.type !== "pong").map((f) => [f.type, f.data])).toEqual([
      ["state", "s1"],
      ["message", "m2"],
    ]);
    const late = await joinRoom(r, code);
    expect((await late.client.next("state")).data).toBe("s1");
  });

  test("a numbered frame the relay refused (target_not_found, not_host) does not advance n: resent, it is answered again", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code);
    guest.client.send({ type: "send", to: 5, n: 1, data: "nobody there" });
    await guest.client.error("target_not_found");
    guest.client.send({ type: "set_state", n: 1, data: "not mine" });
    await guest.client.error("not_host");
    guest.client.send({ type: "ping", id: "p" });
    expect((await guest.client.next("pong")).received).toBeUndefined();
    guest.client.send({ type: "send", to: 5, n: 1, data: "still nobody" });
    await guest.client.error("target_not_found");
    guest.client.send({ type: "send", n: 1, data: "now relayed" });
    expect((await host.next("message")).data).toBe("now relayed");
  });

  test("pong carries received in a room once the slot numbered a frame; joined carries it on a reclaim of the slot", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code, "phone");
    expect(guest.joined.received).toBeUndefined();
    guest.client.send({ type: "ping", id: 1 });
    expect((await guest.client.next("pong")).received).toBeUndefined();
    for (let n = 1; n <= 3; n++) guest.client.send({ type: "send", n, data: n });
    guest.client.send({ type: "ping", id: 2 });
    expect(await guest.client.next("pong")).toMatchObject({ id: 2, received: 3 });
    guest.client.close();
    await host.next("peer_left");
    const back = await TestClient.connect(r.wsUrl);
    back.send({ type: "join", clientId: "phone", room: code });
    expect(await back.next("joined")).toMatchObject({ index: 1, received: 3 });
    // Another socket taking over the open slot (a replace) gets it too.
    const again = await TestClient.connect(r.wsUrl);
    again.send({ type: "join", clientId: "phone", room: code });
    expect(await again.next("joined")).toMatchObject({ index: 1, received: 3 });
    const other = await joinRoom(r, code);
    expect(other.joined.received).toBeUndefined();
  });

  test("a Party-Sockets 2.x client (no n) sees no change, byte for byte: joined, pong and message frames have no new field", async () => {
    const r = relay();
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code);
    guest.client.send({ type: "send", data: { tap: 1 } });
    guest.client.send({ type: "send", data: { tap: 1 } });
    guest.client.send({ type: "ping", id: 7 });
    await guest.client.next("pong");
    await host.barrier();
    expect(guest.client.raw[0]).toBe(
      `{"type":"joined","room":"${code}","index":1,"peers":[0],"instance":"${r.instanceId}","region":"","seq":0}`,
    );
    expect(guest.client.raw.at(-1)).toMatch(/^\{"type":"pong","id":7,"t":\d+\}$/);
    expect(host.raw.filter((t) => t.includes('"message"'))).toEqual([
      '{"type":"message","from":1,"seq":1,"data":{"tap":1}}',
      '{"type":"message","from":1,"seq":2,"data":{"tap":1}}',
    ]);
  });

  test("a malformed n (anything but a positive safe integer) is invalid_n, and nothing is relayed", async () => {
    const r = relay({ rateLimitPerSec: 0 });
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code);
    const hostile = [0, -1, 1.5, "1", 2 ** 53, 1e300, null, true, [], {}, [1], -0];
    for (const n of hostile) {
      guest.client.send({ type: "send", n, data: "bad" });
      guest.client.send({ type: "send", to: 0, n, data: "bad" });
      host.send({ type: "set_state", n, data: "bad" });
    }
    // The fast path's shapes, written by hand: each must come out as the general path says.
    for (const text of ['{"type":"send","n":0,"data":1}', '{"type":"send","to":0,"n":0,"data":1}', '{"type":"send","n":9007199254740992,"data":1}', '{"type":"send","n":-3,"data":1}', '{"type":"send","n":2.0e0,"data":1}']) {
      guest.client.send(text);
    }
    guest.client.send('{"type":"send","n":01,"data":1}');
    guest.client.send('{"type":"send","n":9007199254740991,"data":"max"}'); // the largest safe integer is fine
    await guest.client.barrier();
    await host.barrier();
    const expected = [...Array(2 * hostile.length + 4).fill("invalid_n"), "invalid_json"];
    expect(guest.client.pending("error").map((e) => e.code)).toEqual(expected);
    expect(host.pending("error").map((e) => e.code)).toEqual(Array(hostile.length).fill("invalid_n"));
    // "2.0e0" is JSON for 2, a positive integer: relayed, then only the largest safe integer.
    expect(datas(host.pending("message"))).toEqual([1, "max"]);
    expect(guest.client.pending("message")).toEqual([]);
  });

  test("a frame the rate limit dropped does not advance n: resent later, it is relayed", async () => {
    const r = relay({ rateLimitPerSec: 10, rateLimitBurst: 4 });
    const { host, code } = await createRoom(r);
    const guest = await joinRoom(r, code); // the join takes one token: three left
    for (let n = 1; n <= 5; n++) guest.client.send({ type: "send", n, data: n });
    await guest.client.error("rate_limited");
    expect([(await host.next("message")).data, (await host.next("message")).data, (await host.next("message")).data]).toEqual([1, 2, 3]);
    await Bun.sleep(350); // the clock under test: the bucket refills three tokens
    guest.client.send({ type: "ping", id: "after" });
    expect(await guest.client.next("pong")).toMatchObject({ received: 3 });
    guest.client.send({ type: "send", n: 4, data: 4 });
    guest.client.send({ type: "send", n: 5, data: 5 });
    expect([(await host.next("message")).data, (await host.next("message")).data]).toEqual([4, 5]);
  });

  for (const failure of ["cut", "freeze"] as const) {
    test(`a TCP ${failure} with frames in flight: the rejoin's received is exact, and resending from 1 delivers each frame once, in order`, async () => {
      const r = relay({ rateLimitPerSec: 0 });
      const proxy = startProxy(r.port);
      try {
        const { host, code } = await createRoom(r);
        const phone = await TestClient.connect(proxy.wsUrl);
        phone.send({ type: "join", clientId: "phone", room: code });
        const { seq } = await phone.next("joined");
        const total = 40;
        const frame = (n: number) => ({ type: "send", n, data: { vote: n } });
        for (let n = 1; n <= 10; n++) phone.send(frame(n));
        for (let n = 1; n <= 10; n++) expect((await host.next("message")).data).toEqual({ vote: n });
        for (let n = 11; n <= 25; n++) phone.send(frame(n)); // racing the failure: some arrive, some die
        if (failure === "cut") {
          proxy.freeze("up");
          for (let n = 26; n <= total; n++) phone.send(frame(n)); // certainly lost in flight
          proxy.cut(); // no close frame either way
          await host.next("peer_left");
        } else {
          proxy.freeze("both"); // the relay still thinks the phone is there
          for (let n = 26; n <= total; n++) phone.send(frame(n));
        }
        await host.barrier();
        const before = datas(host.frames.splice(0).filter((f) => f.type === "message")).map((d) => d.vote);
        const back = await TestClient.connect(r.wsUrl);
        back.send({ type: "join", clientId: "phone", room: code, resume: seq });
        const joined = await back.next("joined");
        expect(joined).toMatchObject({ index: 1, resumed: true });
        // Exactly what the host got: 10 for sure, then whatever of 11-25 made it before the failure.
        const received = 10 + before.length;
        expect(joined.received).toBe(received);
        expect(before).toEqual(Array.from({ length: before.length }, (_, i) => 11 + i));
        const duplicatesBefore = await duplicatesCounted(r);
        for (let n = 1; n <= total; n++) back.send(frame(n));
        await back.barrier();
        await host.barrier();
        const after = datas(host.pending("message")).map((d) => d.vote);
        expect(after).toEqual(Array.from({ length: total - received }, (_, i) => received + 1 + i));
        expect((await duplicatesCounted(r)) - duplicatesBefore).toBe(received);
        expect(back.pending("error")).toEqual([]);
      } finally {
        proxy.stop();
      }
    });
  }
});
