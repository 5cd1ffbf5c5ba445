-- wrk script for bench/run.sh: POST /transfers between seeded cards, counted like bench/transaction.lua.
--
-- Usage: wrk -t2 -c256 -d15s -s bench/transfers.lua http://127.0.0.1:PORT -- [CARDS] [MODE]
--   CARDS: how many seeded cards `4%015d` to draw from (default 100000).
--   MODE:  uniform (default): source and destination drawn uniformly, never equal;
--          zipf: both drawn from a Zipf distribution with s = 1.0 over the cards (card 1 the hottest);
--          hot: every transfer pays card 1 (a merchant paid by everyone), sources drawn uniformly.
--
-- done() prints the same BENCH line as bench/transaction.lua. Amounts are small beside the opening
-- balances, so insufficient_funds stays rare.

wrk.method = "POST"
wrk.path = "/transfers"
wrk.headers["Content-Type"] = "application/json"

local AMOUNT_MAX = 5000
local ZIPF_S = 1.0

local threads = {}

function setup(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

-- The cumulative Zipf distribution over 1..cards, for a binary search per draw.
local function zipf_table(n, s)
   local cdf, total = {}, 0
   for k = 1, n do
      total = total + 1 / (k ^ s)
      cdf[k] = total
   end
   for k = 1, n do
      cdf[k] = cdf[k] / total
   end
   return cdf
end

local function zipf_draw(cdf, n)
   local u, lo, hi = math.random(), 1, n
   while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
   end
   return lo
end

function init(args)
   cards = tonumber(args[1]) or 100000
   mode = args[2] or "uniform"
   ok200, s422, s503, other = 0, 0, 0, 0
   math.randomseed(os.time() * 1000 + id * 7919)
   if mode == "zipf" then cdf = zipf_table(cards, ZIPF_S) end
end

local function draw()
   if mode == "zipf" then return zipf_draw(cdf, cards) end
   return math.random(1, cards)
end

function request()
   local source, destination
   if mode == "hot" then
      destination = 1
      source = math.random(2, cards)
   else
      repeat
         source, destination = draw(), draw()
      until source ~= destination
   end
   local body = string.format('{"source":"4%015d","destination":"4%015d","amount":%d}',
      source, destination, math.random(1, AMOUNT_MAX))
   return wrk.format(nil, nil, nil, body)
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
