-- wrk script for bench/run.sh: POST /transaction with a random seeded card and a signed amount.
--
-- Usage: wrk -t2 -c64 -d15s -s bench/transaction.lua http://127.0.0.1:PORT -- [CARDS] [keyed]
--   CARDS: how many seeded cards `4%015d` to draw from (default 100000, as docs/CONTRACT.md seeds).
--   keyed: send a new Idempotency-Key with every request (thread, counter and a random part).
--
-- Every answer is counted by status in response(), and done() prints one line that bench/run.sh parses:
--   BENCH requests=N duration_us=N ok200=N s422=N s503=N other=N ... p50_us=N p99_us=N
-- Each 200 is a transaction tallyd says is durable: the benchmark checks the journal holds at least ok200 rows.

wrk.method = "POST"
wrk.path = "/transaction"
wrk.headers["Content-Type"] = "application/json"
-- bench/run.sh's keyed_auth target puts an API key in the environment: every request carries it.
local bench_key = os.getenv("TALLYD_BENCH_KEY")
if bench_key ~= nil and bench_key ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. bench_key
end

-- The amounts are small beside the seeded opening balances (100,000 and up), and a little over half are
-- deposits, so that insufficient_funds stays rare: nearly every request must commit.
local AMOUNT_MAX = 5000
local DEPOSIT_SHARE = 0.55

-- The counting and the BENCH line, shared with the other wrk script (beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "counts.lua")

function init(args)
   cards = tonumber(args[1]) or 100000
   keyed = args[2] == "keyed"
   ok200, s422, s503, other = 0, 0, 0, 0
   math.randomseed(os.time() * 1000 + id * 7919)
   salt = string.format("%08x", math.random(0, 0x7fffffff))
   sent = 0
end

function request()
   local amount = math.random(1, AMOUNT_MAX)
   if math.random() >= DEPOSIT_SHARE then
      amount = -amount
   end
   local body = string.format('{"card_number":"4%015d","amount":%d}', math.random(1, cards), amount)
   if keyed then
      sent = sent + 1
      local headers = {
         ["Content-Type"] = "application/json",
         ["Idempotency-Key"] = string.format("bench-%s-%d-%d", salt, id, sent),
      }
      return wrk.format(nil, nil, headers, body)
   end
   return wrk.format(nil, nil, nil, body)
end
