// The browser client in a real headless Chromium (Debian's /usr/bin/chromium, driven by the
// pinned playwright-core): two tabs, host and guest, load a page that imports the relay's
// `/client.js`, play round trips, survive a server-side cut of the guest's connection, and end
// on `close_room`. Screenshots of the status page and the demo go to a temp dir (not committed).
//
//   bun test test/browser.test.ts        (skips without chromium; with CI=true it fails instead)

import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { startProxy } from "./tcp-proxy.ts";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { startRelay, type Relay } from "../server.ts";
import type { RoomEventDetails, RoomEventType } from "../client.ts";

const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const haveChromium = existsSync(CHROMIUM);
const WAIT_MS = 8000;
// Launching Chromium and a few bounded waits of WAIT_MS must fit in one test.
setDefaultTimeout(30_000);

if (process.env.CI === "true" && !haveChromium) {
  test("chromium is installed (required when CI=true)", () => {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)`);
  });
}

// ------------------------------------------------------------ the test page

/** What the test page exposes on `window` (driven through page.evaluate). */
interface TestWindow {
  events: { type: RoomEventType; detail: RoomEventDetails[RoomEventType] }[];
  room: import("../client.ts").Room | null;
  /** `options.fixedRandom`, when given, becomes `random: () => fixedRandom` (functions cannot cross evaluate). */
  openRoom(kind: "create" | "join", relayUrl: string, code: string, options: object): Promise<{ code: string; index: number }>;
}

/** A page that imports `<relay>/client.js` (cross-origin: the relay sends CORS) and records events. */
const TEST_PAGE = `<!doctype html>
<meta charset="utf-8"><title>client test page</title>
<script type="module">
window.events = [];
window.room = null;
window.openRoom = async (kind, relayUrl, code, options) => {
  const client = await import(new URL("/client.js", relayUrl).href);
  if (typeof options.fixedRandom === "number") options = { ...options, random: () => options.fixedRandom };
  const room = kind === "create"
    ? await client.createRoom(relayUrl, options)
    : await client.joinRoom(relayUrl, code, options);
  window.room = room;
  for (const type of ["message", "peer_joined", "peer_left", "state", "reconnecting", "reconnected", "error", "closed"]) {
    room.addEventListener(type, (event) => window.events.push({ type, detail: event.detail }));
  }
  return { code: room.code, index: room.index };
};
document.title = "ready";
</script>`;

// ------------------------------------------------------------------- setup

let relay: Relay;
let proxy: ReturnType<typeof startProxy>;
let pages: ReturnType<typeof Bun.serve>;
let browser: Browser;
let context: BrowserContext;
const screenshotDir = process.env.SCREENSHOT_DIR || mkdtempSync(join(tmpdir(), "party-sockets-screens-"));

/** Retries fast so a reconnect takes well under a second; timings as the docs say otherwise. */
const PAGE_OPTIONS = { retryInitialMs: 100, retryMaxMs: 400 };

beforeAll(async () => {
  if (!haveChromium) return;
  relay = startRelay({ port: 0, hostname: "127.0.0.1", logLevel: "silent", instanceId: "browser-a", region: "ams" });
  proxy = startProxy(relay.port);
  pages = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    fetch(req) {
      const path = new URL(req.url).pathname;
      if (path === "/test") return new Response(TEST_PAGE, { headers: { "Content-Type": "text/html; charset=utf-8" } });
      return new Response("not found", { status: 404 });
    },
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  context = await browser.newContext();
});

afterAll(async () => {
  if (!haveChromium) return;
  await browser?.close();
  pages?.stop(true);
  proxy?.stop();
  await relay?.stop();
  console.log(`screenshots: ${screenshotDir}`);
});

async function testPage(): Promise<Page> {
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error("page error:", error.message));
  await page.goto(`http://127.0.0.1:${pages.port}/test`);
  await page.waitForFunction(() => document.title === "ready", null, { timeout: WAIT_MS });
  return page;
}

function open(page: Page, kind: "create" | "join", relayUrl: string, code: string, options: object) {
  return page.evaluate(
    ([kind, relayUrl, code, options]) => (window as unknown as TestWindow).openRoom(kind, relayUrl, code, options),
    [kind, relayUrl, code, options] as const,
  );
}

/** Every event of `type` the page has recorded so far. */
function eventsOf<K extends RoomEventType>(page: Page, type: K): Promise<RoomEventDetails[K][]> {
  return page.evaluate(
    (type) => (window as unknown as TestWindow).events.filter((e) => e.type === type).map((e) => e.detail),
    type,
  ) as Promise<RoomEventDetails[K][]>;
}

/** Waits (bounded) until the page has recorded at least `count` events of `type`; returns them. */
async function waitEvents<K extends RoomEventType>(page: Page, type: K, count: number): Promise<RoomEventDetails[K][]> {
  try {
    await page.waitForFunction(
      ([type, count]) => (window as unknown as TestWindow).events.filter((e) => e.type === type).length >= count,
      [type, count] as const,
      { timeout: WAIT_MS },
    );
  } catch {
    const seen = await page.evaluate(() => (window as unknown as TestWindow).events.map((e) => e.type).join(", "));
    throw new Error(`page never had ${count} "${type}" event(s) within ${WAIT_MS} ms; saw: ${seen}`);
  }
  return eventsOf(page, type);
}

/** Upgrade requests through the proxy (the guest page also loads /client.js through it). */
function socketRequests(): string[] {
  return proxy.requests.filter((line) => !line.startsWith("GET /client.js "));
}

/** Event details without the relay's `seq` (checked separately where it matters). */
function withoutSeq<T extends object>(details: T[]): Omit<T, "seq">[] {
  return details.map((detail) => {
    const { seq: _seq, ...rest } = detail as T & { seq?: number };
    return rest;
  });
}

function roomField<T>(page: Page, field: "index" | "peers" | "state" | "status" | "code"): Promise<T> {
  return page.evaluate((field) => (window as unknown as TestWindow).room![field], field) as Promise<T>;
}

// ------------------------------------------------------------------- tests

describe.skipIf(!haveChromium)("browser client in Chromium", () => {
  let host: Page;
  let guest: Page;
  let code: string;

  test("host creates, guest (another tab, same origin) joins as another player", async () => {
    host = await testPage();
    guest = await testPage();
    const created = await open(host, "create", relay.url, "", { maxClients: 4, ...PAGE_OPTIONS });
    code = created.code;
    expect(created.index).toBe(0);
    // The guest goes through the proxy, so the test can cut its TCP connection later.
    const joined = await open(guest, "join", proxy.httpUrl, code, PAGE_OPTIONS);
    expect(joined).toEqual({ code, index: 1 });
    expect(await waitEvents(host, "peer_joined", 1)).toEqual([{ index: 1 }]);
    expect(socketRequests()).toEqual([`GET /${code} HTTP/1.1`]);
  });

  test("broadcast and targeted round trips", async () => {
    await guest.evaluate(() => (window as unknown as TestWindow).room!.send({ tap: "A" }));
    expect(await waitEvents(host, "message", 1)).toEqual([{ from: 1, data: { tap: "A" }, seq: 1 }]);
    await host.evaluate(() => (window as unknown as TestWindow).room!.send("just you", 1));
    await host.evaluate(() => (window as unknown as TestWindow).room!.send("everyone"));
    expect(withoutSeq(await waitEvents(guest, "message", 2))).toEqual([
      { from: 0, data: "just you" },
      { from: 0, data: "everyone" },
    ]);
    await guest.evaluate(() => (window as unknown as TestWindow).room!.send("to the host", [0]));
    expect(withoutSeq(await waitEvents(host, "message", 2))[1]).toEqual({ from: 1, data: "to the host" });
    await host.evaluate(() => (window as unknown as TestWindow).room!.setState({ round: 1 }));
    expect(withoutSeq(await waitEvents(guest, "state", 1))).toEqual([{ data: { round: 1 } }]);
  });

  test("a server-side cut: the guest rejoins its slot (pinned), gets the state, and its offline sends arrive once", async () => {
    proxy.refusing = true;
    proxy.cut();
    const [lost] = await waitEvents(guest, "reconnecting", 1);
    expect(lost!.cause).toBe("close 1006");
    expect(await waitEvents(host, "peer_left", 1)).toEqual([{ index: 1 }]);
    await host.evaluate(() => (window as unknown as TestWindow).room!.setState({ round: 2 }));
    await guest.evaluate(() => {
      const room = (window as unknown as TestWindow).room!;
      for (const n of [1, 2, 3]) room.send(`offline ${n}`);
    });
    expect(await roomField(guest, "status")).toBe("reconnecting");

    proxy.refusing = false;
    await waitEvents(guest, "reconnected", 1);
    expect(await roomField(guest, "index")).toBe(1);
    expect(socketRequests().at(-1)).toBe(`GET /${code}?instance=browser-a HTTP/1.1`);
    expect(withoutSeq(await waitEvents(guest, "state", 2))[1]).toEqual({ data: { round: 2 } });
    expect(await roomField(guest, "state")).toEqual({ round: 2 });
    expect(await roomField(guest, "peers")).toEqual([0]);
    expect(await waitEvents(host, "peer_joined", 2)).toEqual([{ index: 1 }, { index: 1 }]);

    await guest.evaluate(() => (window as unknown as TestWindow).room!.send("back online"));
    const got = await waitEvents(host, "message", 6);
    expect(got.slice(2).map((m) => m.data)).toEqual(["offline 1", "offline 2", "offline 3", "back online"]);
  });

  test("a cut while the host streams numbered messages: the guest's game sees each number once, in order", async () => {
    const total = 60;
    // The host streams one message every 15 ms; the guest's connection is cut part-way through
    // (frames in flight on it die with it) and stays refused until the stream has ended.
    const streamed = host.evaluate(
      (total) =>
        new Promise<void>((resolve) => {
          const room = (window as unknown as TestWindow).room!;
          let n = 0;
          const timer = setInterval(() => {
            room.send({ n: ++n });
            if (n === total) {
              clearInterval(timer);
              resolve();
            }
          }, 15);
        }),
      total,
    );
    const numbers = () =>
      guest.evaluate(() =>
        (window as unknown as TestWindow).events.flatMap((e) =>
          e.type === "message" && typeof (e.detail as { data: { n?: number } }).data?.n === "number"
            ? [(e.detail as { data: { n: number } }).data.n]
            : [],
        ),
      );
    await guest.waitForFunction(
      () => (window as unknown as TestWindow).events.some((e) => e.type === "message" && (e.detail as { data: { n?: number } }).data?.n === 10),
      null,
      { timeout: WAIT_MS },
    );
    const reconnectsBefore = (await eventsOf(guest, "reconnected")).length;
    proxy.refusing = true;
    proxy.cut();
    await streamed;
    proxy.refusing = false;
    const reconnected = await waitEvents(guest, "reconnected", reconnectsBefore + 1);
    expect(reconnected.at(-1)).toEqual({ resumed: true });
    await guest.waitForFunction(
      (total) => (window as unknown as TestWindow).events.some((e) => e.type === "message" && (e.detail as { data: { n?: number } }).data?.n === total),
      total,
      { timeout: WAIT_MS },
    );
    expect(await numbers()).toEqual(Array.from({ length: total }, (_, i) => i + 1));
  });

  test("`online` in the page skips the backoff wait", async () => {
    // A third tab whose retry would wait 30 s: the browser's `online` event must cut that short.
    const late = await testPage();
    const slow = { retryInitialMs: 60_000, retryMaxMs: 60_000, fixedRandom: 0.5 };
    const joined = await open(late, "join", proxy.httpUrl, code, slow);
    proxy.cut();
    expect((await waitEvents(late, "reconnecting", 1))[0]!.delayMs).toBe(30_000);
    await late.evaluate(() => window.dispatchEvent(new Event("online")));
    await waitEvents(late, "reconnected", 1);
    expect(await roomField(late, "index")).toBe(joined.index);
    await late.evaluate(() => (window as unknown as TestWindow).room!.leave());
    await late.close();
    await waitEvents(guest, "reconnected", 2); // the cut hit the guest too
  });

  test("a reload of the guest tab reclaims its slot (clientId kept in sessionStorage)", async () => {
    await guest.reload();
    await guest.waitForFunction(() => document.title === "ready", null, { timeout: WAIT_MS });
    const again = await open(guest, "join", proxy.httpUrl, code, PAGE_OPTIONS);
    expect(again.index).toBe(1);
    const stored = await guest.evaluate((code) => sessionStorage.getItem(`party-sockets:clientId:${code}`), code);
    expect(stored).toMatch(/^[0-9a-f]{32}$/);
  });

  test("a kicked page (a third tab) ends with `closed` 4004 kicked, stops reconnecting and forgets its clientId", async () => {
    const kicked = await testPage();
    const third = await open(kicked, "join", proxy.httpUrl, code, PAGE_OPTIONS);
    const stored = () => kicked.evaluate((code) => sessionStorage.getItem(`party-sockets:clientId:${code}`), code);
    expect(await stored()).toMatch(/^[0-9a-f]{32}$/);
    const requestsBefore = proxy.requests.length;
    const peerLeftBefore = (await eventsOf(guest, "peer_left")).length;
    await host.evaluate((index) => (window as unknown as TestWindow).room!.kick(index), third.index);
    expect(await waitEvents(kicked, "closed", 1)).toEqual([{ code: 4004, reason: "kicked" }]);
    expect((await waitEvents(guest, "peer_left", peerLeftBefore + 1)).at(-1)).toEqual({ index: third.index });
    // An observation window longer than the longest retry wait (400 ms): nothing may follow.
    await Bun.sleep(800);
    const after = await kicked.evaluate(() => (window as unknown as TestWindow).events.map((e) => e.type));
    expect(after.at(-1)).toBe("closed");
    expect(after.filter((t) => t === "reconnecting")).toEqual([]);
    expect(await roomField(kicked, "status")).toBe("closed");
    expect(proxy.requests.length).toBe(requestsBefore);
    expect(await stored()).toBeNull();
    await kicked.close();
  });

  test("close_room ends both pages with `closed` 4001 and no reconnect", async () => {
    const requestsBefore = proxy.requests.length;
    await host.evaluate(() => (window as unknown as TestWindow).room!.closeRoom());
    expect(await waitEvents(host, "closed", 1)).toEqual([{ code: 4001, reason: "room closed" }]);
    expect(await waitEvents(guest, "closed", 1)).toEqual([{ code: 4001, reason: "room closed" }]);
    // An observation window longer than the longest retry wait (400 ms): nothing may follow.
    await Bun.sleep(800);
    const after = await guest.evaluate(() => (window as unknown as TestWindow).events.map((e) => e.type));
    expect(after.at(-1)).toBe("closed");
    expect(after.filter((t) => t === "reconnecting")).toEqual([]);
    expect(await roomField(guest, "status")).toBe("closed");
    expect(await roomField(host, "status")).toBe("closed");
    expect(proxy.requests.length).toBe(requestsBefore);
    expect(relay.stats()).toEqual({ rooms: 0, clients: 0 });
  });

  test("status page and demo: counts only, two tabs exchange a message (screenshots)", async () => {
    const url = relay.url + "/";
    const tv = await context.newPage();
    await tv.setViewportSize({ width: 900, height: 760 });
    await tv.goto(url);
    await tv.click("#create");
    await tv.waitForFunction(() => document.getElementById("room-code")!.textContent!.length === 6, null, { timeout: WAIT_MS });
    const demoCode = (await tv.textContent("#room-code"))!;

    const phone = await context.newPage();
    await phone.setViewportSize({ width: 390, height: 760 });
    await phone.goto(url);
    await phone.fill("#code", demoCode);
    await phone.click("#join");
    await phone.waitForFunction(() => document.getElementById("slot")!.textContent === "1", null, { timeout: WAIT_MS });
    await phone.fill("#text", "hello from the phone");
    await phone.click("#send");
    await tv.waitForFunction(() => document.getElementById("log")!.textContent!.includes("hello from the phone"), null, {
      timeout: WAIT_MS,
    });
    expect(await tv.textContent("#peers")).toBe("1");
    // The demo refreshes the counts on peer events.
    await tv.waitForFunction(() => document.getElementById("clients")!.textContent === "2", null, { timeout: WAIT_MS });
    expect(await tv.getAttribute("#invite", "href")).toBe(`${relay.url}/#${encodeURIComponent(demoCode)}`);

    // A fresh status page counts the demo's room and two clients and names no code.
    const status = await context.newPage();
    await status.setViewportSize({ width: 900, height: 420 });
    await status.goto(url);
    expect(await status.textContent("#rooms")).toBe("1");
    expect(await status.textContent("#clients")).toBe("2");
    expect(await status.content()).not.toContain(demoCode);

    await status.screenshot({ path: join(screenshotDir, "status-page.png") });
    await tv.screenshot({ path: join(screenshotDir, "demo-host.png") });
    await phone.screenshot({ path: join(screenshotDir, "demo-phone.png") });
    expect(existsSync(join(screenshotDir, "demo-phone.png"))).toBe(true);
  });

  test("lossless sends: a guest votes at 20 Hz through a 4 s blackhole (no FIN, no RST); the host's game sees every vote once, in order", async () => {
    // Its own proxy and pages: the blackhole must not touch the tabs above, and the heartbeat is
    // shortened so that the dead link is noticed well inside the default queue bounds.
    const link = startProxy(relay.port);
    const voter = await testPage();
    const tv = await testPage();
    try {
      const quick = { ...PAGE_OPTIONS, pingIntervalMs: 200, pongTimeoutMs: 300, connectTimeoutMs: 500 };
      const room = await open(tv, "create", relay.url, "", { maxClients: 4, ...PAGE_OPTIONS });
      await open(voter, "join", link.httpUrl, room.code, quick);
      await waitEvents(tv, "peer_joined", 1);
      type Voting = TestWindow & { votes(): number; stopVotes(): number };
      await voter.evaluate(() => {
        const w = window as unknown as Voting;
        let n = 0;
        const timer = setInterval(() => w.room!.send({ vote: ++n }), 50);
        w.votes = () => n;
        w.stopVotes = () => {
          clearInterval(timer);
          w.room!.send("end");
          return n;
        };
      });
      await waitEvents(tv, "message", 1);
      link.blackholing = true;
      const sentBeforeHole = await voter.evaluate(() => (window as unknown as Voting).votes());
      await Bun.sleep(4000); // the scenario: 4 s of a dead network, not synchronisation
      link.blackholing = false;
      expect(await voter.evaluate(() => (window as unknown as Voting).votes())).toBeGreaterThan(sentBeforeHole);
      await waitEvents(voter, "reconnected", 1);
      const sent = await voter.evaluate(() => (window as unknown as Voting).stopVotes());
      await tv.waitForFunction(
        () => (window as unknown as TestWindow).events.some((e) => e.type === "message" && (e.detail as { data: unknown }).data === "end"),
        null,
        { timeout: WAIT_MS },
      );
      const votes = (await eventsOf(tv, "message")).flatMap((m) => (m.data === "end" ? [] : [(m.data as { vote: number }).vote]));
      expect(votes).toEqual(Array.from({ length: sent }, (_, i) => i + 1));
      expect(await eventsOf(voter, "error")).toEqual([]);
      await tv.evaluate(() => (window as unknown as TestWindow).room!.closeRoom());
      await waitEvents(voter, "closed", 1);
    } finally {
      await voter.close();
      await tv.close();
      link.stop();
    }
  });
});
