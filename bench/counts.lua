-- bench/counts.lua: what bench/transaction.lua and bench/transfers.lua share, loaded by both with dofile.
-- Every answer is counted by status in response(), and done() prints one line that bench/run.sh parses:
--   BENCH requests=N duration_us=N ok200=N s422=N s503=N other=N ... p50_us=N p99_us=N
-- Each thread gets an `id` (1, 2, ...) for its random seed; init() must set ok200, s422, s503, other to 0.

threads = {}

function setup(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

function response(status, headers, body)
   if status == 200 then
      ok200 = ok200 + 1
   elseif status == 422 then
      s422 = s422 + 1
   elseif status == 503 then
      s503 = s503 + 1
   else
      other = other + 1
   end
end

function done(summary, latency, requests)
   local totals = { ok200 = 0, s422 = 0, s503 = 0, other = 0 }
   for _, thread in ipairs(threads) do
      for name, _ in pairs(totals) do
         totals[name] = totals[name] + thread:get(name)
      end
   end
   local errors = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d ok200=%d s422=%d s503=%d other=%d " ..
      "connect_err=%d read_err=%d write_err=%d timeout_err=%d " ..
      "p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
      summary.requests, summary.duration, totals.ok200, totals.s422, totals.s503, totals.other,
      errors.connect, errors.read, errors.write, errors.timeout,
      math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
      math.floor(latency:percentile(99)), math.floor(latency.max)))
end
