// How fast one IP can guess room codes (issue 15). Loopback only, bounded in time.
//
//   bun run bench/guess.ts [--seconds 2] [--sockets 1] [--http-concurrency 16]
//
// Starts `bun run server.ts` on a free loopback port (with the environment this script
// runs under, so `MISS_BURST_MISSES=0 bun run bench/guess.ts` measures with the budget
// off), then from this one address: joins to random codes over `--sockets` WebSockets, each
// sending the next join as soon as the last was answered, and the same for `GET /room/<code>`
// with `--http-concurrency` requests in flight. Prints one JSON line per phase: answers per
// second that tell whether a code exists (`room_not_found` / 404) and answers refused
// (`rate_limited` / 429). The per-connection frame limit (100/s) caps one socket on its own.

import { generateRoomCode } from "../regions.ts";

const args = process.argv.slice(2);
const arg = (name: string, fallback: number) => {
  const at = args.indexOf(`--${name}`);
  return at >= 0 ? Number(args[at + 1]) : fallback;
};
const seconds = arg("seconds", 2);
const sockets = arg("sockets", 1);
const httpConcurrency = arg("http-concurrency", 16);

const relay = Bun.spawn(["bun", "run", "server.ts"], {
  cwd: `${import.meta.dir}/..`,
  env: { ...process.env, PORT: "0", HOST: "127.0.0.1", LOG_LEVEL: "info" },
  stdout: "pipe",
  stderr: "inherit",
});
const port = await (async () => {
  const reader = relay.stdout.getReader();
  let seen = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("relay exited before starting");
    seen += new TextDecoder().decode(value);
    const match = seen.match(/"event":"start"[^\n]*"port":(\d+)/) ?? seen.match(/"port":(\d+)[^\n]*"event":"start"/);
    if (match) {
      reader.releaseLock();
      void relay.stdout.pipeTo(new WritableStream()); // keep draining its log
      return Number(match[1]);
    }
  }
})();

const randomCode = () => generateRoomCode("", () => false);

async function guessJoins(): Promise<Record<string, number>> {
  const tally: Record<string, number> = {};
  const endAtMs = Date.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: sockets }, async () => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/`);
      await new Promise((resolve, reject) => ((ws.onopen = resolve), (ws.onerror = reject)));
      await new Promise<void>((done) => {
        let silence: Timer | undefined;
        const next = () => {
          clearTimeout(silence);
          if (Date.now() >= endAtMs) return done();
          ws.send(JSON.stringify({ type: "join", clientId: "guesser", room: randomCode() }));
          // Past the per-connection frame limit a join is dropped unanswered: go on after a pause.
          silence = setTimeout(next, 10);
        };
        ws.onmessage = (e) => {
          const frame = JSON.parse(String(e.data));
          const key = frame.type === "error" ? frame.code : frame.type;
          tally[key] = (tally[key] ?? 0) + 1;
          next();
        };
        next();
      });
      ws.close();
    }),
  );
  return tally;
}

async function guessLookups(): Promise<Record<string, number>> {
  const tally: Record<string, number> = {};
  const endAtMs = Date.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: httpConcurrency }, async () => {
      while (Date.now() < endAtMs) {
        const res = await fetch(`http://127.0.0.1:${port}/room/${randomCode()}`);
        await res.arrayBuffer();
        tally[res.status] = (tally[res.status] ?? 0) + 1;
      }
    }),
  );
  return tally;
}

const perSecond = (tally: Record<string, number>) =>
  Object.fromEntries(Object.entries(tally).map(([k, v]) => [k, Math.round(v / seconds)]));
try {
  console.log(JSON.stringify({ phase: "join", sockets, seconds, perSecond: perSecond(await guessJoins()) }));
  console.log(JSON.stringify({ phase: "lookup", concurrency: httpConcurrency, seconds, perSecond: perSecond(await guessLookups()) }));
} finally {
  relay.kill();
}
