-- FINISH (the sender): records an attempt's outcome on the message its claim took, if the claim
-- is still the sender's. Handed to Twilio or refused for good, the message leaves the outbox and
-- the conversation's next one is due now; to retry, it stays first and is due after the delay.
-- Twilio's 21610 (the number opted out) is noted as an opt-out (KEYS[13]), as an inbound STOP is.
--
-- uses: common.lua tail.lua transcript.lua outbound.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the conversation's index member, '<from>|<to>'
-- ARGV[10] = the message's id
-- ARGV[11] = the claim's token (CLAIM's ARGV[10])
-- ARGV[12] = the outcome: 'accepted', 'retry' or 'failed'
-- ARGV[13] = accepted: Twilio's SID; retry: why; failed: Twilio's error code (or '')
-- ARGV[14] = accepted: Twilio's status; retry: '1' if Twilio may hold it (a lost answer), else
--            '0'; failed: the error's message
-- ARGV[15] = retry: ms to wait before the next attempt
-- ARGV[#ARGV] = TRANSCRIPT_MAX, or '' when transcripts are off (transcript.lua), after the above
-- A conversation keeps the records of its latest 100 messages that left the outbox
-- (outbound.lua's `forget_records`).
-- Returns the message's status before this outcome and after it ('lost' and '' when the claim
-- is no longer the sender's: nothing written).
local member, id, claim, outcome, first, second, delay =
  ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local raw = redis.call('HGET', sent, id .. ':s')
if not raw then return {'lost', ''} end
local state = cjson.decode(raw)
if state.claim ~= claim or redis.call('LINDEX', outbound, 0) ~= id then return {'lost', ''} end
local before = state.status or 'pending'
local now = now_ms()
state.claim, state.updated_at = nil, now
if outcome == 'retry' then
  state.stage, state.reason, state.next_at = 'retrying', first, now + tonumber(delay)
  if second == '1' then state.maybe_accepted = true end
  redis.call('ZADD', due, state.next_at, member)
else
  if outcome == 'accepted' then
    state.stage, state.sid = 'handed', first
    if moves_up(state.status, second) then state.status = second end
  else
    state.stage, state.status, state.error_code, state.error_message = 'failed', 'failed', first, second
    if first == '21610' then  -- Twilio knows of an opt-out this service missed: kept as its own
      local number = pair(member)
      if redis.call('HEXISTS', contacts, number) == 0 then redis.call('HSET', contacts, number, now) end
    end
  end
  state.maybe_accepted, state.next_at, state.reason = nil, nil, nil
  redis.call('LPOP', outbound)
  -- Two fields a record; the queued ones' records are not counted.
  if redis.call('HLEN', sent) - 2 * redis.call('LLEN', outbound) > 4 * RECORDS_KEPT then forget_records() end
  if redis.call('LLEN', outbound) > 0 then
    redis.call('ZADD', due, now, member)
  else
    redis.call('ZREM', due, member)
  end
end
redis.call('HSET', sent, id .. ':s', cjson.encode(state))
keep_sent()
if (state.status or 'pending') ~= before then transcribe_status(id, state.status, now) end
return {before, state.status or 'pending'}
