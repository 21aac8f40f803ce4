-- RECOVER: the sweeper's recovery of a conversation in the pending set whose lease is past (the
-- process running its handler died): the lock is taken for its first inbound message, whose
-- handler then runs again in the claiming process. The conversation is ended first if its time
-- ran out, as OPEN does.
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua ending.lua reply.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = 16 hex digits: the run's token is the message's MessageSid, ';' and these
-- ARGV[10] = the conversation's index member, '<from>|<to>'
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns 'none' (no inbound message: it leaves the pending set), 'held' (its lock is held:
-- its score moves to the lock's end), or OPEN's 'opened' reply (reply.lua) followed by
-- 'token', the run's token, and 'entry', the inbound message.
local hex, member = ARGV[9], ARGV[10]
local now = now_ms()
local first = redis.call('LINDEX', inbound, 0)
if not first then
  redis.call('ZREM', pending, member)
  return 'none'
end
local left = redis.call('PTTL', lock)
if left ~= -2 then
  redis.call('ZADD', pending, now + math.max(left, lock_ms), member)
  return 'held'
end
local token = string.match(first, '^(%S+) ') .. ';' .. hex
redis.call('SET', lock, redis.call('ZCARD', queue) > 0 and token .. '+' or token, 'PX', lock_ms)
redis.call('ZADD', pending, now + lock_ms, member)
local found = redis.call('HMGET', conversation, 'm:', 'sid', 'state', 'seq', 'first_seen', 'last_seen', 'paused',
                         'timers', 'ttl')
local turn
local expiry = found[2] and (tonumber(redis.call('ZSCORE', index, member)) or (tonumber(found[6]) or now) + (tonumber(found[9]) or ttl_ms))
if expiry and expiry <= now then
  turn = reply_opened(now, {}, ends().finish(member, 'expired', expiry, now))
else
  turn = reply_opened(now, found, 0, 7)
end
turn[#turn + 1], turn[#turn + 2], turn[#turn + 3], turn[#turn + 4] = 'token', token, 'entry', first
return turn
