-- KEYS: entry keys. ARGV: tag, then the ids of KEYS. Returns the ids deleted.
-- Needs delete_entry.lua prepended.
local deleted = {}
for i = 2, #ARGV do
  if delete_entry(ARGV[1], ARGV[i]) then deleted[#deleted + 1] = ARGV[i] end
end
return deleted
