-- KEYS: counters   ARGV: per counter (spent from the ledger, expireat or 0)
for i = 1, #KEYS do
  local current = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
  if current < tonumber(ARGV[2 * i - 1]) then
    redis.call('HSET', KEYS[i], 'spent', ARGV[2 * i - 1])
  end
  if ARGV[2 * i] ~= '0' then redis.call('EXPIREAT', KEYS[i], ARGV[2 * i]) end
end
return #KEYS
