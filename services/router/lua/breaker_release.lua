-- KEYS[1] the breaker's hash. Gives back a probe slot that reported nothing
-- (the client cancelled, or the request was the client's fault).
if redis.call('HGET', KEYS[1], 'state') == 'half_open' then
  local probes = tonumber(redis.call('HGET', KEYS[1], 'probes') or '0')
  if probes > 0 then redis.call('HSET', KEYS[1], 'probes', probes - 1) end
end
return 1
