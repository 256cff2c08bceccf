# What the benchmark scripts share; sourced by them (after they set `state`), not run.

# Background processes of a run: `start NAME CMD...` runs CMD with its output in
# $state/NAME.log; `cleanup` stops them all (each script traps it on EXIT).
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
start() { local name=$1; shift; "$@" >"$state/$name.log" 2>&1 & pids+=($!); }

# oha_percentiles FILE -> "p50 p99 p99.9" in milliseconds, from an oha JSON report;
# fails the run if any request failed.
oha_percentiles() {
  python3 -c 'import json, sys
d = json.load(open(sys.argv[1])); p = d["latencyPercentiles"]
assert d["summary"]["successRate"] == 1, "requests failed: %s" % d.get("errorDistribution")
print("%.3f %.3f %.3f" % (p["p50"] * 1000, p["p99"] * 1000, p["p99.9"] * 1000))' "$1"
}

# wrk_chat_script FILE TOKEN: a wrk script that POSTs a small chat completion with TOKEN.
wrk_chat_script() {
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
LUA
}
