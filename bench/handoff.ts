// How fast a SIGTERM hands rooms to a peer (issue 17). Loopback only, bounded.
//
//   bun run bench/handoff.ts [--rooms 500] [--members 2] [--runs 3]
//
// Per run: a loopback Fly cluster (test/multi-cluster.ts: two relay processes of one
// region sharing PEER_SECRET, the test DNS and the fly-replay proxy), `--rooms` rooms on
// the first machine with `--members` members each (the host and guests, each a bare
// WebSocket that follows `moved` to the peer, as /client.js does), then SIGTERM. Prints one
// JSON line per run: ms from SIGTERM to the old process's exit, rooms moved per second over
// that time, and how many members had rejoined on the peer by then and after.

import { startCluster } from "../test/multi-cluster.ts";

const args = process.argv.slice(2);
const arg = (name: string, fallback: number) => {
  const at = args.indexOf(`--${name}`);
  return at >= 0 ? Number(args[at + 1]) : fallback;
};
const rooms = arg("rooms", 500);
const members = arg("members", 2);
const runs = arg("runs", 3);
const WAIT_MS = 30_000;

/** Opens a socket through the proxy and resolves with the first frame of `type`. */
function open(url: string, headers: Record<string, string>, first: object, type: string): Promise<{ ws: WebSocket; frame: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers } as unknown as string[]);
    ws.onopen = () => ws.send(JSON.stringify(first));
    ws.onmessage = (e) => {
      const frame = JSON.parse(String(e.data));
      if (frame.type === type) resolve({ ws, frame });
      else if (frame.type === "error") reject(new Error(frame.code));
    };
    ws.onerror = () => reject(new Error(`could not open ${url}`));
  });
}

for (let run = 1; run <= runs; run++) {
  const cluster = await startCluster({
    app: `ps-bench-handoff-${run}`,
    machines: [
      { id: "b1", region: "ams", host: "127.0.0.2" },
      { id: "b2", region: "ams", host: "127.0.0.3" },
    ],
    edgeRegion: "ams",
    env: { PEER_SECRET: "bench", MAX_CONNECTIONS_PER_IP: "100000", MAX_ROOMS_PER_IP: "100000" },
  });
  try {
    let rejoined = 0;
    let rejoinedAll: () => void;
    const allBack = new Promise<void>((resolve) => (rejoinedAll = resolve));
    const follow = (ws: WebSocket, clientId: string, code: string) => {
      let movedTo = "";
      ws.onmessage = (e) => {
        const frame = JSON.parse(String(e.data));
        if (frame.type === "moved") movedTo = frame.instance;
      };
      ws.onclose = (e) => {
        if (e.code !== 4005) return;
        void open(`${cluster.proxy.wsUrl}/${code}?instance=${movedTo}`, {}, { type: "join", clientId, room: code }, "joined").then(({ ws: again }) => {
          again.onmessage = null;
          if (++rejoined === rooms * members) rejoinedAll();
        });
      };
    };
    for (let i = 0; i < rooms; i++) {
      const hostId = `h-${run}-${i}`;
      const { ws: host, frame } = await open(`${cluster.proxy.wsUrl}/`, { "fly-force-instance-id": "b1" }, { type: "create", clientId: hostId, maxClients: members }, "created");
      const code = String(frame.room);
      follow(host, hostId, code);
      for (let m = 1; m < members; m++) {
        const id = `g-${run}-${i}-${m}`;
        const { ws } = await open(`${cluster.proxy.wsUrl}/${code}`, { "fly-force-instance-id": "b1" }, { type: "join", clientId: id, room: code }, "joined");
        follow(ws, id, code);
      }
    }
    const old = cluster.procs.get("b1")!;
    const t0 = performance.now();
    old.kill("SIGTERM");
    const code = await Promise.race([old.exited, Bun.sleep(WAIT_MS).then(() => "timeout")]);
    const exitMs = performance.now() - t0;
    const atExit = rejoined;
    await Promise.race([allBack, Bun.sleep(WAIT_MS)]);
    const backMs = performance.now() - t0;
    console.log(JSON.stringify({ run, rooms, members, exitCode: code, exitMs: Math.round(exitMs), roomsPerSec: Math.round(rooms / (exitMs / 1000)), rejoinedAtExit: atExit, rejoined, allRejoinedMs: Math.round(backMs) }));
  } finally {
    await cluster.stop();
  }
}
