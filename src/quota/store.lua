-- meshllm shared quota counters (see src/quota/store.rs).
-- KEYS: one counter per (bucket, limit, window); the window is in the name.
-- ARGV[1] = "reserve": then per key i, ARGV[2+3(i-1)..] = max, amount,
--   expire-at (Unix s). Admits only if every counter with amount > 0 stays
--   within its max, then adds every amount (all or nothing).
--   Returns {1, used...} after adding, or {0, used...} as found.
-- ARGV[1] = "settle": then per key i, ARGV[1+i] = a signed delta. Adds it
--   to counters that still exist (an expired window is not revived), never
--   below 0. Returns {1, used...}, -1 for a counter that is gone.
local mode = ARGV[1]
local used = {}
if mode == "reserve" then
  local fits = 1
  for i = 1, #KEYS do
    local max = tonumber(ARGV[3 * i - 1])
    local amount = tonumber(ARGV[3 * i])
    local now = tonumber(redis.call("GET", KEYS[i]) or "0") or 0
    used[i] = now
    if amount > 0 and now + amount > max then
      fits = 0
    end
  end
  if fits == 0 then
    table.insert(used, 1, 0)
    return used
  end
  for i = 1, #KEYS do
    used[i] = redis.call("INCRBY", KEYS[i], tonumber(ARGV[3 * i]))
    redis.call("EXPIREAT", KEYS[i], tonumber(ARGV[3 * i + 1]))
  end
  table.insert(used, 1, 1)
  return used
elseif mode == "settle" then
  for i = 1, #KEYS do
    if redis.call("EXISTS", KEYS[i]) == 1 then
      local now = redis.call("INCRBY", KEYS[i], tonumber(ARGV[1 + i]))
      if now < 0 then
        redis.call("SET", KEYS[i], "0", "KEEPTTL")
        now = 0
      end
      used[i] = now
    else
      used[i] = -1
    end
  end
  table.insert(used, 1, 1)
  return used
end
return redis.error_reply("meshllm: unknown mode")
