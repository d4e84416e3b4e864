// The HTML status page (`GET /` with `Accept: text/html`, no DASHBOARD_URL): this machine's room
// and client counts, never a code or a clientId, plus a two-device demo of /client.js.
// No framework, no build step: one string of HTML with an inline module script.

export interface StatusPageStats {
  rooms: number;
  clients: number;
  instance: string;
  region: string;
  version: string;
}

const HTML_ESCAPES: Record<string, string> = {
  "&": "&amp;",
  "<": "&lt;",
  ">": "&gt;",
  '"': "&quot;",
  "'": "&#39;",
};

/** Text for HTML element content or a quoted attribute. */
function escapeHtml(value: unknown): string {
  return String(value).replace(/[&<>"']/g, (ch) => HTML_ESCAPES[ch]!);
}

/** A count: anything that is not a finite non-negative number renders as 0. */
function count(value: number): string {
  return Number.isFinite(value) && value >= 0 ? String(Math.floor(value)) : "0";
}

export function statusPageHtml(stats: StatusPageStats): string {
  const region = stats.region ? stats.region.toUpperCase() : "local";
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>party-sockets relay</title>
<style>
  :root { color-scheme: light dark; --accent: #6d5dfc; --muted: #8a8f98; --line: #8a8f9833; }
  * { box-sizing: border-box; }
  body { font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 44rem; padding: 1.25rem; }
  h1 { font-size: 1.4rem; margin: 0 0 .25rem; }
  h2 { font-size: 1.1rem; margin: 1.75rem 0 .5rem; }
  .meta { color: var(--muted); font-size: .9rem; margin: 0; }
  .counts { display: flex; gap: 1rem; margin: 1rem 0 0; }
  .count { border: 1px solid var(--line); border-radius: .75rem; padding: .75rem 1rem; min-width: 8rem; }
  .count b { display: block; font-size: 2rem; font-variant-numeric: tabular-nums; }
  .count span { color: var(--muted); }
  .row { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin: .5rem 0; }
  input, button { font: inherit; padding: .5rem .75rem; border-radius: .5rem; border: 1px solid var(--line); }
  input { flex: 1 1 8rem; min-width: 0; }
  input.code { flex: 0 1 8rem; text-transform: none; letter-spacing: .1em; }
  input.to { flex: 0 1 5rem; }
  button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  #room { border: 1px solid var(--line); border-radius: .75rem; padding: .75rem 1rem; }
  #room[hidden], #lobby[hidden] { display: none; }
  .status-connected { color: #1a9c4b; } .status-reconnecting { color: #c98a00; } .status-closed { color: #d0364b; }
  #log { list-style: none; padding: 0; margin: .5rem 0 0; max-height: 16rem; overflow: auto; font: 13px/1.5 ui-monospace, SFMono-Regular, Menlo, monospace; }
  #log li { border-top: 1px solid var(--line); padding: .2rem 0; overflow-wrap: anywhere; }
  code { font: .95em ui-monospace, SFMono-Regular, Menlo, monospace; }
</style>
</head>
<body>
<h1>party-sockets relay</h1>
<p class="meta">instance <code>${escapeHtml(stats.instance)}</code> · region <code>${escapeHtml(region)}</code> · version <code>${escapeHtml(stats.version)}</code></p>
<div class="counts" aria-live="polite">
  <div class="count"><b id="rooms">${count(stats.rooms)}</b><span>rooms</span></div>
  <div class="count"><b id="clients">${count(stats.clients)}</b><span>clients</span></div>
</div>
<p class="meta">Counts for this machine only. <a href="/metrics">/metrics</a> · <a href="/health">/health</a> · <a href="/client.js">/client.js</a></p>

<h2>Try it on two devices</h2>
<p class="meta">Create a room here, open this page on a phone, and join with the code.</p>
<div id="lobby">
  <div class="row"><button id="create" type="button">Create a room</button></div>
  <form class="row" id="join-form">
    <input class="code" id="code" placeholder="code" autocomplete="off" autocapitalize="off" spellcheck="false" maxlength="16" aria-label="Room code">
    <button id="join" type="submit">Join</button>
  </form>
</div>
<div id="room" hidden>
  <div class="row"><span>Room <code id="room-code"></code> · you are slot <b id="slot"></b> · peers <span id="peers">none</span> · <b id="status"></b></span></div>
  <p class="meta">Invite: <a id="invite"></a></p>
  <form class="row" id="send-form">
    <input id="text" placeholder="message" autocomplete="off" aria-label="Message">
    <input class="to" id="to" placeholder="to slot" inputmode="numeric" aria-label="To slot (empty: everyone)">
    <button id="send" type="submit">Send</button>
  </form>
  <div class="row"><button id="leave" type="button">Leave</button></div>
</div>
<ul id="log" aria-live="polite"></ul>

<script type="module">
const relay = new URL("/", document.baseURI).href;
const $ = (id) => document.getElementById(id);
let room = null;

function log(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  $("log").prepend(li);
  while ($("log").children.length > 100) $("log").lastElementChild.remove();
}

function show() {
  $("lobby").hidden = !!room && room.status !== "closed";
  $("room").hidden = !room;
  if (!room) return;
  $("room-code").textContent = room.code;
  const invite = new URL("/#" + encodeURIComponent(room.code), relay).href;
  $("invite").textContent = invite;
  $("invite").href = invite;
  $("slot").textContent = String(room.index);
  $("peers").textContent = room.peers.length ? room.peers.join(", ") : "none";
  $("status").textContent = room.status;
  $("status").className = "status-" + room.status;
  for (const id of ["text", "to", "send", "leave"]) $(id).disabled = room.status === "closed";
}

function attach(r) {
  room = r;
  location.hash = r.code;
  for (const type of ["message", "peer_joined", "peer_left", "state", "reconnecting", "reconnected", "error", "closed"]) {
    r.addEventListener(type, (event) => {
      log(type + " " + JSON.stringify(event.detail));
      show();
      if (type !== "message" && type !== "state") refreshCounts();
    });
  }
  show();
  refreshCounts();
}

async function start(open) {
  for (const id of ["create", "join"]) $(id).disabled = true;
  try {
    const { createRoom, joinRoom } = await import("/client.js");
    attach(await open(createRoom, joinRoom));
    log((room.index === 0 ? "created room " : "joined room ") + room.code + " as slot " + room.index);
  } catch (error) {
    log("failed: " + (error.code || "") + " " + error.message);
  } finally {
    for (const id of ["create", "join"]) $(id).disabled = false;
  }
}

$("create").addEventListener("click", () => start((createRoom) => createRoom(relay, { maxClients: 8 })));
$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const code = $("code").value.trim();
  if (code) start((_, joinRoom) => joinRoom(relay, code));
});
$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!room) return;
  const text = $("text").value;
  const to = $("to").value.trim();
  room.send(text, to === "" ? undefined : Number(to));
  log("sent " + JSON.stringify(text) + (to === "" ? " to everyone" : " to slot " + to));
  $("text").value = "";
});
$("leave").addEventListener("click", () => room && room.leave());

$("code").value = decodeURIComponent(location.hash.slice(1));

// Keep the counts fresh: the plain-text form of this page is two lines.
async function refreshCounts() {
  try {
    const text = await (await fetch(relay, { headers: { Accept: "text/plain" } })).text();
    const rooms = /^rooms: (\\d+)$/m.exec(text);
    const clients = /^clients: (\\d+)$/m.exec(text);
    if (rooms && clients) {
      $("rooms").textContent = rooms[1];
      $("clients").textContent = clients[1];
    }
  } catch {}
}
setInterval(refreshCounts, 5000);
</script>
</body>
</html>
`;
}
