-- EXPIRE: the sweeper ends a conversation whose time ran out ('expired', at that time), unless
-- a message extended it meanwhile or is being handled now (it will extend or end it itself).
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua ending.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9] = the conversation's index member, '<from>|<to>'
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns 1 if it ended the conversation, else 0.
local member = ARGV[9]
local now = now_ms()
local expiry = tonumber(redis.call('ZSCORE', index, member))
if not expiry or expiry > now or redis.call('EXISTS', lock) == 1 then return 0 end
return ends().finish(member, 'expired', expiry, now)
