-- wrk script: random customers (cust_1..cust_N) and random `from` days of the last 31 days.
-- wrk -t2 -c64 -d10s -s bench/query.lua http://127.0.0.1:8080 -- 1000 2026-10-22
local customers, first_day = 1000, nil
local function day_string(offset)
  return os.date("!%Y-%m-%d", first_day + offset * 86400)
end
function init(args)
  customers = tonumber(args[1] or "1000")
  local y, m, d = (args[2] or "2026-10-22"):match("(%d+)-(%d+)-(%d+)")
  first_day = os.time({year = tonumber(y), month = tonumber(m), day = tonumber(d), hour = 12})
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
end
function request()
  local path = string.format("/customers/cust_%d/stats?from=%s", math.random(1, customers),
                             day_string(math.random(0, 30)))
  return wrk.format("GET", path)
end
