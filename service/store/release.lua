-- RELEASE: a message that will not save (its handler failed, or it gave up waiting) leaves the
-- line, and gives the lock back if it holds it (the first in line is woken to ask again).
--
-- uses: common.lua reply.lua line.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9] = the message's token (OPEN's ARGV[9])
-- Returns nothing.
local token = ARGV[9]
redis.call('ZREM', queue, token)
redis.call('HDEL', waiters, token)
local holder = redis.call('GET', lock)
if holder == token or holder == token .. '+' then
  redis.call('DEL', lock)
  if holder ~= token then handover().wake_first(now_ms()) end
end
