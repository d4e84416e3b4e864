// A loopback TCP proxy between a client and the relay, for tests that need a
// network to fail: cut connections (no close frame), refuse new ones, freeze
// live ones so nothing passes and nobody is told, or blackhole everything.

import type { Socket, TCPSocketListener } from "bun";

interface ProxyConn {
  client: Socket<ProxyConn | undefined>;
  upstream?: Socket<ProxyConn>;
  pending: Uint8Array[];
  /** "both": nothing passes either way (a dead link); "up": client→relay is dropped. */
  frozen: false | "both" | "up";
  sawRequest: boolean;
}

/**
 * A loopback TCP proxy in front of the relay. `cut()` resets every connection (the client sees
 * 1006, no close frame); `refusing` makes new connections fail; `freeze()` silences live ones;
 * `blackholing` silences live ones and every new one too (no FIN, no RST: a dead network).
 */
export function startProxy(targetPort: number) {
  const conns = new Set<ProxyConn>();
  const requests: string[] = [];
  let refusing = false;
  let blackholing = false;
  /** Connections opened into the blackhole: reset when it ends, as a new network would. */
  const swallowed = new Set<ProxyConn>();
  const listener: TCPSocketListener<ProxyConn | undefined> = Bun.listen<ProxyConn | undefined>({
    hostname: "127.0.0.1",
    port: 0,
    data: undefined,
    socket: {
      open(client) {
        if (refusing) return client.terminate();
        const conn: ProxyConn = { client, pending: [], frozen: blackholing ? "both" : false, sawRequest: false };
        client.data = conn;
        conns.add(conn);
        if (blackholing) swallowed.add(conn);
        Bun.connect<ProxyConn>({
          hostname: "127.0.0.1",
          port: targetPort,
          data: conn,
          socket: {
            open(up) {
              conn.upstream = up;
              for (const chunk of conn.pending) up.write(chunk);
              conn.pending = [];
            },
            data(_up, chunk) {
              if (conn.frozen !== "both") conn.client.write(chunk);
            },
            close() {
              conns.delete(conn);
              if (!conn.frozen) conn.client.end();
            },
            error() {},
          },
        }).catch(() => client.terminate());
      },
      data(client, chunk) {
        const conn = client.data;
        if (!conn) return;
        if (!conn.sawRequest) {
          conn.sawRequest = true;
          requests.push(new TextDecoder().decode(chunk).split("\r\n", 1)[0]!);
        }
        if (conn.frozen) return;
        if (conn.upstream) conn.upstream.write(chunk);
        else conn.pending.push(new Uint8Array(chunk));
      },
      close(client) {
        const conn = client.data;
        if (!conn) return;
        conns.delete(conn);
        if (!conn.frozen) conn.upstream?.end();
      },
      error() {},
    },
  });
  return {
    wsUrl: `ws://127.0.0.1:${listener.port}`,
    httpUrl: `http://127.0.0.1:${listener.port}`,
    /** First line of every HTTP request seen, e.g. "GET /abc123?instance=x HTTP/1.1". */
    requests,
    set refusing(value: boolean) {
      refusing = value;
    },
    /** While true nothing passes on any connection, old or new; set false, new connections pass again. */
    set blackholing(value: boolean) {
      blackholing = value;
      if (value) {
        this.freeze("both");
        return;
      }
      for (const conn of swallowed) {
        conn.client.terminate();
        conn.upstream?.terminate();
      }
      swallowed.clear();
    },
    cut(): void {
      for (const conn of [...conns]) {
        conns.delete(conn);
        conn.client.terminate();
        conn.upstream?.terminate();
      }
    },
    freeze(how: "both" | "up"): void {
      for (const conn of conns) conn.frozen = how;
    },
    stop(): void {
      listener.stop(true);
      for (const conn of conns) {
        conn.client.terminate();
        conn.upstream?.terminate();
      }
    },
  };
}

export type Proxy = ReturnType<typeof startProxy>;
