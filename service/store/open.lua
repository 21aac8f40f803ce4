-- OPEN, a message's round trip 1. A redelivered MessageSid gets its stored answer. Otherwise
-- the message queues for the lock in arrival order (a ticket lock: a waiter that stopped
-- asking drops out) and, first in line with the lock free, takes it and gets the
-- conversation, which is ended first if its time ran out (its index score: last message + TTL).
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua ending.lua reply.lua line.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the message's token, '<MessageSid>;<16 hex digits>'
-- ARGV[10] = its MessageSid
-- ARGV[11] = the conversation's index member, '<from>|<to>'
-- ARGV[12] = the message's fields as JSON, or '': sent only when asked for ('deferred')
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns a flat list of names and values (reply.lua): status 'answered', answer, sid for a
-- redelivery; status 'opened', now, sid, state, seq, first_seen, ended_overdue (1 or 0), paused,
-- timers, ttl once the lock is the message's; status 'waiting', ahead while others are ahead of
-- it (ask again). While the conversation has inbound messages (a handler runs past the webhook,
-- KEYS[16]), the first in line joins them instead: status 'queued' once it is among them
-- (acknowledged: the handler's run takes it in turn), 'deferred' when it was asked without its
-- fields (ask again with them; its place in line is kept).
local token, message_sid, member, entry = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
if entry == '' then entry = nil end

-- One read for the redelivery check and the conversation (a waiter's poll reads it for nothing,
-- but polls are rare: an uncontended message saves a call).
local found = redis.call('HMGET', conversation, 'm:' .. message_sid, 'sid', 'state', 'seq', 'first_seen',
                         'last_seen', 'paused', 'timers', 'ttl')
if found[1] then  -- answered while this delivery waited, maybe: it leaves the line at once
  if redis.call('ZREM', queue, token) == 1 then  -- a waiter's heartbeat goes with its ticket
    redis.call('HDEL', waiters, token)
  end
  return reply_answered(found[1], found[2])
end
local now = now_ms()

-- Takes a ticket (once) and renews the heartbeat; marks the holder as waited for.
local function join_line(holder)
  if not redis.call('ZSCORE', queue, token) then
    local last = redis.call('ZRANGE', queue, -1, -1, 'WITHSCORES')
    redis.call('ZADD', queue, (tonumber(last[2]) or 0) + 1, token)
  end
  redis.call('HSET', waiters, token, now + patience_ms)
  if holder and string.sub(holder, -1) ~= '+' then redis.call('SET', lock, holder .. '+', 'KEEPTTL') end
  redis.call('PEXPIRE', queue, patience_ms + lock_ms)
  redis.call('PEXPIRE', waiters, patience_ms + lock_ms)
end

local head = head_of(token, now)
if (not head or head == token) and redis.call('EXISTS', inbound) == 1 then
  local sought = message_sid .. ' '
  local known = false
  for _, queued in ipairs(redis.call('LRANGE', inbound, 0, -1)) do
    if string.sub(queued, 1, #sought) == sought then known = true break end
  end
  if not known and not entry then
    join_line(redis.call('GET', lock))
    return {'status', 'deferred'}
  end
  if not known then
    redis.call('RPUSH', inbound, sought .. entry)
    redis.call('PEXPIRE', inbound, live_keep_ms)
  end
  if head then
    redis.call('ZREM', queue, token)
    redis.call('HDEL', waiters, token)
    handover().wake_first(now)  -- the next in line joins them too
  end
  return {'status', 'queued'}
end
-- The lock holds its holder's token, marked '+' while someone waits behind it: its save or
-- release then hands the turn over (line.lua) instead of leaving the next in line to poll.
local mine = head == token and redis.call('ZCARD', queue) > 1 and token .. '+' or token
if (not head or head == token) and redis.call('SET', lock, mine, 'NX', 'PX', lock_ms) then
  if head then
    redis.call('ZREM', queue, token)
    redis.call('HDEL', waiters, token)
  end
  if found[2] then  -- only a stored conversation can have run out of time
    local expiry = tonumber(redis.call('ZSCORE', index, member)) or (tonumber(found[6]) or now) + (tonumber(found[9]) or ttl_ms)
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
join_line(holder)
return {'status', 'waiting', 'ahead', redis.call('ZRANK', queue, token)}
