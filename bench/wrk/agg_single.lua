-- One event per request on the dimension $BENCH_DIM. With BENCH_UNIQUE=1 it is a `unique`
-- event whose distinct value cycles over 50,000 (below the 100,000 per dimension-hour bound);
-- otherwise a quantity that varies, so `max` and `last` keep changing their value.
local dim = os.getenv("BENCH_DIM") or "dim01"
local unique = os.getenv("BENCH_UNIQUE") == "1"
-- A `sum` dimension counts 1 per event, so a run stays below its hourly cap of 2147483647.
local sum = os.getenv("BENCH_SUM") == "1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body
  if unique then
    body = string.format('{"dimension":"%s","distinct":"user-%d","tags":{"tenant":"acme"}}', dim, n % 50000)
  else
    body = string.format('{"dimension":"%s","quantity":%d,"tags":{"tenant":"acme"}}', dim, sum and 1 or n % 1000)
  end
  return wrk.format(nil, nil, nil, body)
end
