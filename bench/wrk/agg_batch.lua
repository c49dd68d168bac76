-- 1,000 events per request over 10 tenants on the dimension $BENCH_DIM, as batch.lua. With
-- BENCH_UNIQUE=1 they are `unique` events: 50 prepared bodies of 1,000 distinct values each
-- (50,000 in all, below the 100,000 per dimension-hour bound), sent in turn.
local dim = os.getenv("BENCH_DIM") or "dim01"
local unique = os.getenv("BENCH_UNIQUE") == "1"
-- A `sum` dimension counts 1 per event, so a run stays below its hourly cap of 2147483647.
local sum = os.getenv("BENCH_SUM") == "1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {}
for k = 1, (unique and 50 or 1) do
  local events = {}
  for i = 1, 1000 do
    if unique then
      events[i] = string.format('{"dimension":"%s","distinct":"user-%d","tags":{"tenant":"t%d"}}', dim, k * 1000 + i, i % 10)
    else
      events[i] = string.format('{"dimension":"%s","quantity":%d,"tags":{"tenant":"t%d"}}', dim, sum and 1 or i, i % 10)
    end
  end
  bodies[k] = '{"events":[' .. table.concat(events, ",") .. ']}'
end
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])
end
