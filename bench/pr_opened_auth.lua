-- wrk script for relaybot: the n8n harness's pr_opened.lua (same ~2 KB GitHub pull_request "opened" body,
-- same headers, same per-thread request cap and WRKJSON summary line) plus
--   BENCH_AUTH     value of the Authorization header (relaybot's cheapest valid scheme: "Bearer <secret>")
--   BENCH_TARGETS  optional "host:port,host:port": wrk thread i sends to target i mod n (round-robin over
--                  several relaybot processes; the URL's path is used for all of them)
local body_path = os.getenv("BENCH_BODY") or "pr_opened.json"
local f = assert(io.open(body_path, "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-GitHub-Event"] = "pull_request"
wrk.headers["X-GitHub-Delivery"] = "00000000-0000-4000-8000-000000000000"
wrk.headers["User-Agent"] = "GitHub-Hookshot/bench"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

local targets = os.getenv("BENCH_TARGETS") or ""
local addrs = nil
local threads_set = 0

function setup(thread)
  if targets == "" then
    return
  end
  if addrs == nil then
    addrs = {}
    for hostport in string.gmatch(targets, "[^,]+") do
      local host, port = string.match(hostport, "^(.+):(%d+)$")
      local found = wrk.lookup(host, port)
      table.insert(addrs, found[1])
    end
  end
  thread.addr = addrs[(threads_set % #addrs) + 1]
  threads_set = threads_set + 1
end

local max_per_thread = tonumber(os.getenv("BENCH_MAX_REQ_PER_THREAD") or "100000")
local seen = 0

function response(status, headers, resp_body)
  seen = seen + 1
  if seen >= max_per_thread then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.2f,' ..
    '"lat_p50_ms":%.3f,"lat_p90_ms":%.3f,"lat_p99_ms":%.3f,"lat_max_ms":%.3f,"lat_mean_ms":%.3f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"body_bytes":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000,
    e.connect, e.read, e.write, e.status, e.timeout, #body))
end
