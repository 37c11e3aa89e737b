-- Swaps the stored score of a request and appends the two observations.
-- KEYS: request hash, log stream. ARGV: new score. Returns 0 if unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local arm = redis.call('HGET', KEYS[1], 'arm')
local x = redis.call('HGET', KEYS[1], 'x')
local prior = tonumber(redis.call('HGET', KEYS[1], 'prior'))
local old = redis.call('HGET', KEYS[1], 'score')
redis.call('HSET', KEYS[1], 'score', ARGV[1])
if old then
  redis.call('XADD', KEYS[2], '*', 'a', arm, 'x', x, 'y', tostring(tonumber(old) - prior),
             'w', '-1')
end
redis.call('XADD', KEYS[2], '*', 'a', arm, 'x', x, 'y', tostring(tonumber(ARGV[1]) - prior),
           'w', '1')
return 1
