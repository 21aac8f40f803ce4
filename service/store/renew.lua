-- RENEW: a handler running past the webhook still holds its conversation: its lock's lease
-- (and the conversation's score in the pending set) is extended by LOCK_TTL.
--
-- uses: common.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the run's token
-- ARGV[10] = the conversation's index member, '<from>|<to>'
-- Returns 1 if the lock is still the token's (renewed), else 0 (it lapsed: the run's save
-- will be refused).
local token, member = ARGV[9], ARGV[10]
local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then return 0 end
redis.call('PEXPIRE', lock, lock_ms)
redis.call('ZADD', pending, 'XX', now_ms() + lock_ms, member)
return 1
