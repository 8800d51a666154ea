#!/usr/bin/python3
"""Report of bench/run_backends.sh: tables, paired ratios and targets from bench/results/backends.raw.jsonl.

Figures are medians over rounds; a ratio is candidate/baseline within each round (the two runs were adjacent, so
they share the machine's noise), then the median over rounds. Server CPU/request = utime+stime of the measured
server process across the whole client process, divided by every call the client made (warmup and setup too).
For `raw` rows the measured process is the Python Vault test server (there is no plugin in the path).
"""

import json
import os
import platform
import statistics
import sys
import time

raw_path, out_path = sys.argv[1], sys.argv[2]
env = os.environ
tck = float(env.get("BENCH_CLK_TCK", "100"))
lines = [json.loads(l) for l in open(raw_path) if l.strip()]
runs = [r for r in lines if "loadgen" in r]
final_stats = next((r["final_vault_stats"] for r in lines if "final_vault_stats" in r), None)


def vault_delta(r, listener):
    """Requests per path and new connections on a Vault test server listener during one run."""
    b, a = r.get("vault_before"), r.get("vault_after")
    if not b or not a:
        return None
    lb, la = b["listeners"][listener], a["listeners"][listener]
    paths = {p: n - lb["requests"].get(p, 0) for p, n in la["requests"].items() if n - lb["requests"].get(p, 0)}
    return {"connections": la["connections"] - lb["connections"], "requests": paths,
            "total": sum(paths.values())}


per_round, groups = {}, {}
for r in runs:
    lg = r["loadgen"]
    calls = max(lg.get("calls_total", lg["ops"] + lg["errors"]), 1)
    fig = {"ops": lg["ops"], "errors": lg["errors"], "calls_total": calls, "ops_per_sec": lg["ops_per_sec"],
           "p50_us": lg["p50_us"], "p99_us": lg["p99_us"], "cpu_us_per_req": r["cpu_ticks"] / tck * 1e6 / calls,
           "rss_mib": r["rss_kib"] / 1024.0,
           "vault": vault_delta(r, 1 if r["server"] == "raw" else 0)}
    op = lg["op"].removeprefix("raw")
    key = (r["server"], op, lg["concurrency"])
    groups.setdefault(key, []).append(fig)
    per_round[key + (r["round"],)] = fig

med = statistics.median
results = {}
for key, rs in groups.items():
    results[key] = {"server": key[0], "op": key[1], "concurrency": key[2], "rounds": len(rs),
                    "errors": sum(x["errors"] for x in rs),
                    **{k: round(med([x[k] for x in rs]), 2) for k in ("ops_per_sec", "p50_us", "p99_us",
                                                                       "cpu_us_per_req")},
                    "rss_mib": round(max(x["rss_mib"] for x in rs), 2)}


def paired(cand, base, op, conc, fn):
    xs = []
    for (s, o, c, rnd), fig in per_round.items():
        if s == base and o == op and c == conc and (cand, op, conc, rnd) in per_round:
            v = fn(per_round[(cand, op, conc, rnd)], fig)
            if v is not None:
                xs.append(v)
    return round(med(xs), 3) if xs else None


ratio = lambda k: (lambda c, b: c[k] / b[k] if b[k] else None)
diff = lambda k: (lambda c, b: c[k] - b[k])
concs = sorted({k[2] for k in results})
targets = []


def target(name, value, limit, ok):
    targets.append({"target": name, "value": value, "limit": limit, "result": "PASS" if ok else "MISS"})


def table(cand, base, ops):
    print(f"\n| op | conc | server | ops/s | p50 µs | p99 µs | server CPU µs/req | RSS MiB | errors |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for op in ops:
        for c in concs:
            for s in (base, cand):
                x = results.get((s, op, c))
                if x:
                    print(f"| {op} | {c} | {s} | {x['ops_per_sec']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                          f"{x['cpu_us_per_req']:.1f} | {x['rss_mib']:.1f} | {x['errors']} |")


comparisons = []
print(f"\nrun_backends.sh: {os.cpu_count()} CPUs, {env.get('BENCH_SECS')} s + {env.get('BENCH_WARM')} s warmup, "
      f"{env.get('BENCH_ROUNDS_N')} round(s), commit {env.get('BENCH_COMMIT')}, load average "
      f"{env.get('BENCH_LOAD_BEFORE')} -> {env.get('BENCH_LOAD_AFTER')}")

# ---- pkcs11 vs local ----
if any(k[0] == "pkcs11" for k in results):
    print("\n### pkcs11 (SoftHSM2) vs local")
    table("pkcs11", "local", ("encrypt", "decrypt"))
    print("\n| op | conc | ops/s pkcs11/local | p50 pkcs11/local | CPU/req pkcs11 − local (µs) |")
    print("|---|---:|---:|---:|---:|")
    for op in ("encrypt", "decrypt"):
        for c in concs:
            row = {"cand": "pkcs11", "base": "local", "op": op, "concurrency": c,
                   "ops_per_sec_ratio": paired("pkcs11", "local", op, c, ratio("ops_per_sec")),
                   "p50_ratio": paired("pkcs11", "local", op, c, ratio("p50_us")),
                   "cpu_us_added": paired("pkcs11", "local", op, c, diff("cpu_us_per_req"))}
            comparisons.append(row)
            print(f"| {op} | {c} | {row['ops_per_sec_ratio']} | {row['p50_ratio']} | {row['cpu_us_added']} |")
            if c == 8:
                v = row["ops_per_sec_ratio"]
                target(f"pkcs11 {op} c=8 ops/s >= 0.7x local", v, 0.7, v is not None and v >= 0.7)
                v = row["cpu_us_added"]
                target(f"pkcs11 {op} c=8 server CPU/request <= local + 50 µs", v, 50, v is not None and v <= 50)

# ---- vault vs raw ----
if any(k[0] == "vault" for k in results):
    print("\n### vault (kmsplugin over gRPC) vs raw libcurl round trip, same Vault test server (HTTPS, keep-alive)")
    print("(server CPU for `raw` rows is the Python test server's; for `vault` rows the plugin's)")
    table("vault", "raw", ("encrypt", "decrypt", "status"))
    print("\n| op | conc | ops/s vault/raw | p50 vault − raw (µs) | p99 vault/raw |")
    print("|---|---:|---:|---:|---:|")
    for op in ("encrypt", "decrypt"):
        for c in concs:
            row = {"cand": "vault", "base": "raw", "op": op, "concurrency": c,
                   "ops_per_sec_ratio": paired("vault", "raw", op, c, ratio("ops_per_sec")),
                   "p50_added_us": paired("vault", "raw", op, c, diff("p50_us")),
                   "p99_ratio": paired("vault", "raw", op, c, ratio("p99_us"))}
            comparisons.append(row)
            print(f"| {op} | {c} | {row['ops_per_sec_ratio']} | {row['p50_added_us']} | {row['p99_ratio']} |")
            if c == 1:
                v = row["p50_added_us"]
                target(f"vault {op} c=1 p50 <= raw p50 + 300 µs", v, 300, v is not None and v <= 300)
    # Backend requests per call, from the server's counters (listener 0 is the plugin's alone).
    # A run with failed calls cannot be checked exactly (the loadgen counts errors in the window only, and a call
    # gRPC rejects before the handler, e.g. RESOURCE_EXHAUSTED at the thread cap, never reaches the key source):
    # such runs are listed but left out of the exactness targets, and their errors are a target of their own.
    print("\n| op | conc | loadgen calls (all) | failed in window | Vault requests (listener 0) | per call | "
          "new TCP connections |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    exact = {"encrypt": [0, True], "decrypt": [0, True], "status": [0, True]}
    for (s, op, c, rnd), fig in sorted(per_round.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if s != "vault" or fig["vault"] is None:
            continue
        v = fig["vault"]
        want = 0 if op == "status" else fig["calls_total"]
        if fig["errors"] == 0:
            exact[op][0] += 1
            exact[op][1] = exact[op][1] and v["total"] == want
        per = v["total"] / fig["calls_total"]
        print(f"| {op} | {c} | {fig['calls_total']} | {fig['errors']} | {v['total']} | {per:.4f} | "
              f"{v['connections']} |")
    for op, what in (("encrypt", "Vault requests == Encrypt calls"),
                     ("decrypt", "Vault requests == Decrypt calls (+ the loadgen's one setup Encrypt)"),
                     ("status", "no Vault request during Status runs")):
        n, ok = exact[op]
        target(f"vault: {what} ({n} error-free runs)", ok and n > 0, True, ok and n > 0)
    if final_stats:
        conns = final_stats["listeners"][0]["connections"]
        print(f"\nTCP connections the plugin opened to Vault over its whole life: {conns} "
              f"(max concurrency {max(concs)}, gRPC worker threads 32); requests by path: "
              f"{json.dumps(final_stats['listeners'][0]['requests'])}")
        target("vault: TCP connections opened over the run <= worker threads (32)", conns, 32, conns <= 32)

for x in results.values():
    if x["errors"]:
        target(f"{x['server']} {x['op']} c={x['concurrency']} no errors", x["errors"], 0, False)

print("\n| target | value | limit | result |")
print("|---|---:|---:|---|")
for t in targets:
    print(f"| {t['target']} | {t['value']} | {t['limit']} | {t['result']} |")

meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": env.get("BENCH_COMMIT"),
        "seconds": env.get("BENCH_SECS"), "warmup": env.get("BENCH_WARM"), "rounds": env.get("BENCH_ROUNDS_N"),
        "cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg_before": env.get("BENCH_LOAD_BEFORE"), "loadavg_after": env.get("BENCH_LOAD_AFTER")}
json.dump({"meta": meta, "results": list(results.values()), "comparisons": comparisons, "targets": targets,
           "final_vault_stats": final_stats}, open(out_path, "w"), indent=1)
print(f"\nwrote {out_path}")
sys.exit(3 if env.get("BENCH_STRICT") == "1" and any(t["result"] == "MISS" for t in targets) else 0)
