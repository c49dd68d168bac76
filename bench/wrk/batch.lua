-- 1,000 events per request over 10 tenants: {"events":[...]}.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local events = {}
for i = 1, 1000 do
  events[i] = string.format('{"dimension":"dim01","quantity":1,"tags":{"tenant":"t%d"}}', i % 10)
end
wrk.body = '{"events":[' .. table.concat(events, ",") .. ']}'
