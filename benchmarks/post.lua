-- wrk script: POST the bodies of $BODIES (one per line) in turn; $CONTENT_TYPE; optional
-- $DELAY_MS between a connection's requests (a paced, not saturating, load).
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do
  bodies[#bodies + 1] = line
end
local headers = { ["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json" }
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
local i = math.random(#bodies)
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")

request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, headers, bodies[i])
end

if delay_ms > 0 then
  delay = function()
    return delay_ms
  end
end
