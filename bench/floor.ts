// The floor: the cheapest Bun server that makes the same deliveries as the relay.
//
// It answers the first frame of each socket (`create` / `join`, the only frame it
// parses) and from then on re-publishes every frame unchanged through a topic per
// room: no JSON parse, no validation, no rate limit, no backpressure policy. What
// the relay costs above this is what our own code costs; issue 6 asks for ≤ 1.15×.
//
// Deliveries it makes, mirroring the relay so the load generator drives both:
// - `create` → `{"type":"created","room":CODE,"index":0}`; the socket subscribes to the room topic.
// - `join`   → `{"type":"joined","room":CODE,"index":N,"peers":[]}` and `{"type":"peer_joined","index":N}`
//              published to the others (the relay sends the same event, so churn compares like for like).
// - any later frame → `ws.publish(topic, frame)` (every other member), unchanged. The receiver
//   therefore sees the sender's own `{"type":"send",...}` text instead of `{"type":"message",...}`;
//   the load generator reads both.
// - targeted: a later frame that starts with `{"type":"send","to":` followed by digits is sent
//   unchanged to that slot only (`ws.send`), without parsing the rest; a missing slot drops it.
// - close → `{"type":"peer_left","index":N}` to the others; the room is forgotten when empty.
//
// FLOOR_WRAP=1 ("floor-wrap" in the runner): instead of the sender's frame, deliver exactly
// the relay's frame shape, `{"type":"message","from":N,"seq":S,"data":X}`, built by the
// cheapest JS there is (one slice of X, one concatenation, a per-room counter), still with no
// parse, validation, rate limit or resume buffer. It assumes the bench's sender frames,
// `{"type":"send",["to":N,]"data":X}`. The gap floor → floor-wrap is what the protocol's
// frame shape costs in Bun (new string, ~25 more bytes per delivery over loopback); the gap
// floor-wrap → ours is what our own logic costs.
//
// FLOOR_PAD=N: deliver the sender's frame plus N spaces, as a new string decoded from bytes (the
// cheapest way to make one). This isolates what a relay pays for sending a string it made rather
// than the one it received, and for its length: see "The 160-byte step" in bench/README.md.
//
// Run: `PORT=9001 bun run bench/floor.ts` (PORT 0 picks a free port). Prints one JSON line
// `{"event":"start","port":N}` on stdout. GET /health answers 200.

import type { Server, ServerWebSocket } from "bun";

interface FloorRoom {
  readonly code: string;
  readonly topic: string;
  readonly slots: (ServerWebSocket<Member> | null)[];
  present: number;
  /** FLOOR_WRAP: the last frame number. */
  seq: number;
}

interface Member {
  room: FloorRoom | null;
  slot: number;
}

/** `{"type":"send","to":` — a targeted send as our load generator (and most clients) write it. */
const TO_PREFIX = '{"type":"send","to":';
/** Index of the `t` of `"to"` in TO_PREFIX: one charCode test keeps broadcasts off the slow path. */
const TO_PROBE_INDEX = 16;
const CODE_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

const rooms = new Map<string, FloorRoom>();
const WRAP = process.env.FLOOR_WRAP === "1";
const PAD = Number(process.env.FLOOR_PAD ?? 0);
const padScratch = Buffer.alloc(PAD > 0 ? 1 << 20 : 0);
/** `{"type":"send","data":` */
const DATA_AT = 22;

function newCode(): string {
  for (;;) {
    let code = "";
    for (let i = 0; i < 6; i++) code += CODE_ALPHABET[Math.floor(Math.random() * CODE_ALPHABET.length)];
    if (!rooms.has(code)) return code;
  }
}

/** Where the digits of a targeted frame end (set by targetSlot). */
let digitsEnd = 0;

/** The slot named by a targeted frame, or -1 when the frame is not `{"type":"send","to":<digits>`. */
function targetSlot(frame: string): number {
  if (frame.charCodeAt(TO_PROBE_INDEX) !== 116 || !frame.startsWith(TO_PREFIX)) return -1;
  let n = 0;
  let i = TO_PREFIX.length;
  for (; i < frame.length; i++) {
    const c = frame.charCodeAt(i) - 48;
    if (c < 0 || c > 9) break;
    n = n * 10 + c;
  }
  digitsEnd = i;
  return i === TO_PREFIX.length ? -1 : n;
}

/** FLOOR_PAD: the frame and PAD spaces, as a new string. */
function padded(frame: string): string {
  const n = padScratch.write(frame, 0, "utf8");
  padScratch.fill(32, n, n + PAD);
  return padScratch.toString("utf8", 0, n + PAD);
}

/** FLOOR_WRAP: the relay's frame around the data text that starts at `dataAt`. */
function wrap(room: FloorRoom, from: number, frame: string, dataAt: number): string {
  return '{"type":"message","from":' + from + ',"seq":' + ++room.seq + ',"data":' + frame.slice(dataAt, -1) + "}";
}

function firstFrame(server: Server<Member>, ws: ServerWebSocket<Member>, frame: string): void {
  let msg: { type?: unknown; room?: unknown };
  try {
    msg = JSON.parse(frame) as { type?: unknown; room?: unknown };
  } catch {
    ws.send('{"type":"error","code":"invalid_json","message":"Invalid JSON"}');
    return;
  }
  if (msg.type === "create") {
    const code = newCode();
    const room: FloorRoom = { code, topic: "r:" + code, slots: [ws], present: 1, seq: 0 };
    rooms.set(code, room);
    ws.data.room = room;
    ws.data.slot = 0;
    ws.subscribe(room.topic);
    ws.send(`{"type":"created","room":"${code}","index":0}`);
  } else if (msg.type === "join") {
    const room = typeof msg.room === "string" ? rooms.get(msg.room) : undefined;
    if (room === undefined) {
      ws.send('{"type":"error","code":"room_not_found","message":"Room not found"}');
      return;
    }
    const slot = room.slots.length;
    room.slots.push(ws);
    room.present++;
    ws.data.room = room;
    ws.data.slot = slot;
    server.publish(room.topic, `{"type":"peer_joined","index":${slot}}`);
    ws.subscribe(room.topic);
    ws.send(`{"type":"joined","room":"${room.code}","index":${slot},"peers":[]}`);
  } else {
    ws.send('{"type":"error","code":"not_in_room","message":"Not in a room"}');
  }
}

export function startFloor(port: number): Server<Member> {
  const server: Server<Member> = Bun.serve<Member>({
    port,
    hostname: "127.0.0.1",
    fetch(req, srv) {
      if (srv.upgrade(req, { data: { room: null, slot: -1 } })) return undefined;
      return new URL(req.url).pathname === "/health"
        ? Response.json({ status: "ok" })
        : new Response("floor\n");
    },
    websocket: {
      message(ws, message) {
        const room = ws.data.room;
        if (typeof message !== "string") return;
        if (room === null) return firstFrame(server, ws, message);
        const to = targetSlot(message);
        if (to < 0) {
          ws.publish(room.topic, WRAP ? wrap(room, ws.data.slot, message, DATA_AT) : PAD > 0 ? padded(message) : message);
        } else {
          const target = room.slots[to];
          // `,"data":` follows the digits: 8 characters.
          if (target) target.send(WRAP ? wrap(room, ws.data.slot, message, digitsEnd + 8) : message);
        }
      },
      close(ws) {
        const room = ws.data.room;
        if (room === null) return;
        ws.data.room = null;
        room.slots[ws.data.slot] = null;
        if (--room.present === 0) rooms.delete(room.code);
        else server.publish(room.topic, `{"type":"peer_left","index":${ws.data.slot}}`);
      },
    },
  });
  return server;
}

if (import.meta.main) {
  const server = startFloor(Number(process.env.PORT ?? 0));
  console.log(JSON.stringify({ event: "start", port: server.port }));
  const stop = (): void => {
    void server.stop(true);
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
