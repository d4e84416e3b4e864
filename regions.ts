// Room codes and the region table they carry.
//
// A room code is 6 base58 characters (Bitcoin alphabet) holding a 35-bit value.
// When the creating machine's region is in REGIONS, the region's index fills the
// top 5 bits (value = index * 2^30 + 30 random bits), so any machine can tell,
// from the code alone, which region holds the room and ask Fly's proxy to replay
// the request there. Codes must decode to the same region here and in
// Party-Sockets: REGIONS is append-only and an index is never reused.
//
// Pure functions only: no module-level mutable state.

/** Fly region codes in index order. Append only: an index must never change meaning. */
export const REGIONS: readonly string[] = Object.freeze([
  "ams", "arn", "bom", "cdg", "dfw", "ewr", "fra", "gru", "iad",
  "jnb", "lax", "lhr", "nrt", "ord", "sin", "sjc", "syd", "yyz",
]);

export const REGION_BITS = 5;
export const RANDOM_BITS = 30;
export const CODE_BITS = REGION_BITS + RANDOM_BITS; // 35
export const CODE_LENGTH = 6;
export const BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

// Powers of two as multiplications, not shifts: JavaScript shifts work on 32-bit
// integers, and a code value needs 35 bits (exact in a double up to 2^53).
const RANDOM_SPACE = 2 ** RANDOM_BITS;
const CODE_SPACE = 2 ** CODE_BITS;
/** How many taken codes in a row generateRoomCode tolerates before giving up. */
const MAX_CODE_ATTEMPTS = 1000;

/** The 5-bit index of a region, or null when the region is not in the table. */
export function regionIndex(region: string): number | null {
  const index = REGIONS.indexOf(region.toLowerCase());
  return index === -1 ? null : index;
}

/** Encodes a non-negative integer as exactly `length` base58 digits, most significant first. */
export function encodeBase58(value: number, length: number = CODE_LENGTH): string {
  if (!Number.isSafeInteger(value) || value < 0 || value >= 58 ** length) {
    throw new RangeError(`cannot encode ${value} in ${length} base58 digits`);
  }
  let out = "";
  let rest = value;
  for (let i = 0; i < length; i++) {
    out = BASE58_ALPHABET[rest % 58] + out;
    rest = Math.floor(rest / 58);
  }
  return out;
}

/** Decodes base58 digits; null when a character is outside the alphabet or the text is empty/too long. */
export function decodeBase58(text: string): number | null {
  // 9 digits stay below 2^53, so every accepted value is exact.
  if (text.length === 0 || text.length > 9) return null;
  let value = 0;
  for (const char of text) {
    const digit = BASE58_ALPHABET.indexOf(char);
    if (digit === -1) return null;
    value = value * 58 + digit;
  }
  return value;
}

/** The 35-bit value of a well-formed room code, else null. */
export function decodeRoomCode(code: string): number | null {
  if (typeof code !== "string" || code.length !== CODE_LENGTH) return null;
  const value = decodeBase58(code);
  return value === null || value >= CODE_SPACE ? null : value;
}

/** The 6-character code of a 35-bit value. */
export function encodeRoomCode(value: number): string {
  if (!Number.isSafeInteger(value) || value < 0 || value >= CODE_SPACE) {
    throw new RangeError(`room code value out of range: ${value}`);
  }
  return encodeBase58(value, CODE_LENGTH);
}

/** Builds a code value: region index in the top 5 bits, or 35 random bits when the region is unknown. */
export function roomCodeValue(region: string, random30: number, random5: number): number {
  const low = random30 % RANDOM_SPACE;
  const index = regionIndex(region);
  const top = index ?? random5 % 2 ** REGION_BITS;
  return top * RANDOM_SPACE + low;
}

/** The region a code was created in: null for a malformed code or an index not in the table. */
export function regionOfCode(code: string): string | null {
  const value = decodeRoomCode(code);
  if (value === null) return null;
  return REGIONS[Math.floor(value / RANDOM_SPACE)] ?? null;
}

/** 30 and 5 random bits from the platform CSPRNG. */
function randomParts(): [number, number] {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return [words[0]! >>> 2, words[1]! >>> 27];
}

/**
 * A fresh room code for a machine in `region`, retried while `isTaken(code)` says
 * the code belongs to a live room. Throws after MAX_CODE_ATTEMPTS taken codes in a
 * row (2^30 codes per region make that a bug, not bad luck).
 */
export function generateRoomCode(region: string, isTaken: (code: string) => boolean): string {
  for (let attempt = 0; attempt < MAX_CODE_ATTEMPTS; attempt++) {
    const [random30, random5] = randomParts();
    const code = encodeRoomCode(roomCodeValue(region, random30, random5));
    if (!isTaken(code)) return code;
  }
  throw new Error(`no free room code after ${MAX_CODE_ATTEMPTS} attempts`);
}
