-- END: an operator ends the conversation now ('operator'); one whose time already ran out ends
-- as 'expired' at that time instead. The lock goes too, so that a message being handled
-- answers 503 instead of bringing the conversation back.
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua ending.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9] = the conversation's index member, '<from>|<to>'
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns 1 if it was live (and is now ended by the operator), else 0.
local member = ARGV[9]
local now = now_ms()
local expiry = tonumber(redis.call('ZSCORE', index, member)) or now + 1
redis.call('DEL', lock)
if expiry <= now then
  ends().finish(member, 'expired', expiry, now)
  return 0
end
return ends().finish(member, 'operator', now, now)
