-- KEYS[1] the breaker's hash. ARGV: now, cooldown, probes, ttl.
-- Returns {decision, state, opened_at}: decision 1 = call, 2 = call as a probe, 0 = skip.
local now = tonumber(ARGV[1])
local cooldown = tonumber(ARGV[2])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  return {1, state, '0'}
end
local opened_at = redis.call('HGET', KEYS[1], 'opened_at') or '0'
if state == 'open' then
  if now < tonumber(opened_at) + cooldown then
    return {0, state, opened_at}
  end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', state, 'probes', 0, 'probe_at', now)
end
-- half-open: a bounded number of probes; probes that never reported (their
-- replica died) are forgotten after another cool-down.
local probes = tonumber(redis.call('HGET', KEYS[1], 'probes') or '0')
local probe_at = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
if probes >= tonumber(ARGV[3]) and now >= probe_at + cooldown then
  probes = 0
end
if probes >= tonumber(ARGV[3]) then
  return {0, state, opened_at}
end
redis.call('HSET', KEYS[1], 'probes', probes + 1, 'probe_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {2, state, opened_at}
