-- KEYS[1] the breaker's hash. ARGV: now, successes, failed (1/0), failures, rate,
-- min_calls, window, ttl. The successes are counted first (a replica reports
-- the successes of a closed breaker in one call, and before its next failure).
-- Returns {state, consecutive failures}.
local now = tonumber(ARGV[1])
local successes = tonumber(ARGV[2])
local failed_now = ARGV[3] == '1'
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'probes', 0,
             'consecutive', 0, 'calls', 0, 'failed', 0, 'window_start', now)
  redis.call('HINCRBY', KEYS[1], 'trips', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  return {'open', 0}
end
if state == 'half_open' then
  if failed_now then return open() end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', 0, 'calls', 0,
             'failed', 0, 'window_start', now, 'probes', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  return {'closed', 0}
end
if state == 'open' then
  return {'open', 0}  -- calls that started before the breaker opened
end
local window_start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now >= window_start + tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[1], 'calls', 0, 'failed', 0, 'window_start', now)
end
local calls = redis.call('HINCRBY', KEYS[1], 'calls', successes + (failed_now and 1 or 0))
local failed = tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
local consecutive = tonumber(redis.call('HGET', KEYS[1], 'consecutive') or '0')
if successes > 0 then
  consecutive = 0
end
if failed_now then
  failed = redis.call('HINCRBY', KEYS[1], 'failed', 1)
  consecutive = consecutive + 1
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', consecutive)
redis.call('EXPIRE', KEYS[1], ARGV[8])
if failed_now and (consecutive >= tonumber(ARGV[4]) or
    (calls >= tonumber(ARGV[6]) and failed >= tonumber(ARGV[5]) * calls)) then
  return open()
end
return {'closed', consecutive}
