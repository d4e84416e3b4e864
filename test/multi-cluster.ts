// A loopback "Fly app" for tests: real relay processes (`bun run server.ts`), one
// per machine, all on one port on their own 127.0.0.x address, published in a
// test DNS (vms.<app>.internal, <id>.vm.<app>.internal) and fronted by the test
// fly-replay proxy. Used by test/multi.test.ts and test/multi-live.test.ts.
import type { Subprocess } from "bun";
import { startFlyProxy, type FlyProxy } from "./fly-proxy.ts";
import { startTestDns, type TestDns } from "./test-dns.ts";

export interface ClusterMachine {
  id: string;
  region: string;
  /** A loopback address of its own, e.g. 127.0.0.2 (Linux routes all of 127/8 to lo). */
  host: string;
  /** Added to this machine's environment only (after the cluster's). */
  env?: Record<string, string>;
}

export interface Cluster {
  app: string;
  /** The port every machine listens on. */
  port: number;
  dns: TestDns;
  proxy: FlyProxy;
  procs: Map<string, Subprocess<"ignore", "pipe", "inherit">>;
  /** Every stdout line of each machine (JSON log lines), oldest first, across restarts. */
  logs: Map<string, string[]>;
  /** Starts a machine again (same id, address, port and environment) after it exited. */
  restart(id: string): Promise<void>;
  /** Kills every relay (resuming stopped ones first), the proxy and the DNS. */
  stop(): Promise<void>;
}

const ROOT = new URL("..", import.meta.url).pathname;
const START_WAIT_MS = 8000;

/** Starts one relay process; resolves with its port once it logged `start`. Every stdout line goes to `logs`. */
async function spawnRelay(
  machine: ClusterMachine,
  listenPort: number,
  env: Record<string, string>,
  procs: Cluster["procs"],
  logs: Cluster["logs"],
): Promise<number> {
  const proc = Bun.spawn([process.execPath, "run", "server.ts"], {
    cwd: ROOT,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "inherit",
    env: { PATH: process.env.PATH ?? "", LOG_LEVEL: "info", ...env, ...machine.env, PORT: String(listenPort), HOST: machine.host, INSTANCE_ID: machine.id, REGION: machine.region },
  });
  procs.set(machine.id, proc);
  const logged = logs.get(machine.id) ?? [];
  logs.set(machine.id, logged);
  const { promise: port, resolve: started } = Promise.withResolvers<number>();
  // Reads stdout to the end (so the relay never blocks on a full pipe), noting the `start` line's port.
  const reading = (async () => {
    const decoder = new TextDecoder();
    let buffered = "";
    const reader = proc.stdout.getReader();
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
      buffered += decoder.decode(chunk.value, { stream: true });
      const lines = buffered.split("\n");
      buffered = lines.pop()!;
      for (const line of lines) {
        logged.push(line);
        const entry = JSON.parse(line) as { event: string; port?: number };
        if (entry.event === "start") started(entry.port!);
      }
    }
  })();
  let timer: Timer | undefined;
  const gaveUp = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      proc.kill();
      reject(new Error(`relay ${machine.id} took over ${START_WAIT_MS} ms to log "start"`));
    }, START_WAIT_MS);
  });
  const exited = reading.then(() => {
    throw new Error(`relay ${machine.id} exited before logging "start"`);
  });
  try {
    return await Promise.race([port, gaveUp, exited]);
  } finally {
    clearTimeout(timer);
    exited.catch(() => {});
  }
}

/**
 * Starts the machines (the first on a free port, the rest on the same port),
 * the DNS and the proxy. `env` is added to every relay's environment.
 */
export async function startCluster(options: {
  app: string;
  machines: ClusterMachine[];
  edgeRegion: string;
  env?: Record<string, string>;
}): Promise<Cluster> {
  const dns = await startTestDns({ ttlSeconds: 1 });
  dns.setMachines(options.app, options.machines.map((m) => ({ ...m, addresses: [m.host] })));
  const procs: Cluster["procs"] = new Map();
  const logs: Cluster["logs"] = new Map();
  const env = { ...options.env, FLY_APP_NAME: options.app, DNS_SERVER: dns.server };
  let proxy: FlyProxy | undefined;
  const stop = async () => {
    for (const proc of procs.values()) {
      proc.kill("SIGCONT");
      proc.kill("SIGKILL");
    }
    await Promise.all([...procs.values()].map((p) => p.exited));
    await proxy?.stop();
    await dns.stop();
  };
  try {
    const [first, ...rest] = options.machines;
    const port = await spawnRelay(first!, 0, env, procs, logs);
    await Promise.all(rest.map((m) => spawnRelay(m, port, env, procs, logs)));
    proxy = await startFlyProxy({
      machines: options.machines.map((m) => ({ ...m, port })),
      edgeRegion: options.edgeRegion,
      connectTimeoutMs: 2000,
    });
    const restart = async (id: string) => {
      await spawnRelay(options.machines.find((m) => m.id === id)!, port, env, procs, logs);
    };
    return { app: options.app, port, dns, proxy, procs, logs, restart, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
