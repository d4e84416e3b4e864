// Reading /proc: process CPU (utime+stime, in clock ticks), RSS, and per-core load.
// The kernel accounts CPU in ticks of 1/CLK_TCK s (10 ms here), so a window must be
// long (≥ 10 s in full mode) for a per-delivery figure to mean anything.

import { readFileSync } from "node:fs";

/** Clock ticks per second; 100 on every Linux we run on (`getconf CLK_TCK`). */
export const CLK_TCK = 100;

/** utime + stime of a process (all its threads), in µs; NaN when it is gone. */
export function processCpuUs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Field 2 (comm) may contain spaces; the fields after it start past the last ')'.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    const ticks = Number(fields[11]) + Number(fields[12]);
    return (ticks * 1e6) / CLK_TCK;
  } catch {
    return NaN;
  }
}

/** Resident set size of a process in bytes (VmRSS); NaN when it is gone. */
export function processRssBytes(pid: number): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const m = /VmRSS:\s+(\d+) kB/.exec(status);
    return m ? Number(m[1]) * 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** Busy and total ticks of each CPU (`cpu0`, `cpu1`, …) from /proc/stat. */
export interface CoreTicks {
  busy: number[];
  total: number[];
}

export function coreTicks(): CoreTicks {
  const busy: number[] = [];
  const total: number[] = [];
  for (const line of readFileSync("/proc/stat", "utf8").split("\n")) {
    const m = /^cpu(\d+) (.*)$/.exec(line);
    if (!m) continue;
    const v = m[2]!.trim().split(/\s+/).map(Number);
    // user nice system idle iowait irq softirq steal (guest is already in user)
    const all = v.slice(0, 8).reduce((a, b) => a + b, 0);
    const idle = (v[3] ?? 0) + (v[4] ?? 0);
    busy[Number(m[1])] = all - idle;
    total[Number(m[1])] = all;
  }
  return { busy, total };
}

/** Per-core busy fraction between two samples. */
export function coreBusy(a: CoreTicks, b: CoreTicks): number[] {
  return b.busy.map((x, i) => {
    const dt = (b.total[i] ?? 0) - (a.total[i] ?? 0);
    return dt > 0 ? (x - (a.busy[i] ?? 0)) / dt : 0;
  });
}

export function loadavg(): string {
  try {
    return readFileSync("/proc/loadavg", "utf8").trim();
  } catch {
    return "";
  }
}
