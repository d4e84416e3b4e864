// The black-box live suite (live.test.ts), run through the test fly-replay proxy
// against three relay processes in two regions (issue 5). Without a hint the
// proxy spreads requests over the edge region's machines, so a guest's
// `/<code>?instance=<id>` and a bare `/room/<code>` usually land on a machine that
// must replay or probe: the suite passes only if routing is transparent.
//
// Named so that no path filter for "live.test.ts" matches it: `bun test <x>` treats
// a bare name as a substring filter, and a file that matched its own filter would
// start itself again. For the same reason the nested run names `./live.test.ts`
// and carries NESTED, and this suite does nothing when NESTED is set.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { startCluster, type Cluster } from "./multi-cluster.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const NESTED = "PARTY_SOCKETS_LIVESUITE_NESTED";
const nested = process.env[NESTED] === "1";
let cluster: Cluster;

beforeAll(async () => {
  if (nested) return;
  cluster = await startCluster({
    app: "ps-live",
    machines: [
      { id: "a1", region: "ams", host: "127.0.0.2" },
      { id: "a2", region: "ams", host: "127.0.0.3" },
      { id: "n1", region: "nrt", host: "127.0.0.4" },
    ],
    edgeRegion: "ams",
  });
}, 30_000);

afterAll(() => cluster?.stop());

test.skipIf(nested)("live.test.ts passes through the fly-replay proxy, with replays actually happening", async () => {
  const run = Bun.spawn([process.execPath, "test", "./live.test.ts"], {
    cwd: ROOT,
    env: { ...process.env, LIVE_URL: cluster.proxy.url, [NESTED]: "1" },
    stdout: "pipe",
    stderr: "pipe",
  });
  const timer = setTimeout(() => run.kill(), 60_000);
  const [stdout, stderr, code] = await Promise.all([new Response(run.stdout).text(), new Response(run.stderr).text(), run.exited]);
  clearTimeout(timer);
  const output = stdout + stderr;
  if (code !== 0) console.log(output);
  expect(code).toBe(0);
  expect(output).toMatch(/\b[1-9]\d* pass\b/);
  expect(output).toMatch(/\b0 fail\b/);
  // The proxy replayed at least one request: the suite went through routing, not around it.
  expect(cluster.proxy.hops.some((h) => h.via === "instance")).toBe(true);
}, 90_000);
