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

-- The counting and the BENCH line, shared with the other wrk script (beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "counts.lua")

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
