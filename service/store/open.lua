-- OPEN, a message's round trip 1. A redelivered MessageSid gets its stored answer. Otherwise
-- the message queues for the lock in arrival order (a ticket lock: a waiter that stopped
-- asking drops out) and, first in line with the lock free, takes it and gets the
-- conversation, which is ended first if its time ran out (its index score: last message + TTL).
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua ending.lua reply.lua line.lua
-- KEYS[1..9], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the message's token, '<MessageSid>;<16 hex digits>'
-- ARGV[10] = its MessageSid
-- ARGV[11] = the conversation's index member, '<from>|<to>'
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns a flat list of names and values (reply.lua): status 'answered', answer, sid for a
-- redelivery; status 'opened', now, sid, state, seq, first_seen, ended_overdue (1 or 0), paused once
-- the lock is the message's; status 'waiting', ahead while others are ahead of it (ask again).
local token, message_sid, member = ARGV[9], ARGV[10], ARGV[11]

-- One read for the redelivery check and the conversation (a waiter's poll reads it for nothing,
-- but polls are rare: an uncontended message saves a call).
local found = redis.call('HMGET', conversation, 'm:' .. message_sid, 'sid', 'state', 'seq', 'first_seen',
                         'last_seen', 'paused')
if found[1] then  -- answered while this delivery waited, maybe: it leaves the line at once
  if redis.call('ZREM', queue, token) == 1 then  -- a waiter's heartbeat goes with its ticket
    redis.call('HDEL', waiters, token)
  end
  return reply_answered(found[1], found[2])
end
local now = now_ms()

local head = head_of(token, now)
-- The lock holds its holder's token, marked '+' while someone waits behind it: its save or
-- release then hands the turn over (line.lua) instead of leaving the next in line to poll.
local mine = head == token and redis.call('ZCARD', queue) > 1 and token .. '+' or token
if (not head or head == token) and redis.call('SET', lock, mine, 'NX', 'PX', lock_ms) then
  if head then
    redis.call('ZREM', queue, token)
    redis.call('HDEL', waiters, token)
  end
  if found[2] then  -- only a stored conversation can have run out of time
    local expiry = tonumber(redis.call('ZSCORE', index, member)) or (tonumber(found[6]) or now) + ttl_ms
    if expiry <= now then
      return reply_opened(now, {}, ends().finish(member, 'expired', expiry, now))
    end
  end
  return reply_opened(now, found, 0, 7)
end

local holder = redis.call('GET', lock)
if holder == token or holder == token .. '+' then  -- handed over by a save while its BLPOP had given up
  return reply_opened(now, found, 0, 7)
end
if not redis.call('ZSCORE', queue, token) then
  local last = redis.call('ZRANGE', queue, -1, -1, 'WITHSCORES')
  redis.call('ZADD', queue, (tonumber(last[2]) or 0) + 1, token)
end
redis.call('HSET', waiters, token, now + patience_ms)
if holder and string.sub(holder, -1) ~= '+' then redis.call('SET', lock, holder .. '+', 'KEEPTTL') end
redis.call('PEXPIRE', queue, patience_ms + lock_ms)
redis.call('PEXPIRE', waiters, patience_ms + lock_ms)
return {'status', 'waiting', 'ahead', redis.call('ZRANK', queue, token)}
