// Room codes: base58, the region table and its 5-bit layout.
//
// Codes must decode identically here and in Party-Sockets: 6 base58 digits
// (Bitcoin alphabet, most significant first, zero = "1"), a 35-bit value whose
// top 5 bits are the region's index in REGIONS. The literal vectors below pin
// that layout so a change of alphabet, digit order, table order or bit layout
// fails here instead of misrouting live rooms.
import { describe, expect, test } from "bun:test";
import {
  BASE58_ALPHABET,
  CODE_BITS,
  REGIONS,
  decodeBase58,
  decodeRoomCode,
  encodeBase58,
  encodeRoomCode,
  generateRoomCode,
  regionIndex,
  regionOfCode,
  roomCodeValue,
} from "../regions.ts";

const TABLE = [
  "ams", "arn", "bom", "cdg", "dfw", "ewr", "fra", "gru", "iad",
  "jnb", "lax", "lhr", "nrt", "ord", "sin", "sjc", "syd", "yyz",
];

/** Independent reference decoder (BigInt), so the tests do not mirror the code under test. */
function referenceValue(code: string): bigint {
  let n = 0n;
  for (const c of code) n = n * 58n + BigInt(BASE58_ALPHABET.indexOf(c));
  return n;
}

describe("the region table", () => {
  test("is the Party-Sockets table, in its order, index = position", () => {
    expect([...REGIONS]).toEqual(TABLE);
    TABLE.forEach((region, index) => expect(regionIndex(region)).toBe(index));
  });

  test("fits in 5 bits and cannot be mutated at run time", () => {
    expect(REGIONS.length).toBeLessThanOrEqual(32);
    expect(Object.isFrozen(REGIONS)).toBe(true);
  });

  test("unknown regions have no index", () => {
    expect(regionIndex("xyz")).toBeNull();
    expect(regionIndex("")).toBeNull();
    expect(regionIndex("AMS")).toBe(0); // FLY_REGION is lower case; accept either
  });
});

describe("the 35-bit layout (must match Party-Sockets)", () => {
  // First and last code of each region's block: index * 2^30 and index * 2^30 + 2^30 - 1.
  const BLOCKS: Record<string, [string, string]> = {
    ams: ["111111", "2dtD34"], arn: ["2dtD35", "4GmR58"], bom: ["4GmR59", "5ued7C"],
    cdg: ["5ued7D", "7YXq9G"], dfw: ["7YXq9H", "9BR3BL"], ewr: ["9BR3BM", "ApJFDQ"],
    fra: ["ApJFDR", "CTBTFU"], gru: ["CTBTFV", "E64fHY"], iad: ["E64fHZ", "FiwsKc"],
    jnb: ["FiwsKd", "HMq5Mg"], lax: ["HMq5Mh", "JziHPk"], lhr: ["JziHPm", "LdbVRp"],
    nrt: ["LdbVRq", "NGUhTt"], ord: ["NGUhTu", "PuMuVx"], sin: ["PuMuVy", "RYF7Y2"],
    sjc: ["RYF7Y3", "TB8Ka6"], syd: ["TB8Ka7", "Up1XcA"], yyz: ["Up1XcB", "WStjeE"],
  };

  test("each region's block starts at index * 2^30 and ends just before the next", () => {
    for (const [region, [first, last]] of Object.entries(BLOCKS)) {
      const index = BigInt(TABLE.indexOf(region));
      expect(referenceValue(first)).toBe(index << 30n);
      expect(referenceValue(last)).toBe((index << 30n) + (1n << 30n) - 1n);
      expect(encodeRoomCode(roomCodeValue(region, 0, 0))).toBe(first);
      expect(encodeRoomCode(roomCodeValue(region, 2 ** 30 - 1, 0))).toBe(last);
      expect(regionOfCode(first)).toBe(region);
      expect(regionOfCode(last)).toBe(region);
    }
  });

  test("the top 5 bits are the region index, the low 30 bits are the random part", () => {
    const value = roomCodeValue("nrt", 123456789, 31);
    expect(BigInt(value) >> 30n).toBe(12n);
    expect(BigInt(value) & ((1n << 30n) - 1n)).toBe(123456789n);
  });

  test("indices past the table (18..31) are valid codes of no known region", () => {
    expect(decodeRoomCode("WStjeF")).toBe(18 * 2 ** 30);
    expect(regionOfCode("WStjeF")).toBeNull();
    expect(regionOfCode("siNS79")).toBeNull(); // index 31
  });

  test("the largest code is 2^35 - 1; the next value is rejected", () => {
    expect(decodeRoomCode("uMFe9C")).toBe(2 ** CODE_BITS - 1);
    expect(decodeRoomCode("uMFe9D")).toBeNull();
    expect(decodeRoomCode("zzzzzz")).toBeNull();
    expect(() => encodeRoomCode(2 ** CODE_BITS)).toThrow(RangeError);
  });
});

describe("round trips", () => {
  test("every region: generated codes decode to their region", () => {
    for (const region of TABLE) {
      for (let i = 0; i < 200; i++) {
        const code = generateRoomCode(region, () => false);
        expect(code).toMatch(/^[1-9A-HJ-NP-Za-km-z]{6}$/);
        expect(regionOfCode(code)).toBe(region);
        expect(encodeRoomCode(decodeRoomCode(code)!)).toBe(code);
      }
    }
  });

  test("base58 encode/decode are inverse over the whole 6-digit range", () => {
    for (const value of [0, 1, 57, 58, 3363, 195111, 2 ** 30, 2 ** 35 - 1, 58 ** 6 - 1]) {
      const text = encodeBase58(value, 6);
      expect(text).toHaveLength(6);
      expect(decodeBase58(text)).toBe(value);
      expect(referenceValue(text)).toBe(BigInt(value));
    }
    expect(encodeBase58(0, 6)).toBe("111111");
    expect(() => encodeBase58(58 ** 6, 6)).toThrow(RangeError);
    expect(() => encodeBase58(-1, 6)).toThrow(RangeError);
    expect(() => encodeBase58(1.5, 6)).toThrow(RangeError);
  });

  test("a region outside the table gets 35 random bits (all five top bits used)", () => {
    const tops = new Set<number>();
    for (let i = 0; i < 2000; i++) {
      const value = decodeRoomCode(generateRoomCode("xyz", () => false))!;
      expect(value).toBeGreaterThanOrEqual(0);
      expect(value).toBeLessThan(2 ** 35);
      tops.add(Math.floor(value / 2 ** 30));
    }
    // 2000 draws over 32 buckets: every bucket is hit unless the top bits are not random.
    expect(tops.size).toBe(32);
  });

  test("random codes carry random low bits (no two of 5000 alike)", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 5000; i++) seen.add(generateRoomCode("ams", () => false));
    expect(seen.size).toBe(5000);
  });

  test("a random valid code decodes to the region of its top 5 bits", () => {
    for (let i = 0; i < 1000; i++) {
      const value = Math.floor(Math.random() * 2 ** 35);
      const code = encodeRoomCode(value);
      expect(regionOfCode(code)).toBe(TABLE[Math.floor(value / 2 ** 30)] ?? null);
    }
  });
});

describe("malformed codes", () => {
  const BAD = [
    "", "1", "11111", "1111111", "abcdefg", // wrong length
    "0abcde", "Oabcde", "Iabcde", "labcde", // characters base58 leaves out
    "ab cde", "abc-de", "ab/cde", "abcdé1", "ab\u0000cde", "ＡＢＣＤＥＦ", // not in the alphabet
    "uMFe9D", "zzzzzz", // >= 2^35
  ];
  test.each(BAD)("%p has no region and no value", (code) => {
    expect(regionOfCode(code)).toBeNull();
    expect(decodeRoomCode(code)).toBeNull();
  });

  test("non-strings are rejected, not thrown on", () => {
    expect(regionOfCode(undefined as unknown as string)).toBeNull();
    expect(regionOfCode(123456 as unknown as string)).toBeNull();
  });

  test("codes are case-sensitive: a case change is another code", () => {
    expect(decodeRoomCode("abcdef")).not.toBe(decodeRoomCode("ABCDEF"));
  });
});

describe("collisions", () => {
  test("a taken code is retried until a free one comes up", () => {
    const asked: string[] = [];
    const code = generateRoomCode("fra", (candidate) => {
      asked.push(candidate);
      return asked.length <= 3; // the first three candidates are "live rooms"
    });
    expect(asked).toHaveLength(4);
    expect(code).toBe(asked[3]!);
    expect(regionOfCode(code)).toBe("fra");
  });

  test("codes held by live rooms are never returned", () => {
    const live = new Set<string>();
    for (let i = 0; i < 1000; i++) live.add(generateRoomCode("iad", (c) => live.has(c)));
    expect(live.size).toBe(1000);
  });

  test("gives up with an error instead of looping forever", () => {
    expect(() => generateRoomCode("ams", () => true)).toThrow(/no free room code/);
  });
});
