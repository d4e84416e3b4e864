// A minimal RFC 6455 client over Bun.connect, built for load generation.
//
// Bun's built-in WebSocket client costs about 1.4 µs of client CPU per delivery (a
// MessageEvent and a string per frame), so a generator built on it measures itself.
// This one:
// - parses incoming frames in place in the chunk Bun hands us (a partial frame at the
//   end of a chunk is copied into a per-connection buffer, allocated only when needed);
// - hands text payloads to the caller as (bytes, start, end) without making a string;
// - builds outgoing frames straight into a per-connection byte buffer and writes each
//   dirty connection once per event-loop turn (setImmediate), so a turn that triggers
//   many sends costs one syscall per socket;
// - masks with the all-zero key. RFC 6455 wants an unpredictable key (against proxy cache
//   poisoning, irrelevant on loopback); the server still runs its unmask loop over every
//   byte, so its cost is unchanged while the client skips the XOR. Likewise one
//   Sec-WebSocket-Key per process (the server hashes whatever it gets; we check its answer
//   against one precomputed accept value instead of a SHA-1 per connection).
// - answers pings with pongs and completes the close handshake, letting the server close
//   TCP first (TIME_WAIT then sits on the server side, not on our ephemeral ports).

import type { Socket } from "bun";

export const enum State {
  Connecting = 0,
  Handshake = 1,
  Open = 2,
  Closing = 3,
  Closed = 4,
}

export interface WsHandler<U> {
  /** The upgrade completed. */
  open(c: Conn<U>): void;
  /** A complete text frame; its payload is `buf[start..end)`, valid only during the call. */
  text(c: Conn<U>, buf: Uint8Array, start: number, end: number): void;
  /** The socket closed. `code` is the close frame's code, 1005 without one, 1006 without a close frame. */
  closed(c: Conn<U>, code: number, reason: string): void;
}

const encoder = new TextEncoder();
const WS_KEY = Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("base64");
const WS_ACCEPT_HEADER = `sec-websocket-accept: ${new Bun.CryptoHasher("sha1").update(WS_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest("base64")}`.toLowerCase();
const decoder = new TextDecoder();

const dirty: Conn<unknown>[] = [];
let flushScheduled = false;

function flushAll(): void {
  flushScheduled = false;
  // A flush can run handlers that mark more connections dirty; they join this loop.
  for (let i = 0; i < dirty.length; i++) dirty[i]!.flush();
  dirty.length = 0;
}

/** Counters shared by every connection of the process. */
export const wsStats = {
  connectErrors: 0,
  handshakeErrors: 0,
  binaryFrames: 0,
  fragmentedFrames: 0,
  pings: 0,
  writeCalls: 0,
  partialWrites: 0,
  /** Data callbacks so far: a consumer can read the clock once per chunk. */
  chunks: 0,
};

export class Conn<U> {
  state: State = State.Connecting;
  sock: Socket<Conn<U>> | null = null;
  /** Close code received (or 1006). */
  closeCode = 1006;
  closeReason = "";
  /** Outgoing bytes not yet handed to the kernel. */
  private out: Uint8Array = EMPTY;
  private outLen = 0;
  private isDirty = false;
  private blocked = false;
  /** Leftover bytes of a partial incoming frame (or handshake). */
  private inBuf: Uint8Array = EMPTY;
  private inLen = 0;
  private closeSent = false;

  constructor(
    readonly handler: WsHandler<U>,
    public user: U,
  ) {}

  // ------------------------------------------------------------------ output

  /** Make room for `n` more outgoing bytes and return the write offset. */
  reserve(n: number): number {
    const need = this.outLen + n;
    if (need > this.out.length) {
      let size = Math.max(512, this.out.length * 2);
      while (size < need) size *= 2;
      const grown = new Uint8Array(size);
      grown.set(this.out.subarray(0, this.outLen));
      this.out = grown;
    }
    const at = this.outLen;
    this.outLen = need;
    this.markDirty();
    return at;
  }

  /** Bytes queued but not yet accepted by the kernel. */
  get pendingBytes(): number {
    return this.outLen;
  }

  /** The buffer `reserve` offsets point into (it may move on the next `reserve`). */
  get outBuf(): Uint8Array {
    return this.out;
  }

  /** Append a prebuilt frame (see `buildTextFrame`) and return its offset, for patching in place. */
  appendFrame(frame: Uint8Array): number {
    const at = this.reserve(frame.length);
    this.out.set(frame, at);
    return at;
  }

  /** Send a text frame built from a string (setup and control traffic; not the hot path). */
  sendText(text: string): void {
    this.appendFrame(buildTextFrame(encoder.encode(text)));
  }

  /** Send a binary frame (the relay answers `binary_unsupported`). */
  sendBinary(bytes: Uint8Array): void {
    this.appendFrame(buildFrame(bytes, 2));
  }

  /** Start the close handshake. */
  close(code = 1000): void {
    if (this.state >= State.Closing) return;
    this.state = State.Closing;
    this.writeClose(code);
  }

  /** Drop the TCP connection with no close handshake. */
  terminate(): void {
    this.sock?.terminate();
  }

  private writeClose(code: number): void {
    if (this.closeSent || this.sock === null) return;
    this.closeSent = true;
    const at = this.reserve(8);
    const o = this.out;
    o[at] = 0x88;
    o[at + 1] = 0x80 | 2;
    o[at + 2] = o[at + 3] = o[at + 4] = o[at + 5] = 0;
    o[at + 6] = code >> 8;
    o[at + 7] = code & 255;
  }

  private markDirty(): void {
    if (this.isDirty) return;
    this.isDirty = true;
    dirty.push(this as Conn<unknown>);
    if (!flushScheduled) {
      flushScheduled = true;
      setImmediate(flushAll);
    }
  }

  /** Write pending bytes (called once per turn for dirty connections, and on drain). */
  flush(): void {
    this.isDirty = false;
    const sock = this.sock;
    if (sock === null || this.outLen === 0 || this.blocked || this.state < State.Open) return;
    wsStats.writeCalls++;
    const wrote = sock.write(this.out, 0, this.outLen);
    if (wrote < this.outLen) {
      wsStats.partialWrites++;
      this.blocked = true;
      if (wrote > 0) this.out.copyWithin(0, wrote, this.outLen);
      this.outLen -= Math.max(wrote, 0);
    } else {
      this.outLen = 0;
    }
  }

  // ------------------------------------------------------------------ input

  /** Socket callbacks (one handler object for every connection). */
  static readonly socketHandler = {
    open(sock: Socket<Conn<unknown>>): void {
      const c = sock.data;
      c.sock = sock;
      c.state = State.Handshake;
      sock.write(c.handshakeRequest());
    },
    data(sock: Socket<Conn<unknown>>, chunk: Uint8Array): void {
      sock.data.onData(chunk);
    },
    drain(sock: Socket<Conn<unknown>>): void {
      const c = sock.data;
      c.blocked = false;
      c.flush();
    },
    end(sock: Socket<Conn<unknown>>): void {
      // The server closed TCP (after its close frame, or abruptly): close our side too.
      sock.end();
    },
    close(sock: Socket<Conn<unknown>>): void {
      sock.data.onClosed();
    },
    error(sock: Socket<Conn<unknown>>): void {
      sock.data.onClosed();
    },
    connectError(sock: Socket<Conn<unknown>>): void {
      wsStats.connectErrors++;
      sock.data.onClosed();
    },
  };

  private host = "";
  private path = "/";

  /** Open the TCP connection; the handler's `open` fires once the upgrade completes. */
  connect(hostname: string, port: number, path = "/"): void {
    this.host = `${hostname}:${port}`;
    this.path = path;
    Bun.connect<Conn<unknown>>({
      hostname,
      port,
      data: this as Conn<unknown>,
      socket: Conn.socketHandler,
    }).catch(() => {
      wsStats.connectErrors++;
      this.onClosed();
    });
  }

  private handshakeRequest(): string {
    return (
      `GET ${this.path} HTTP/1.1\r\nHost: ${this.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: ${WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n`
    );
  }

  private onClosed(): void {
    if (this.state === State.Closed) return;
    this.state = State.Closed;
    this.sock = null;
    this.handler.closed(this, this.closeCode, this.closeReason);
  }

  private onData(chunk: Uint8Array): void {
    wsStats.chunks++;
    if (this.inLen === 0) {
      const used = this.state === State.Handshake ? this.handshake(chunk, chunk.length) : this.parse(chunk, chunk.length);
      if (used < chunk.length) this.keep(chunk, used, chunk.length);
      return;
    }
    // Append to the partial frame we kept, then parse from the buffer.
    this.keep(chunk, 0, chunk.length);
    const buf = this.inBuf;
    const used = this.state === State.Handshake ? this.handshake(buf, this.inLen) : this.parse(buf, this.inLen);
    if (used > 0) {
      buf.copyWithin(0, used, this.inLen);
      this.inLen -= used;
    }
  }

  /** Append bytes [from, to) of `src` to inBuf. */
  private keep(src: Uint8Array, from: number, to: number): void {
    const need = this.inLen + (to - from);
    if (need > this.inBuf.length) {
      const grown = new Uint8Array(Math.max(4096, need * 2));
      grown.set(this.inBuf.subarray(0, this.inLen));
      this.inBuf = grown;
    }
    this.inBuf.set(src.subarray(from, to), this.inLen);
    this.inLen = need;
  }

  /** Consume the HTTP 101 answer; returns bytes used (0 while incomplete). */
  private handshake(buf: Uint8Array, end: number): number {
    let i = 3;
    for (; i < end; i++) {
      if (buf[i] === 10 && buf[i - 1] === 13 && buf[i - 2] === 10 && buf[i - 3] === 13) break;
    }
    if (i >= end) return 0;
    const head = decoder.decode(buf.subarray(0, i + 1));
    if (!head.startsWith("HTTP/1.1 101") || !head.toLowerCase().includes(WS_ACCEPT_HEADER)) {
      wsStats.handshakeErrors++;
      this.closeReason = head.split("\r\n", 1)[0] ?? "bad handshake";
      this.sock?.terminate();
      return end;
    }
    this.state = State.Open;
    this.handler.open(this);
    if (this.outLen > 0) this.markDirty();
    return i + 1 + this.parse(buf.subarray(i + 1, end), end - i - 1);
  }

  /** Parse whole frames in buf[0..end); returns the bytes consumed. */
  private parse(buf: Uint8Array, end: number): number {
    let off = 0;
    while (end - off >= 2) {
      const b0 = buf[off]!;
      let len = buf[off + 1]! & 127;
      let p = off + 2;
      if (len === 126) {
        if (end - off < 4) break;
        len = (buf[off + 2]! << 8) | buf[off + 3]!;
        p = off + 4;
      } else if (len === 127) {
        if (end - off < 10) break;
        len = (buf[off + 6]! * 16777216 + ((buf[off + 7]! << 16) | (buf[off + 8]! << 8) | buf[off + 9]!)) + buf[off + 5]! * 4294967296;
        p = off + 10;
      }
      if (end - p < len) break;
      const opcode = b0 & 15;
      if (opcode === 1 && (b0 & 0x80) !== 0) {
        if (this.state === State.Open) this.handler.text(this, buf, p, p + len);
      } else if (opcode === 8) {
        this.closeCode = len >= 2 ? (buf[p]! << 8) | buf[p + 1]! : 1005;
        this.closeReason = len > 2 ? decoder.decode(buf.subarray(p + 2, p + len)) : "";
        // Echo the close (if we did not start it); the server then closes TCP.
        this.state = State.Closing;
        this.writeClose(this.closeCode === 1005 ? 1000 : this.closeCode);
      } else if (opcode === 9) {
        wsStats.pings++;
        this.writePong(buf, p, len);
      } else if (opcode === 2) {
        wsStats.binaryFrames++;
      } else if (opcode === 0 || opcode === 1) {
        wsStats.fragmentedFrames++; // Bun never fragments; counted so a surprise shows up.
      }
      off = p + len;
    }
    return off;
  }

  private writePong(buf: Uint8Array, p: number, len: number): void {
    if (this.state !== State.Open || len > 125) return;
    const at = this.reserve(6 + len);
    const o = this.out;
    o[at] = 0x8a;
    o[at + 1] = 0x80 | len;
    o[at + 2] = o[at + 3] = o[at + 4] = o[at + 5] = 0;
    o.set(buf.subarray(p, p + len), at + 6);
  }
}

const EMPTY = new Uint8Array(0);

/** A complete masked (zero key) text frame around `payload`. */
export function buildTextFrame(payload: Uint8Array): Uint8Array {
  return buildFrame(payload, 1);
}

/** A complete masked (zero key) frame with `opcode` (1 text, 2 binary) around `payload`. */
export function buildFrame(payload: Uint8Array, opcode: number): Uint8Array {
  const n = payload.length;
  const hdr = n < 126 ? 6 : n < 65536 ? 8 : 14;
  const f = new Uint8Array(hdr + n);
  f[0] = 0x80 | opcode;
  if (n < 126) {
    f[1] = 0x80 | n;
  } else if (n < 65536) {
    f[1] = 0x80 | 126;
    f[2] = n >> 8;
    f[3] = n & 255;
  } else {
    f[1] = 0x80 | 127;
    const hi = Math.floor(n / 4294967296);
    const lo = n >>> 0;
    f[2] = hi >>> 24;
    f[3] = (hi >>> 16) & 255;
    f[4] = (hi >>> 8) & 255;
    f[5] = hi & 255;
    f[6] = lo >>> 24;
    f[7] = (lo >>> 16) & 255;
    f[8] = (lo >>> 8) & 255;
    f[9] = lo & 255;
  }
  f.set(payload, hdr);
  return f;
}

/** Header length of a frame built by buildTextFrame for a payload of `n` bytes. */
export function frameHeaderLength(n: number): number {
  return n < 126 ? 6 : n < 65536 ? 8 : 14;
}

/** Decode a text payload (slow path: control frames only). */
export function payloadText(buf: Uint8Array, start: number, end: number): string {
  return decoder.decode(buf.subarray(start, end));
}

export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

/** What `closeAll` needs of a connection's user data. */
export interface Leaving<U> {
  /** Closing on purpose: the close is not counted as unexpected. */
  leaving: boolean;
  onClosed: ((c: Conn<U>) => void) | null;
}

/** Closes every connection with a handshake and waits until all are closed, terminating stragglers after 5 s. */
export async function closeAll<U extends Leaving<U>>(conns: Conn<U>[]): Promise<void> {
  let open = 0;
  await new Promise<void>((done) => {
    for (const c of conns) {
      c.user.leaving = true;
      if (c.state === State.Closed) continue;
      open++;
      c.user.onClosed = () => {
        if (--open === 0) done();
      };
      c.close(1000);
    }
    if (open === 0) done();
    setTimeout(() => {
      for (const c of conns) if (c.state !== State.Closed) c.terminate();
      done();
    }, 5000).unref();
  });
}
