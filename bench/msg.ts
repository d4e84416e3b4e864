// Bench messages: built once per client, patched in place per send, read without parsing.
//
// The data object is `{"seq":NNNNNNNNNN,"ts":TTTTTTTTTTTTTTT,"src":SSS,"kind":"bench","pad":"x…"}`:
// every number has a fixed width (a base added to it), so it is valid compact JSON that a
// relay may parse and re-serialise without changing a byte's position, and the sender only
// overwrites digits. `src` is the sender's slot, so a receiver tracks one sequence per sender.

import { buildTextFrame, frameHeaderLength, utf8 } from "./ws.ts";

export const SEQ_BASE = 1_000_000_000; // 10 digits
export const TS_BASE = 100_000_000_000_000; // 15 digits of µs
export const SRC_BASE = 100; // 3 digits: slots 0..899
/** A numbered frame's `n` (lossless sends): 10 digits, never 0, rising by one per send. */
export const N_BASE = 1_000_000_000;

const T0 = performance.now();

/** µs since this process started: the clock in `ts`, read by the same process on receipt. */
export function nowUs(): number {
  return Math.floor((performance.now() - T0) * 1000);
}

/** A control-frame wait (created, joined, …) by a bench client, settled by its reader. */
export interface Waiter {
  type: string;
  resolve(msg: Record<string, unknown>): void;
  reject(err: Error): void;
}

export interface BenchFrame {
  frame: Uint8Array;
  seqAt: number;
  tsAt: number;
  /** Where the digits of `n` start; -1 in a frame without `n`. */
  nAt: number;
}

/**
 * `{"type":"send"[,"to":N][,"n":N],"data":{…}}` with a data object of about `dataBytes` bytes;
 * `numbered` adds `n` where the browser client puts it.
 */
export function benchFrame(slot: number, to: number, dataBytes: number, numbered = false): BenchFrame {
  const head = `{"seq":${SEQ_BASE},"ts":${TS_BASE},"src":${SRC_BASE + slot},"kind":"bench","pad":"`;
  const pad = "x".repeat(Math.max(0, dataBytes - head.length - 2));
  const text = `{"type":"send",${to >= 0 ? `"to":${to},` : ""}${numbered ? `"n":${N_BASE},` : ""}"data":${head}${pad}"}}`;
  const hdr = frameHeaderLength(utf8(text).length);
  return {
    frame: buildTextFrame(utf8(text)),
    seqAt: hdr + text.indexOf('"seq":') + 6,
    tsAt: hdr + text.indexOf('"ts":') + 5,
    nAt: numbered ? hdr + text.indexOf('"n":') + 4 : -1,
  };
}

export function writeDigits(buf: Uint8Array, at: number, width: number, value: number): void {
  for (let i = width - 1; i >= 0; i--) {
    const q = Math.floor(value / 10);
    buf[at + i] = 48 + (value - q * 10);
    value = q;
  }
}

/** Patch a just-appended bench frame at `at` with its sequence number and send time. */
export function stampFrame(out: Uint8Array, at: number, b: BenchFrame, seq: number, ts: number): void {
  writeDigits(out, at + b.seqAt, 10, SEQ_BASE + seq);
  writeDigits(out, at + b.tsAt, 15, TS_BASE + ts);
  if (b.nAt >= 0) writeDigits(out, at + b.nAt, 10, N_BASE + seq);
}

function readInt(buf: Uint8Array, i: number, end: number): number {
  let v = 0;
  for (; i < end; i++) {
    const d = buf[i]! - 48;
    if (d < 0 || d > 9) break;
    v = v * 10 + d;
  }
  return v;
}

/**
 * Index just past `{"seq":` (the start of our data object) in buf[from..end), or -1. The
 * leading `{` skips a relay's own top-level `"seq":` (ours numbers frames for resume).
 */
function findSeq(buf: Uint8Array, from: number, end: number): number {
  for (let i = from + 4; i < end - 2; i++) {
    if (buf[i] === 113 && buf[i + 1] === 34 && buf[i + 2] === 58 && buf[i - 1] === 101 && buf[i - 2] === 115 && buf[i - 3] === 34 && buf[i - 4] === 123) {
      return i + 3;
    }
  }
  return -1;
}

/** The fields of the last bench message `readBench` accepted (one object, reused). */
export const parsed = { seq: 0, ts: 0, src: 0 };

/**
 * A relayed bench message in buf[s..e): ours `{"type":"message",…}` or the floor's
 * `{"type":"send",…}`. Fills `parsed` and returns true; false for anything else
 * (control frames, foreign data), which the caller parses as JSON.
 */
export function readBench(buf: Uint8Array, s: number, e: number): boolean {
  const t = buf[s + 9];
  if (buf[s + 2] !== 116 || buf[s + 10] !== 101 || (t !== 109 && t !== 115)) return false;
  const q = findSeq(buf, s + 14, e);
  // `"seq":NNNNNNNNNN,"ts":TTTTTTTTTTTTTTT,"src":SSS`
  if (q < 0 || buf[q + 10] !== 44 || buf[q + 31] !== 44 || buf[q + 41] !== 44) return false;
  parsed.seq = readInt(buf, q, q + 10) - SEQ_BASE;
  parsed.ts = readInt(buf, q + 16, q + 31) - TS_BASE;
  parsed.src = readInt(buf, q + 38, q + 41) - SRC_BASE;
  return true;
}

/** The same fields from a parsed message's `data`, or false. */
export function readBenchData(data: unknown): boolean {
  if (typeof data !== "object" || data === null) return false;
  const d = data as { seq?: unknown; ts?: unknown; src?: unknown };
  if (typeof d.seq !== "number" || typeof d.ts !== "number" || typeof d.src !== "number") return false;
  parsed.seq = d.seq - SEQ_BASE;
  parsed.ts = d.ts - TS_BASE;
  parsed.src = d.src - SRC_BASE;
  return true;
}

// ------------------------------------------------------------ latency histogram

/** Log-linear buckets of µs: exact below 128, then 64 per power of two (≤ 1.6 % error). */
export class Histogram {
  static readonly SIZE = 128 + 25 * 64;
  readonly counts = new Uint32Array(Histogram.SIZE);

  add(us: number): void {
    this.counts[Histogram.bucketOf(us)]!++;
  }

  clear(): void {
    this.counts.fill(0);
  }

  /** The value at quantile p (0..1), or NaN when empty. */
  percentile(p: number): number {
    let total = 0;
    for (let i = 0; i < this.counts.length; i++) total += this.counts[i]!;
    if (total === 0) return NaN;
    const want = Math.max(1, Math.ceil(total * p));
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i]!;
      if (seen >= want) return Histogram.valueOf(i);
    }
    return NaN;
  }

  static bucketOf(us: number): number {
    if (us < 128) return us < 0 ? 0 : us;
    const e = 31 - Math.clz32(us);
    const idx = 128 + (e - 7) * 64 + ((us >>> (e - 6)) & 63);
    return idx < Histogram.SIZE ? idx : Histogram.SIZE - 1;
  }

  static valueOf(idx: number): number {
    if (idx < 128) return idx;
    const e = 7 + Math.floor((idx - 128) / 64);
    const m = (idx - 128) % 64;
    return (64 + m + 0.5) * 2 ** (e - 6);
  }
}
