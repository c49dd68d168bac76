-- Batches of 1,000 events, each over 1,000 of the 10,000 tenants.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {}
for b = 0, 9 do
  local events = {}
  for i = 1, 1000 do
    events[i] = string.format('{"dimension":"dim01","quantity":1,"tags":{"tenant":"t%05d"}}', (i * 10 + b) % 10000)
  end
  bodies[b + 1] = '{"events":[' .. table.concat(events, ",") .. ']}'
end
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[n % 10 + 1])
end
