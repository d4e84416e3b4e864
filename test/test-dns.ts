// A tiny authoritative DNS server for tests: Fly's `.internal` names, over UDP on
// loopback, so relays can find their peers exactly as they do on Fly (through
// node:dns with setServers) without touching the machine's resolver.
//
// Served (as on Fly, for the started machines of one app):
//   TXT  vms.<app>.internal           "<id> <region>,<id> <region>,..."
//   TXT  regions.<app>.internal       "<region>,<region>,..."
//   A    <id>.vm.<app>.internal       the machine's IPv4 address (127.0.0.x in tests)
//   AAAA <id>.vm.<app>.internal       the machine's IPv6 address, when it has one
// Any other name: NXDOMAIN. A known name without the asked type: NOERROR, no answers.
// Records are mutable (setMachines/removeMachine) so a test can stop a machine.
// TXT strings longer than 255 bytes are split into several character-strings of
// one record, as DNS requires. Bun's resolveTxt returns each character-string as
// its own entry ([[a],[b]] where Node gives [[a,b]]), so readers join them all.
import dgram from "node:dgram";

export interface DnsMachine {
  id: string;
  region: string;
  /** IPv4 (A) and/or IPv6 (AAAA) addresses. */
  addresses: string[];
}

export interface TestDns {
  /** "127.0.0.1:<port>", the form node:dns setServers and the relay's dnsServer option take. */
  server: string;
  port: number;
  /** Replaces every record of `app` with those of `machines`. */
  setMachines(app: string, machines: DnsMachine[]): void;
  /** Drops one machine from `vms.`, `regions.` and its own names, as Fly does when it stops. */
  removeMachine(app: string, id: string): void;
  /** Queries received per lower-cased name, for tests that count lookups. */
  queries: Map<string, number>;
  stop(): Promise<void>;
}

const TYPE_A = 1;
const TYPE_TXT = 16;
const TYPE_AAAA = 28;
const CLASS_IN = 1;
const RCODE_NXDOMAIN = 3;
const RCODE_FORMERR = 1;
const RCODE_NOTIMP = 4;
/** What Fly's resolver answers for .internal names. Bun's node:dns Resolver caches answers for the TTL. */
const DEFAULT_TTL_SECONDS = 5;

interface Records {
  A: string[];
  AAAA: string[];
  TXT: string[];
}

export async function startTestDns(
  options: { hostname?: string; port?: number; ttlSeconds?: number } = {},
): Promise<TestDns> {
  const hostname = options.hostname ?? "127.0.0.1";
  const ttlSeconds = options.ttlSeconds ?? DEFAULT_TTL_SECONDS;
  const apps = new Map<string, DnsMachine[]>();
  const queries = new Map<string, number>();

  function lookup(name: string): Records | null {
    for (const [app, machines] of apps) {
      const zone = `${app}.internal`;
      if (name === `vms.${zone}`) {
        return { A: [], AAAA: [], TXT: [machines.map((m) => `${m.id} ${m.region}`).join(",")] };
      }
      if (name === `regions.${zone}`) {
        return { A: [], AAAA: [], TXT: [[...new Set(machines.map((m) => m.region))].join(",")] };
      }
      for (const m of machines) {
        if (name === `${m.id}.vm.${zone}`.toLowerCase()) {
          return { A: m.addresses.filter(isIPv4), AAAA: m.addresses.filter((a) => !isIPv4(a)), TXT: [] };
        }
      }
    }
    return null;
  }

  const socket = dgram.createSocket("udp4");
  socket.on("message", (packet, peer) => {
    const reply = answer(packet, lookup, queries, ttlSeconds);
    if (reply) socket.send(reply, peer.port, peer.address);
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(options.port ?? 0, hostname, () => resolve());
  });
  const port = socket.address().port;

  return {
    server: `${hostname}:${port}`,
    port,
    queries,
    setMachines(app, machines) {
      apps.set(app.toLowerCase(), machines.map((m) => ({ ...m, addresses: [...m.addresses] })));
    },
    removeMachine(app, id) {
      const machines = apps.get(app.toLowerCase()) ?? [];
      apps.set(app.toLowerCase(), machines.filter((m) => m.id !== id));
    },
    stop: () => new Promise<void>((resolve) => socket.close(() => resolve())),
  };
}

// ------------------------------------------------------------------ wire format

function isIPv4(address: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(address);
}

/** Parses one query and builds its response; null for packets too broken to answer. */
function answer(
  packet: Buffer,
  lookup: (name: string) => Records | null,
  queries: Map<string, number>,
  ttlSeconds: number,
): Buffer | null {
  if (packet.length < 12) return null;
  const id = packet.readUInt16BE(0);
  const flags = packet.readUInt16BE(2);
  if (flags & 0x8000) return null; // a response, not a query
  const opcode = (flags >> 11) & 0xf;
  const questionCount = packet.readUInt16BE(4);
  const parsed = questionCount === 1 ? readName(packet, 12) : null;
  if (!parsed || parsed.end + 4 > packet.length) return header(id, flags, RCODE_FORMERR, 0, 0);
  const question = packet.subarray(12, parsed.end + 4);
  if (opcode !== 0) return Buffer.concat([header(id, flags, RCODE_NOTIMP, 1, 0), question]);

  const name = parsed.name.toLowerCase();
  const type = packet.readUInt16BE(parsed.end);
  queries.set(name, (queries.get(name) ?? 0) + 1);

  const records = lookup(name);
  if (!records) return Buffer.concat([header(id, flags, RCODE_NXDOMAIN, 1, 0), question]);
  const rdatas =
    type === TYPE_A ? records.A.map(ipv4Bytes)
    : type === TYPE_AAAA ? records.AAAA.map(ipv6Bytes)
    : type === TYPE_TXT ? records.TXT.map(txtBytes)
    : [];
  const answers = rdatas.map((rdata) => resourceRecord(type, rdata, ttlSeconds));
  return Buffer.concat([header(id, flags, 0, 1, answers.length), question, ...answers]);
}

function header(id: number, queryFlags: number, rcode: number, questions: number, answers: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(id, 0);
  const recursionDesired = queryFlags & 0x0100;
  // QR=1 (response), opcode copied, AA=1 (authoritative), RD copied, RA=0.
  out.writeUInt16BE(0x8000 | (queryFlags & 0x7800) | 0x0400 | recursionDesired | rcode, 2);
  out.writeUInt16BE(questions, 4);
  out.writeUInt16BE(answers, 6);
  return out;
}

function resourceRecord(type: number, rdata: Buffer, ttlSeconds: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(0xc00c, 0); // name: pointer to the question's name at offset 12
  out.writeUInt16BE(type, 2);
  out.writeUInt16BE(CLASS_IN, 4);
  out.writeUInt32BE(ttlSeconds, 6);
  out.writeUInt16BE(rdata.length, 10);
  return Buffer.concat([out, rdata]);
}

/** Reads an uncompressed name (queries never compress). */
function readName(packet: Buffer, start: number): { name: string; end: number } | null {
  const labels: string[] = [];
  let at = start;
  while (at < packet.length) {
    const length = packet[at]!;
    if (length === 0) return { name: labels.join("."), end: at + 1 };
    if (length > 63 || at + 1 + length > packet.length) return null;
    labels.push(packet.toString("latin1", at + 1, at + 1 + length));
    at += 1 + length;
  }
  return null;
}

function ipv4Bytes(address: string): Buffer {
  return Buffer.from(address.split(".").map(Number));
}

function ipv6Bytes(address: string): Buffer {
  const [head = "", tail = ""] = address.includes("::") ? address.split("::") : [address, ""];
  const headParts = head ? head.split(":") : [];
  const tailParts = tail ? tail.split(":") : [];
  const missing = 8 - headParts.length - tailParts.length;
  const groups = [...headParts, ...Array<string>(Math.max(0, missing)).fill("0"), ...tailParts];
  const out = Buffer.alloc(16);
  groups.forEach((group, i) => out.writeUInt16BE(parseInt(group, 16), i * 2));
  return out;
}

/** One TXT record: the text as character-strings of at most 255 bytes. */
function txtBytes(text: string): Buffer {
  const bytes = Buffer.from(text, "utf8");
  const parts: Buffer[] = [];
  for (let at = 0; at < bytes.length || parts.length === 0; at += 255) {
    const chunk = bytes.subarray(at, at + 255);
    parts.push(Buffer.from([chunk.length]), chunk);
  }
  return Buffer.concat(parts);
}
