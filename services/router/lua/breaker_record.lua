-- KEYS[1] the breaker's hash. ARGV: now, ok (1/0), failures, rate, min_calls, window, ttl.
-- Returns {state, consecutive failures}.
local now = tonumber(ARGV[1])
local ok = ARGV[2] == '1'
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'probes', 0,
             'consecutive', 0, 'calls', 0, 'failed', 0, 'window_start', now)
  redis.call('HINCRBY', KEYS[1], 'trips', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return {'open', 0}
end
if state == 'half_open' then
  if not ok then return open() end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', 0, 'calls', 0,
             'failed', 0, 'window_start', now, 'probes', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return {'closed', 0}
end
if state == 'open' then
  return {'open', 0}  -- a call that started before the breaker opened
end
local window_start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now >= window_start + tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'calls', 0, 'failed', 0, 'window_start', now)
end
local calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
local failed = tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
local consecutive = 0
if ok then
  redis.call('HSET', KEYS[1], 'consecutive', 0)
else
  failed = redis.call('HINCRBY', KEYS[1], 'failed', 1)
  consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
end
redis.call('HSET', KEYS[1], 'state', 'closed')
redis.call('EXPIRE', KEYS[1], ARGV[7])
if not ok and (consecutive >= tonumber(ARGV[3]) or
    (calls >= tonumber(ARGV[5]) and failed >= tonumber(ARGV[4]) * calls)) then
  return open()
end
return {'closed', consecutive}
