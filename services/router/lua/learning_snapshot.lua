-- Stores a snapshot only if it is newer than the stored one, then trims the log.
-- KEYS: snapshot hash, log stream. ARGV: last id folded, blob.
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local current = redis.call('HGET', KEYS[1], 'id')
if current and not newer(ARGV[1], current) then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'blob', ARGV[2])
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[1])
return 1
