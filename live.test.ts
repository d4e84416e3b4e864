// Black-box checks against any running relay: LIVE_URL=https://relay.example bun test live.test.ts
// Skips only when LIVE_URL is unset. Uses nothing but HTTP and WebSockets.

import { describe, expect, test } from "bun:test";
import { TestClient } from "./test/helpers.ts";

const LIVE_URL = process.env.LIVE_URL?.replace(/\/$/, "");
const wsUrl = LIVE_URL?.replace(/^http/, "ws") ?? "";
const live = describe.skipIf(!LIVE_URL);
const id = () => "live-" + crypto.randomUUID();

async function room(maxClients = 4) {
  const host = await TestClient.connect(wsUrl);
  host.send({ type: "create", clientId: id(), maxClients });
  const created = await host.next("created");
  const guest = await TestClient.connect(`${wsUrl}/${created.room}?instance=${created.instance}`);
  const guestId = id();
  guest.send({ type: "join", clientId: guestId, room: created.room });
  const joined = await guest.next("joined");
  await host.next("peer_joined");
  return { host, guest, guestId, code: created.room as string, created, joined };
}

live("live relay", () => {
  test("GET /health", async () => {
    const res = await fetch(`${LIVE_URL}/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: "ok" });
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
  });

  test("create and join: code, slots, peers, instance", async () => {
    const { created, joined, code, host, guest } = await room();
    expect(code).toMatch(/^[1-9A-HJ-NP-Za-km-z]{6}$/);
    expect(created.index).toBe(0);
    expect(joined).toMatchObject({ room: code, index: 1, peers: [0], instance: created.instance });
    host.close();
    guest.close();
  });

  test("broadcast, targeted and list sends", async () => {
    const { host, guest } = await room();
    host.send({ type: "send", data: { hello: "world" } });
    expect(await guest.next("message")).toMatchObject({ type: "message", from: 0, data: { hello: "world" } });
    guest.send({ type: "send", to: 0, data: 1 });
    expect(await host.next("message")).toMatchObject({ type: "message", from: 1, data: 1 });
    host.send({ type: "send", to: [1, 42], data: 2 });
    expect((await guest.next("message")).data).toBe(2);
    expect((await host.error("target_not_found")).missing).toEqual([42]);
    host.close();
    guest.close();
  });

  test("state is relayed and replayed to a reclaiming member", async () => {
    const { host, guest, guestId, code } = await room();
    host.send({ type: "set_state", data: { round: 1 } });
    expect((await guest.next("state")).data).toEqual({ round: 1 });
    guest.close();
    expect((await host.next("peer_left")).index).toBe(1);
    const back = await TestClient.connect(wsUrl);
    back.send({ type: "join", clientId: guestId, room: code });
    expect((await back.next("joined")).index).toBe(1);
    expect((await back.next("state")).data).toEqual({ round: 1 });
    host.close();
    back.close();
  });

  test("replace closes the old socket with 4000", async () => {
    const { host, guest, guestId, code } = await room();
    const second = await TestClient.connect(wsUrl);
    second.send({ type: "join", clientId: guestId, room: code });
    await second.next("joined");
    expect((await guest.closeCode()).code).toBe(4000);
    host.close();
    second.close();
  });

  test("close_room closes everyone with 4001 and /room/:code turns 404", async () => {
    const { host, guest, code } = await room();
    expect((await fetch(`${LIVE_URL}/room/${code}`)).status).toBe(200);
    host.send({ type: "close_room" });
    expect(await guest.closeCode()).toEqual({ code: 4001, reason: "room closed" });
    expect((await fetch(`${LIVE_URL}/room/${code}`)).status).toBe(404);
  });

  test("kick closes the member with 4004 kicked and bars its clientId", async () => {
    const { host, guest, guestId, code } = await room();
    host.send({ type: "kick", index: 1 });
    expect(await guest.closeCode()).toEqual({ code: 4004, reason: "kicked" });
    expect(await host.next("peer_left")).toEqual({ type: "peer_left", index: 1 });
    const again = await TestClient.connect(wsUrl);
    again.send({ type: "join", clientId: guestId, room: code });
    expect(await again.error("kicked")).toMatchObject({ message: "Removed by the host" });
    host.close();
    again.close();
  });

  test("errors carry a code", async () => {
    const c = await TestClient.connect(wsUrl);
    c.send("null");
    await c.error("invalid_json");
    c.send({ type: "warp" });
    await c.error("unknown_type");
    c.send({ type: "join", clientId: id(), room: "111111" });
    await c.error("room_not_found");
    c.send({ type: "send", data: 1 });
    await c.error("not_in_room");
    c.send({ type: "ping", id: 9 });
    expect((await c.next("pong")).id).toBe(9);
    c.close();
  });

  test("GET /metrics and /client.js", async () => {
    const metrics = await (await fetch(`${LIVE_URL}/metrics`)).text();
    expect(metrics).toContain("# TYPE party_sockets_rooms gauge");
    const client = await fetch(`${LIVE_URL}/client.js`);
    expect(client.status).toBe(200);
    expect(client.headers.get("content-type")).toContain("javascript");
  });
});
