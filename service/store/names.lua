-- The numbers a conversation's events carry (EVENTS_NUMBERS): every script that writes events
-- is sent them as its last argument, '' for the numbers themselves, or '<hash>|<hash>' (from,
-- to: service/numbers_hash.py; Redis' Lua has no HMAC).
local function event_pair(member)
  local given = ARGV[#ARGV]
  if given == '' then return pair(member) end
  return pair(given)
end
