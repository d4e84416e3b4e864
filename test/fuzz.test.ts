// Hostile traffic, seeded: thousands of malformed, mutated and oversized frames
// over many sockets, interleaved with a real room whose messages must all
// arrive intact. FUZZ_SEED=<n> replays a run; FUZZ_FRAMES scales it.

import { afterAll, expect, test } from "bun:test";
import { ERRORS } from "../protocol.ts";
import { createRoom, joinRoom, RawClient, TestClient, testRelay, within, type Frame } from "./helpers.ts";

const SEED = Number(process.env.FUZZ_SEED ?? 20261130);
const FRAMES_PER_SOCKET = Number(process.env.FUZZ_FRAMES ?? 1500);
const HOSTILE_SOCKETS = 16;
const MAX_MESSAGE_BYTES = 8 * 1024;

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  return { next, int, pick };
}
type Rng = ReturnType<typeof prng>;

const WEIRD_VALUES: readonly unknown[] = [
  null, true, false, 0, -0, -1, 1.5, 1e308, -1e308, 2 ** 53 + 1, Number.MAX_SAFE_INTEGER, "", " ", "\u0000",
  "\ud800", "\udfff", "🎉", "\u2028", "x".repeat(200), [], [null], [1, 2, 3], {}, { __proto__: { polluted: true } },
  { constructor: { prototype: { polluted: true } } }, { toString: 1 }, { valueOf: "x" },
];
const TYPES = ["create", "join", "send", "set_state", "close_room", "leave", "ping", "kick", "nope", "", "CREATE", "__proto__", "toString"];
const FIELDS = ["type", "clientId", "maxClients", "room", "data", "to", "n", "url", "id", "index", "__proto__", "constructor"];
/** The first TYPES entry that is no message type. */
const FIRST_UNKNOWN_TYPE = TYPES.indexOf("nope");

function deepNest(rng: Rng): string {
  const depth = 10 + rng.int(3000);
  const open = rng.next() < 0.5 ? "[" : '{"a":';
  const close = open === "[" ? "]" : "}";
  return '{"type":"send","data":' + open.repeat(depth) + "1" + close.repeat(depth) + "}";
}

/** Frames shaped like the relay's splice fast path, with junk where `to` and `data` go. */
function spliceBait(rng: Rng): string {
  const junk = () => rng.pick(['1,"from":9', '1,"type":"x"', "", " ", "{", '"\\"', "1}", "[1,", '01', "1 2", '{"a":1}}', "null,", "0", "-0", '"\\ud800"']);
  return rng.next() < 0.5
    ? '{"type":"send","data":' + junk() + "}"
    : '{"type":"send","to":' + rng.pick(["0", "1", "01", "", "1.5", "99999999999", "2"]) + ',"data":' + junk() + "}";
}

/** A `create` whose url a Party-Sockets relay refuses: a scheme other than https, or a brace outside `{room}`/`{instance}`. */
function badUrlCreate(rng: Rng): string {
  const scheme = rng.pick(["http://p.example/", "javascript:alert(1)//", "wss://p.example/", "ftp://p.example/", "data:text/html,", "https://p.example/"]);
  const brace = rng.pick(["{room", "room}", "{}", "{{room}}", "{ROOM}", "{code}", "{room}}", "}{room}", "{instance", "x{room}{"]);
  return JSON.stringify({ type: "create", clientId: "fuzz-url", maxClients: 2, url: scheme + rng.pick(["", "{room}/"]) + brace });
}

/** A frame that is valid JSON object with a valid shape, for a room that exists. */
function validish(rng: Rng, code: string): Record<string, unknown> {
  const clientId = "fuzz-" + rng.int(50);
  return rng.pick([
    { type: "create", clientId, maxClients: 1 + rng.int(8) },
    { type: "join", clientId, room: code },
    { type: "send", data: { n: rng.int(1000) } },
    { type: "send", to: rng.int(6), data: "t" },
    { type: "send", to: [rng.int(6), rng.int(6)], data: [1] },
    { type: "set_state", data: { s: rng.int(9) } },
    { type: "leave" },
    { type: "close_room" },
    { type: "ping", id: rng.int(99) },
    { type: "kick", index: rng.int(6) },
  ]);
}

function mutate(rng: Rng, frame: Record<string, unknown>): Record<string, unknown> {
  const copy: Record<string, unknown> = { ...frame };
  const edits = 1 + rng.int(3);
  for (let i = 0; i < edits; i++) {
    const field = rng.pick(FIELDS);
    const roll = rng.next();
    if (roll < 0.2) delete copy[field];
    else if (roll < 0.35 && field === "type") copy.type = rng.pick(TYPES);
    else Object.defineProperty(copy, field, { value: rng.pick(WEIRD_VALUES), enumerable: true, configurable: true, writable: true });
  }
  return copy;
}

/** One hostile frame, and whether the relay must answer it with an error. */
function hostileFrame(rng: Rng, code: string): { frame: string | Uint8Array; mustError: boolean; oversized?: boolean } {
  const roll = rng.next();
  if (roll < 0.12) return { frame: rng.pick(["", "{", "}", "nul", "[1,", '{"type":', "\u0000", "🎉", "NaN", "{'a':1}"]), mustError: true };
  if (roll < 0.2) return { frame: JSON.stringify(rng.pick([null, 1, "s", [], [1, 2], true])), mustError: true };
  if (roll < 0.27) return { frame: crypto.getRandomValues(new Uint8Array(1 + rng.int(64))), mustError: true };
  if (roll < 0.3) return { frame: "x".repeat(MAX_MESSAGE_BYTES + 1 + rng.int(1000)), mustError: true, oversized: true };
  if (roll < 0.36) return { frame: deepNest(rng), mustError: false };
  if (roll < 0.39) return { frame: spliceBait(rng), mustError: false };
  if (roll < 0.41) return { frame: badUrlCreate(rng), mustError: true };
  if (roll < 0.44) return { frame: JSON.stringify({ type: rng.pick(TYPES.slice(FIRST_UNKNOWN_TYPE)), data: 1 }), mustError: true };
  if (roll < 0.75) return { frame: JSON.stringify(mutate(rng, validish(rng, code))), mustError: false };
  return { frame: JSON.stringify(validish(rng, code)), mustError: false };
}

const DOCUMENTED_CLOSES = new Set([1000, 1001, 1008, 1009, 4000, 4001, 4002, 4003, 4004]);
const KNOWN_TYPES = new Set(["created", "joined", "peer_joined", "peer_left", "message", "state", "left", "pong", "error"]);

const relay = testRelay({ maxMessageBytes: MAX_MESSAGE_BYTES, rateLimitPerSec: 0, logLevel: "warn" });
afterAll(() => relay.stop());

test(`seed ${SEED}: ${HOSTILE_SOCKETS} x ${FRAMES_PER_SOCKET} hostile frames; the real room loses nothing`, async () => {
  Bun.gc(true);
  const heapBefore = process.memoryUsage().heapUsed;
  const { host, code } = await createRoom(relay, "real-host", 256);
  const guests = await Promise.all([1, 2, 3].map((i) => joinRoom(relay, code, `real-guest-${i}`)));

  // The real game: numbered broadcasts from the host for the whole run.
  let sent = 0;
  let stop = false;
  const game = (async () => {
    while (!stop) {
      host.send({ type: "send", data: { n: sent++, text: "ok é 🎉" } });
      await host.barrier();
    }
  })();

  const stats = { frames: 0, errors: 0, closes: 0, answered: 0 };
  const errorCodes = new Set(Object.keys(ERRORS));

  async function hostileSocket(worker: number): Promise<void> {
    const rng = prng(SEED + worker);
    let client = await TestClient.connect(relay.wsUrl);
    for (let i = 0; i < FRAMES_PER_SOCKET; i++) {
      const { frame, mustError, oversized } = hostileFrame(rng, code);
      stats.frames++;
      client.ws.send(frame);
      if (oversized) {
        // Another socket may have replaced this one (4000) or closed its room (4001) first.
        const answered = await client.error("message_too_large").then(() => true, () => false);
        const { code: closeCode } = await client.closeCode();
        expect(answered ? closeCode === 1009 : DOCUMENTED_CLOSES.has(closeCode)).toBe(true);
        stats.closes++;
        client = await TestClient.connect(relay.wsUrl);
        continue;
      }
      // A ping after each frame marks where the relay's answers to it end.
      const id = `f${i}`;
      client.ws.send(JSON.stringify({ type: "ping", id }));
      let answers: Frame[];
      try {
        for (;;) {
          const pong = await client.next("pong");
          if (pong.id === id) break;
        }
        answers = client.frames.splice(0);
      } catch {
        const { code: closeCode } = await client.closeCode();
        expect(DOCUMENTED_CLOSES.has(closeCode)).toBe(true);
        stats.closes++;
        client = await TestClient.connect(relay.wsUrl);
        continue;
      }
      for (const a of answers) {
        expect(KNOWN_TYPES.has(a.type)).toBe(true);
        // Only the two placeholders are filled, so a created url never carries a brace.
        if (a.type === "created" && a.url !== undefined) expect(a.url).not.toMatch(/[{}]/);
        if (a.type === "error") {
          stats.errors++;
          expect(errorCodes.has(a.code)).toBe(true);
        }
      }
      if (answers.length > 0) stats.answered++;
      if (mustError) expect(answers.some((a) => a.type === "error")).toBe(true);
    }
    client.close();
  }

  await Promise.all(Array.from({ length: HOSTILE_SOCKETS }, (_, w) => hostileSocket(w)));
  stop = true;
  await game;

  // Every message of the real game reached every real guest, intact and in order.
  for (const { client } of guests) {
    const fromHost: number[] = [];
    while (fromHost.length < sent) {
      const m = await client.next("message");
      if (m.from !== 0) continue;
      expect(m.data.text).toBe("ok é 🎉");
      fromHost.push(m.data.n);
    }
    expect(fromHost).toEqual([...Array(sent).keys()]);
  }
  expect((await fetch(`${relay.url}/health`)).status).toBe(200);
  for (const { client } of guests) client.frames.length = 0;
  Bun.gc(true);
  // Relay and clients share this process: the heap left after a collection bounds what the relay kept.
  const heapGrowthMb = (process.memoryUsage().heapUsed - heapBefore) / 2 ** 20;
  const rssMb = process.memoryUsage().rss / 2 ** 20;
  console.log(JSON.stringify({ seed: SEED, ...stats, realMessages: sent, heapGrowthMb: +heapGrowthMb.toFixed(1), rssMb: Math.round(rssMb) }));
  expect(stats.frames).toBe(HOSTILE_SOCKETS * FRAMES_PER_SOCKET);
  expect(heapGrowthMb).toBeLessThan(64);
}, 60_000);

test(`seed ${SEED}: kick with hostile index values from the real host: target_not_found each time, nobody removed`, async () => {
  const rng = prng(SEED);
  const { host, code } = await createRoom(relay, "kick-host", 8);
  const guests = await Promise.all([1, 2, 3].map((i) => joinRoom(relay, code, `kick-guest-${i}`)));
  const hostileIndexes = [
    ...WEIRD_VALUES.filter((v) => !(typeof v === "number" && Number.isInteger(v) && v >= 1 && v <= 3)),
    ...Array.from({ length: 200 }, () =>
      rng.pick([
        () => 4 + rng.int(2 ** 31),
        () => -1 - rng.int(2 ** 31),
        () => rng.int(4) + rng.next(),
        () => String(rng.int(4)),
        () => [rng.int(4)],
        () => ({ index: rng.int(4) }),
        () => 2 ** (31 + rng.int(1000)),
      ])(),
    ),
  ];
  for (const index of hostileIndexes) {
    host.send(`{"type":"kick","index":${JSON.stringify(index) ?? "null"}}`);
    expect((await host.next("error")).code).toBe("target_not_found");
  }
  // Hand-written frames JSON.stringify cannot make: the raw text is what the relay parses.
  for (const raw of ["-0", "-1e-400", "1e400", "4e0", "0.5e1", "01", "NaN", "Infinity", "0x1", '"1"', "true"]) {
    host.send(`{"type":"kick","index":${raw}}`);
    const answer = await host.next("error");
    expect(["target_not_found", "invalid_json"]).toContain(answer.code);
  }
  for (const { client } of guests) expect(client.ws.readyState).toBe(WebSocket.OPEN);
  host.send({ type: "send", data: "everyone still here" });
  for (const { client } of guests) expect((await client.next("message")).data).toBe("everyone still here");
});

test("invalid UTF-8 in a text frame is closed by Bun with 1007 and the relay lives on", async () => {
  const raw = await RawClient.connect(relay.port);
  raw.sendFrame(0x1, Buffer.from([0x7b, 0xff, 0xfe, 0x7d]));
  await raw.endOrClose();
  expect(raw.closeCode).toBe(1007);
  const c = await TestClient.connect(relay.wsUrl);
  c.send({ type: "ping", id: 1 });
  expect((await c.next("pong")).id).toBe(1);
});

test("a frame over Bun's hard limit (4 x MAX_MESSAGE_BYTES) is cut with 1009 and the relay lives on", async () => {
  const c = await TestClient.connect(relay.wsUrl);
  c.send("x".repeat(MAX_MESSAGE_BYTES * 4 + 10));
  expect((await within(c.closed, "the hard-limit close")).code).toBe(1009);
  expect((await fetch(`${relay.url}/health`)).status).toBe(200);
});

// The send fast path splices `data` as written (after checking it is one JSON
// value) instead of parsing the whole frame; everything else goes through
// JSON.parse. If the two ever disagreed, a frame JSON.parse rejects could be
// relayed (broken or injected JSON reaching every peer), or a good one refused.
// Seeded mutants of tricky JSON, near misses included, sent through a real
// relay: each must come out exactly as JSON.parse of the whole frame says.
const JSON_SEEDS: readonly string[] = [
  '{"a":1}', "[1,2,3]", '"s"', "-0", "0", "1e5", "1E+2", "0.5e-3", "-12.75", "123456789012345678901234567890",
  '{"k":[true,false,null]}', '"\\u00e9\\n\\t\\"\\\\\\/\\b\\f\\r"', '"\\ud83d\\ude00"', '" { \\u005b "', ' { "a" : [ 1 , { } ] } ',
  "[[[[]]]]", '{"":""}', '"é🎉\u2028"', "true", "false", "null", '{"a":{"b":{"c":[{}]}}}', "\t\n\r 7 \r\n\t",
];
const MUTATION_CHARS = '{}[]":,.-+eE0123456789tfnrula\\/ \t\n\r\u0001\u000bé';

function mutant(rng: Rng): string {
  const r = rng.next();
  if (r < 0.08) {
    // Deep nesting, sometimes unbalanced.
    const depth = 28 + rng.int(8);
    const open = rng.next() < 0.5 ? "[" : '{"k":';
    const close = open === "[" ? "]" : "}";
    return open.repeat(depth) + rng.pick(JSON_SEEDS) + close.repeat(depth - rng.int(2));
  }
  if (r < 0.16) return rng.pick(JSON_SEEDS) + rng.pick([" ", ",", "", " 1", "}", "]", ',"x":1']) + rng.pick(JSON_SEEDS);
  let text = rng.pick(JSON_SEEDS);
  for (let edits = 1 + rng.int(3); edits > 0; edits--) {
    const at = rng.int(text.length + 1);
    const c = rng.pick([...MUTATION_CHARS]);
    const op = rng.int(3);
    text = op === 0 ? text.slice(0, at) + c + text.slice(at) : op === 1 ? text.slice(0, at) + c + text.slice(at + 1) : text.slice(0, at) + text.slice(at + 1);
  }
  return text;
}

test(`seed ${SEED}: the send fast path accepts exactly the data JSON.parse accepts`, async () => {
  const r = testRelay({ rateLimitPerSec: 0 });
  const { host, code } = await createRoom(r);
  const guest = await joinRoom(r, code);
  const rng = prng(SEED + 1);
  const expectedData: string[] = [];
  let expectedErrors = 0;
  let sent = 0;
  for (let n = 0; n < 4000; n++) {
    const text = '{"type":"send",' + (rng.next() < 0.3 ? '"to":1,' : "") + '"data":' + mutant(rng) + "}";
    // What the wire carries: UTF-8 has no lone surrogates (a split emoji becomes U+FFFD).
    const frame = Buffer.from(text, "utf8").toString("utf8");
    let parsed: Record<string, unknown> | undefined;
    try {
      parsed = JSON.parse(frame);
    } catch {
      parsed = undefined;
    }
    // A mutant that turned into other fields (`,"to":…`) is a different test: skip it.
    if (parsed && !(Object.keys(parsed).join() === "type,data" || Object.keys(parsed).join() === "type,to,data")) continue;
    if (parsed && parsed.data === undefined) continue;
    // The general path re-serialises (-0 becomes 0), the fast path keeps the text: compare values.
    if (parsed) expectedData.push(JSON.stringify(parsed.data));
    else expectedErrors++;
    host.send(frame);
    sent++;
  }
  await host.barrier();
  await guest.client.barrier();
  const got = guest.client.frames.filter((f) => f.type !== "pong");
  expect(got.every((f) => f.type === "message")).toBe(true);
  expect(got.map((f) => JSON.stringify(f.data))).toEqual(expectedData);
  const errors = host.frames.filter((f) => f.type === "error");
  expect(errors.map((f) => f.code)).toEqual(Array(expectedErrors).fill("invalid_json"));
  // Both outcomes occur in volume, so neither side of the check is vacuous.
  expect(expectedData.length).toBeGreaterThan(500);
  expect(expectedErrors).toBeGreaterThan(500);
  expect(sent).toBe(expectedData.length + expectedErrors);
  await r.stop();
});

// Lossless sends: `n` is read in place on the fast path and by JSON.parse on the
// general one. Seeded hostile and near-miss `n` texts, in both positions the
// fast path knows and elsewhere, must come out exactly as the rule says:
// invalid JSON → invalid_json; n not a positive safe integer → invalid_n and
// nothing relayed; n not above the highest accepted → dropped silently.
const N_TEXTS: readonly string[] = [
  "0", "-0", "-1", "1.5", "1e3", "2.0", "01", "00", "+1", " 1", "1 ", "", "null", "true", '"1"', "[1]", "{}", "NaN",
  "9007199254740992", "99999999999999999999", "0x10", "1e400", "-999999999999999",
];
/** Valid, and past any number the loop draws: sent last, the fast path's longest and the general path's. */
const N_LARGEST: readonly string[] = ["999999999999999", "1000000000000000", "9007199254740991"];

test(`seed ${SEED}: n is checked alike on the fast and the general path (invalid_n, duplicates)`, async () => {
  const r = testRelay({ rateLimitPerSec: 0 });
  const { host, code } = await createRoom(r);
  const guest = await joinRoom(r, code);
  const rng = prng(SEED + 2);
  let received = 0;
  const expectedData: number[] = [];
  const expectedErrors: string[] = [];
  const FRAMES = 3000;
  for (let i = 0; i < FRAMES + N_LARGEST.length; i++) {
    // Mostly numbers near the highest accepted (new, or duplicates), often hostile text.
    const nText = i >= FRAMES ? N_LARGEST[i - FRAMES]! : rng.next() < 0.4 ? rng.pick(N_TEXTS) : String(Math.max(0, received + rng.int(5) - 2));
    const shape = rng.int(4);
    const text =
      shape === 0 ? `{"type":"send","n":${nText},"data":${i}}`
      : shape === 1 ? `{"type":"send","to":1,"n":${nText},"data":${i}}`
      : shape === 2 ? `{"type":"send","data":${i},"n":${nText}}`
      : `{"n":${nText},"to":[1],"type":"send","data":${i}}`;
    let parsed: Record<string, unknown> | undefined;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    const n = parsed?.n;
    if (!parsed) expectedErrors.push("invalid_json");
    else if (!(Number.isSafeInteger(n) && (n as number) > 0)) expectedErrors.push("invalid_n");
    else if ((n as number) > received) {
      received = n as number;
      expectedData.push(i);
    }
    host.send(text);
  }
  await host.barrier();
  await guest.client.barrier();
  expect(guest.client.frames.filter((f) => f.type === "message").map((f) => f.data)).toEqual(expectedData);
  expect(host.frames.filter((f) => f.type === "error").map((f) => f.code)).toEqual(expectedErrors);
  host.send({ type: "ping", id: "end" });
  expect((await host.next("pong")).received).toBe(received);
  // Every outcome occurs in volume, so no side of the check is vacuous.
  expect(expectedData.length).toBeGreaterThan(300);
  expect(expectedErrors.filter((c) => c === "invalid_n").length).toBeGreaterThan(300);
  expect(expectedErrors.filter((c) => c === "invalid_json").length).toBeGreaterThan(100);
  expect(FRAMES - expectedData.length - expectedErrors.length).toBeGreaterThan(300);
  expect(received).toBe(Number.MAX_SAFE_INTEGER);
  await r.stop();
});
