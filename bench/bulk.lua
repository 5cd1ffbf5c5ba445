-- wrk script for bench/run.sh: POST /transfers/bulk between seeded cards.
--
-- Usage: wrk -t2 -c16 -d15s -s bench/bulk.lua http://127.0.0.1:PORT -- [CARDS] [MODE] [ITEMS]
--   CARDS: how many seeded cards `4%015d` to draw from (default 100000).
--   MODE:  uniform (default), zipf (s = 1.0, card 1 the hottest) or hot (every transfer pays card 1),
--          drawn as bench/transfers.lua draws them.
--   ITEMS: transfers per request (default 100).
--
-- Each thread makes BODIES bodies once, in init(), and sends them in turn: making 8,190 items in Lua for
-- every request would put wrk, not the server, on the two cores. A body sent again is a new set of
-- transfers (no idempotency keys), and the amounts are small beside the opening balances, so refusals
-- stay rare. done() prints the BENCH line of bench/counts.lua with items_ok=N (items answered 200 inside
-- the 200 answers) and items_other=N (refused items) added: bench/run.sh's transfers/s is items_ok over
-- the duration.

wrk.method = "POST"
wrk.path = "/transfers/bulk"
wrk.headers["Content-Type"] = "application/json"

local AMOUNT_MAX = 50
local ZIPF_S = 1.0
local BODIES = 8

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "counts.lua")

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

local function pair()
   if mode == "hot" then
      return math.random(2, cards), 1
   end
   local source, destination
   repeat
      if mode == "zipf" then
         source, destination = zipf_draw(cdf, cards), zipf_draw(cdf, cards)
      else
         source, destination = math.random(1, cards), math.random(1, cards)
      end
   until source ~= destination
   return source, destination
end

function init(args)
   cards = tonumber(args[1]) or 100000
   mode = args[2] or "uniform"
   items = tonumber(args[3]) or 100
   ok200, s422, s503, other, items_ok, items_other = 0, 0, 0, 0, 0, 0
   math.randomseed(os.time() * 1000 + id * 7919)
   if mode == "zipf" then cdf = zipf_table(cards, ZIPF_S) end
   requests = {}
   for b = 1, BODIES do
      local parts = {}
      for i = 1, items do
         local source, destination = pair()
         parts[i] = string.format('{"source":"4%015d","destination":"4%015d","amount":%d}',
            source, destination, math.random(1, AMOUNT_MAX))
      end
      requests[b] = wrk.format(nil, nil, nil, '{"transfers":[' .. table.concat(parts, ",") .. ']}')
   end
   turn = 0
end

function request()
   turn = turn % BODIES + 1
   return requests[turn]
end

local count_base = response
function response(status, headers, body)
   count_base(status, headers, body)
   if status == 200 then
      local ok = select(2, body:gsub('"status":200', ''))
      items_ok = items_ok + ok
      items_other = items_other + select(2, body:gsub('"index":', '')) - ok
   end
end

local done_base = done
function done(summary, latency, requests)
   local ok, refused = 0, 0
   for _, thread in ipairs(threads) do
      ok = ok + thread:get("items_ok")
      refused = refused + thread:get("items_other")
   end
   -- The base line first, then the item counts on the same line.
   local write = io.write
   io.write = function(text) write((text:gsub("\n$", string.format(" items_ok=%d items_other=%d\n", ok, refused)))) end
   done_base(summary, latency, requests)
   io.write = write
end
