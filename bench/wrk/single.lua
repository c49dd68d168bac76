-- One usage event per request, as an application posting a count per request it serves.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"dimension":"dim01","quantity":1,"tags":{"tenant":"acme"}}'
