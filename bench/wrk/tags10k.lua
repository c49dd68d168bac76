-- Single events spread over 10,000 tenants (10,000 distinct tag sets in the open hour).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local tenant = (n * 7919 + math.random(0, 9999)) % 10000
  return wrk.format(nil, nil, nil,
    string.format('{"dimension":"dim01","quantity":1,"tags":{"tenant":"t%05d"}}', tenant))
end
