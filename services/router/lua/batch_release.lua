-- KEYS: meta, queue, leases. ARGV: id. Gives a claimed item back (this replica stops).
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'running', -1)
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
return 1
