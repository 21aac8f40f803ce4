-- INTERIM: outbound messages a handler sends while it runs past the webhook (its message among
-- the inbound messages): queued at once behind the conversation's earlier ones (outbound.lua),
-- only while the lock is still the run's, so that a run whose lock lapsed (its process stalled,
-- or another run took the message) sends nothing. The lock is left as it is.
--
-- uses: common.lua tail.lua outbound.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the run's token
-- ARGV[10] = the conversation's index member, '<from>|<to>'
-- ARGV[11] = the messages to queue (outbound.lua's payload)
-- Returns how many it queued, or 'lost' (the lock is not the run's, or `forget` is removing the
-- sender's data: nothing written).
local token, member, payload = ARGV[9], ARGV[10], ARGV[11]
local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then return 'lost' end
if redis.call('EXISTS', forgetting) == 1 then return 'lost' end
return queue_outbound(member, payload, now_ms())
