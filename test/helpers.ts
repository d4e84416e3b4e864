// Test fixtures: relays built through the factory, and clients that can
// `await next("type")`. Every wait is bounded and says what it waited for.

import { startRelay, type Relay, type RelayOptions } from "../server.ts";

export const WAIT_MS = 3_000;

/** Rejects after `ms` with a message naming what never happened. */
export function within<T>(promise: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: Timer;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export type Frame = Record<string, any> & { type: string };

/** Collects log lines so tests can check them (and that they leak nothing). */
export function testRelay(options: Partial<RelayOptions> = {}): Relay & { logs: string[] } {
  const logs: string[] = [];
  const relay = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "debug", logSink: (l) => logs.push(l), ...options });
  return Object.assign(relay, { logs });
}

/** A browser-like client (Bun's WebSocket) that queues every frame it receives. */
export class TestClient {
  readonly frames: Frame[] = [];
  /** Every raw text frame ever received, for leak checks. */
  readonly raw: string[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  private waiters: (() => void)[] = [];
  private pingId = 0;

  private constructor(readonly ws: WebSocket) {
    ws.onmessage = (e) => {
      const text = String(e.data);
      this.raw.push(text);
      // A frame that is not JSON is queued under a type no test expects, so it fails loudly.
      let frame: Frame;
      try {
        frame = JSON.parse(text);
      } catch {
        frame = { type: "<invalid JSON from the relay>", text };
      }
      this.frames.push(frame);
      this.wake();
    };
    this.closed = new Promise((resolve) => {
      ws.onclose = (e) => {
        resolve({ code: e.code, reason: e.reason });
        this.wake();
      };
    });
  }

  static async connect(url: string, headers?: Record<string, string>): Promise<TestClient> {
    const ws = new WebSocket(url, headers ? ({ headers } as any) : undefined);
    const client = new TestClient(ws);
    await within(
      new Promise<void>((resolve, reject) => {
        ws.onopen = () => resolve();
        ws.onerror = () => reject(new Error(`could not connect to ${url}`));
      }),
      `a WebSocket connection to ${url}`,
    );
    return client;
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(frame: unknown): void {
    this.ws.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  /** Takes the first queued frame of this type (waiting for it); other frames stay queued. */
  async next(type: string, ms = WAIT_MS): Promise<Frame> {
    const found = () => {
      const i = this.frames.findIndex((f) => f.type === type);
      return i < 0 ? undefined : this.frames.splice(i, 1)[0];
    };
    const wait = async () => {
      for (;;) {
        const f = found();
        if (f) return f;
        if (this.ws.readyState === WebSocket.CLOSED) throw new Error(`socket closed while waiting for "${type}"`);
        await new Promise<void>((r) => this.waiters.push(r));
      }
    };
    return within(wait(), `a "${type}" frame`, ms);
  }

  /** The next error frame, checked to carry this code. */
  async error(code: string): Promise<Frame> {
    const f = await this.next("error");
    if (f.code !== code) throw new Error(`expected error ${code}, got ${JSON.stringify(f)}`);
    return f;
  }

  /**
   * A round trip through the relay: everything the relay sent this socket
   * before handling our ping has arrived once the pong is here.
   */
  async barrier(): Promise<void> {
    const id = `barrier-${++this.pingId}`;
    this.send({ type: "ping", id });
    for (;;) {
      const pong = await this.next("pong");
      if (pong.id === id) return;
    }
  }

  /** Frames of this type that arrived and were not taken. */
  pending(type: string): Frame[] {
    return this.frames.filter((f) => f.type === type);
  }

  async closeCode(): Promise<{ code: number; reason: string }> {
    return within(this.closed, "the socket to close");
  }

  close(): void {
    this.ws.close();
  }
}

export async function createRoom(relay: Relay, clientId = "host-" + crypto.randomUUID(), maxClients = 8, extra = {}) {
  const host = await TestClient.connect(relay.wsUrl);
  host.send({ type: "create", clientId, maxClients, ...extra });
  const created = await host.next("created");
  return { host, code: created.room as string, created, clientId };
}

export async function joinRoom(relay: Relay, code: string, clientId = "guest-" + crypto.randomUUID()) {
  const client = await TestClient.connect(relay.wsUrl);
  client.send({ type: "join", clientId, room: code });
  const joined = await client.next("joined");
  return { client, joined, clientId };
}

/** The HTTP status a WebSocket upgrade request with these headers gets (raw TCP: any status, no upgrade kept). */
export async function upgradeStatus(port: number, headers: Record<string, string> = {}, path = "/"): Promise<number> {
  let answered!: (status: number) => void;
  const status = new Promise<number>((resolve) => (answered = resolve));
  const socket = await Bun.connect({
    hostname: "127.0.0.1",
    port,
    socket: {
      data(s, chunk) {
        answered(Number(chunk.toString("latin1").split(" ")[1]));
        s.end();
      },
    },
  });
  const extra = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`).join("");
  socket.write(
    `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n${extra}\r\n`,
  );
  return within(status, `an answer to the upgrade request on port ${port}`);
}

/**
 * A hand-rolled RFC 6455 client over a raw TCP socket, for what a browser
 * cannot do: stop reading (slow consumer), ignore pings (dead phone), send
 * binary or oversized frames byte-exactly.
 */
export class RawClient {
  private buffer = Buffer.alloc(0);
  readonly texts: string[] = [];
  closeCode: number | undefined;
  ended = false;
  private waiters: (() => void)[] = [];

  private constructor(private socket: import("bun").Socket<undefined>) {}

  static async connect(port: number, host = "127.0.0.1"): Promise<RawClient> {
    let client!: RawClient;
    let upgraded!: () => void;
    const ready = new Promise<void>((r) => (upgraded = r));
    let handshakeDone = false;
    const socket = await Bun.connect({
      hostname: host,
      port,
      socket: {
        data(_s, chunk) {
          if (!handshakeDone) {
            const text = chunk.toString("latin1");
            const end = text.indexOf("\r\n\r\n");
            handshakeDone = true;
            upgraded();
            chunk = chunk.subarray(end + 4);
          }
          client.onData(chunk);
        },
        close() {
          client.ended = true;
          client.wake();
        },
      },
    });
    client = new RawClient(socket);
    const key = Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("base64");
    socket.write(
      `GET / HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
    );
    await within(ready, "the raw WebSocket handshake");
    return client;
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private onData(chunk: Buffer): void {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (;;) {
      if (this.buffer.length < 2) return;
      const opcode = this.buffer[0]! & 0x0f;
      let length = this.buffer[1]! & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (this.buffer.length < 4) return;
        length = this.buffer.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (this.buffer.length < 10) return;
        length = Number(this.buffer.readBigUInt64BE(2));
        offset = 10;
      }
      if (this.buffer.length < offset + length) return;
      const payload = this.buffer.subarray(offset, offset + length);
      this.buffer = this.buffer.subarray(offset + length);
      if (opcode === 0x1) this.texts.push(payload.toString("utf8"));
      if (opcode === 0x8) this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      this.wake();
    }
  }

  /** A masked frame, as clients must send. */
  sendFrame(opcode: number, payload: Buffer): void {
    const mask = Buffer.from(crypto.getRandomValues(new Uint8Array(4)));
    const len = payload.length;
    const header =
      len < 126
        ? Buffer.from([0x80 | opcode, 0x80 | len])
        : len < 65536
          ? Buffer.from([0x80 | opcode, 0x80 | 126, len >> 8, len & 0xff])
          : (() => {
              const h = Buffer.alloc(10);
              h[0] = 0x80 | opcode;
              h[1] = 0x80 | 127;
              h.writeBigUInt64BE(BigInt(len), 2);
              return h;
            })();
    const masked = Buffer.from(payload);
    for (let i = 0; i < masked.length; i++) masked[i]! ^= mask[i & 3]!;
    this.socket.write(Buffer.concat([header, mask, masked]));
  }

  send(frame: unknown): void {
    this.sendFrame(0x1, Buffer.from(typeof frame === "string" ? frame : JSON.stringify(frame)));
  }

  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    this.socket.resume();
  }

  /** Waits until a predicate over what arrived holds (or the socket ends). */
  async until(what: string, done: () => boolean, ms = WAIT_MS): Promise<void> {
    const wait = async () => {
      while (!done()) {
        if (this.ended) throw new Error(`socket ended while waiting for ${what}`);
        await new Promise<void>((r) => this.waiters.push(r));
      }
    };
    await within(wait(), what, ms);
  }

  async endOrClose(ms = WAIT_MS): Promise<void> {
    const wait = async () => {
      while (!this.ended && this.closeCode === undefined) await new Promise<void>((r) => this.waiters.push(r));
    };
    await within(wait(), "the raw socket to close", ms);
  }

  frames(): Frame[] {
    return this.texts.map((t) => JSON.parse(t));
  }

  end(): void {
    this.socket.end();
  }
}
