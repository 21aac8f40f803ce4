-- DEFER: the message's handler runs past the webhook's budget. Before Twilio is answered, the
-- message becomes the conversation's first inbound message (so that it is handled again if
-- its process dies), the lock is leased for LOCK_TTL (RENEW extends it while the handler runs)
-- and the conversation joins its tag's pending set, where the sweeper finds it once the lease
-- lapses; a waiter in line is woken to join the inbound messages. The messages the handler sent
-- so far (conversation.send) are queued with it (outbound.lua), as INTERIM queues those it
-- sends later, unless `forget` is removing the sender's data.
--
-- uses: common.lua tail.lua reply.lua line.lua outbound.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the message's token (OPEN's ARGV[9])
-- ARGV[10] = its MessageSid
-- ARGV[11] = the conversation's index member, '<from>|<to>'
-- ARGV[12] = the message's fields as JSON
-- ARGV[13] = the messages the handler sent so far (outbound.lua's payload), or ''
-- Returns 'deferred', or 'lost' (the lock is not the message's: nothing written).
local token, message_sid, member, entry, sends = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then return 'lost' end
local now = now_ms()
redis.call('RPUSH', inbound, message_sid .. ' ' .. entry)
redis.call('PEXPIRE', inbound, live_keep_ms)
redis.call('PEXPIRE', lock, lock_ms)
redis.call('ZADD', pending, now + lock_ms, member)
redis.call('PEXPIRE', pending, live_keep_ms)
if sends ~= '' and redis.call('EXISTS', forgetting) == 0 then queue_outbound(member, sends, now) end
if holder ~= token then handover().wake_first(now) end
return 'deferred'
