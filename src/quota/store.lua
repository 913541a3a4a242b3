-- meshllm shared quota counters (see src/quota/store.rs).
-- KEYS: one counter per (bucket, limit, window); the window is in the name.
-- ARGV[1] = "reserve": then per key i, ARGV[2+3(i-1)..] = max, amount,
--   expire-at (Unix s). Admits only if every counter with amount > 0 stays
--   within its max, then adds every amount (all or nothing).
--   Returns {1, used...} after adding, or {0, used...} as found.
-- ARGV[1] = "settle": then per key i, ARGV[1+i] = a signed delta. Adds it
--   to counters that still exist (an expired window is not revived), never
--   below 0. Returns {1, used...}, -1 for a counter that is gone.
-- ARGV[1] = "lease": then per key i, ARGV[2+5(i-1)..] = max, amount,
--   expire-at, extra, divisor. As "reserve" for the amounts (all or
--   nothing); once admitted, each counter also grants up to `extra` more,
--   at most (max - used - amount) / divisor, so leases shrink as the counter
--   fills. Returns {1, used..., granted...} (granted: the extra added), or
--   {0, used..., 0...} as found.
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
elseif mode == "lease" then
  local n = #KEYS
  local fits = 1
  for i = 1, n do
    local base = 5 * i - 3
    local max = tonumber(ARGV[base])
    local amount = tonumber(ARGV[base + 1])
    local now = tonumber(redis.call("GET", KEYS[i]) or "0") or 0
    used[i] = now
    used[n + i] = 0
    if amount > 0 and now + amount > max then
      fits = 0
    end
  end
  if fits == 1 then
    for i = 1, n do
      local base = 5 * i - 3
      local max = tonumber(ARGV[base])
      local amount = tonumber(ARGV[base + 1])
      local extra = tonumber(ARGV[base + 3])
      local share = math.floor((max - used[i] - amount) / tonumber(ARGV[base + 4]))
      if extra > share then
        extra = share
      end
      if extra < 0 then
        extra = 0
      end
      used[i] = redis.call("INCRBY", KEYS[i], amount + extra)
      redis.call("EXPIREAT", KEYS[i], tonumber(ARGV[base + 2]))
      used[n + i] = extra
    end
  end
  table.insert(used, 1, fits)
  return used
end
return redis.error_reply("meshllm: unknown mode")
