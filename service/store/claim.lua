-- CLAIM (the sender): takes the conversation's next outbound message, if it is due, for one
-- attempt: the due index holds the conversation until the claim's lease ends, so that no other
-- sender takes it meanwhile (a sender that dies holding it is replaced once the lease ends).
--
-- uses: common.lua outbound.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the conversation's index member, '<from>|<to>'
-- ARGV[10] = the claim's token (FINISH names it)
-- ARGV[11] = the claim's lease in ms
-- Returns false when nothing is due, else a flat list of names and values: id, message (its
-- JSON as queued), state (its JSON, this attempt's), opted_out (ms, or ''), last_inbound (ms of
-- the pair's last WhatsApp message, or '').
-- A message claimed before and never finished (its sender died, or its lease ran out) may have
-- reached Twilio: its state says maybe_accepted, so that the sender looks it up first.
local member, claim, lease_ms = ARGV[9], ARGV[10], ARGV[11]
local now = now_ms()
local at = tonumber(redis.call('ZSCORE', due, member))
if not at or at > now then return false end
local id = redis.call('LINDEX', outbound, 0)
local found = id and redis.call('HMGET', sent, id, id .. ':s')
if not id or not found[1] then  -- an empty outbox, or a record gone by hand: skipped
  if id then redis.call('LPOP', outbound) end
  if redis.call('LLEN', outbound) == 0 then redis.call('ZREM', due, member) end
  return false
end
local state = cjson.decode(found[2] or '{}')
if state.stage == 'claimed' then state.maybe_accepted = true end
state.stage, state.claim, state.updated_at = 'claimed', claim, now
state.attempts = (tonumber(state.attempts) or 0) + 1
state.first_attempt_at = state.first_attempt_at or now
local encoded = cjson.encode(state)
redis.call('HSET', sent, id .. ':s', encoded)
redis.call('ZADD', due, now + lease_ms, member)
local sender = pair(member)
return {'id', id, 'message', found[1], 'state', encoded,
        'opted_out', redis.call('HGET', contacts, sender) or '',
        'last_inbound', redis.call('HGET', contacts, 'w:' .. member) or ''}
