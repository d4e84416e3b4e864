// The HTML status page (status-page.ts): counts only, everything interpolated escaped.
//
//   bun test test/client-status-page.test.ts

import { describe, expect, test } from "bun:test";
import { statusPageHtml } from "../status-page.ts";

describe("status page HTML", () => {
  test("shows the counts, instance, region (upper case) and version", () => {
    const html = statusPageHtml({ rooms: 3, clients: 11, instance: "e7841", region: "ams", version: "0.1.0" });
    expect(html).toStartWith("<!doctype html>");
    expect(html).toContain('<b id="rooms">3</b>');
    expect(html).toContain('<b id="clients">11</b>');
    expect(html).toContain("instance <code>e7841</code>");
    expect(html).toContain("region <code>AMS</code>");
    expect(html).toContain("version <code>0.1.0</code>");
  });

  test("an empty region reads as local", () => {
    expect(statusPageHtml({ rooms: 0, clients: 0, instance: "i", region: "", version: "v" })).toContain(
      "region <code>local</code>",
    );
  });

  test("every interpolated string is escaped; a bad count renders as 0", () => {
    const evil = `<script>alert("x")</script>&'`;
    const html = statusPageHtml({ rooms: Number.NaN, clients: -4, instance: evil, region: evil, version: evil });
    expect(html).not.toContain("<script>alert");
    expect(html).toContain("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;");
    expect(html).toContain('<b id="rooms">0</b>');
    expect(html).toContain('<b id="clients">0</b>');
  });

  test("the demo loads /client.js from the relay it was served by; the page holds no room code", () => {
    const html = statusPageHtml({ rooms: 1, clients: 2, instance: "i", region: "r", version: "v" });
    expect(html).toContain('await import("/client.js")');
    expect(html).toContain('new URL("/", document.baseURI)');
    // Only one inline module script, and no external resources besides /client.js.
    expect(html.match(/<script/g)).toHaveLength(1);
    expect(html).not.toMatch(/https?:\/\//);
  });
});
