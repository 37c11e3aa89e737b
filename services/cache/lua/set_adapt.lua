-- KEYS: entry. ARGV: state. Writes the adaptive state only into a live entry
-- (a plain HSET would resurrect an expired or deleted entry as a stub).
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'adapt', ARGV[1]) end
