-- PUSH: an outbound message sent from outside a webhook (service/sending.py), under the
-- conversation's lock, which OPEN took for it as for a message: it queues the message
-- (outbound.lua) and, when no conversation is live, starts one with the given state and its
-- 'started' event, so that the user's reply continues it. Then it releases the lock, or hands
-- it to the first in line (line.lua). The rules come first: a number that opted out, or free
-- text to a WhatsApp number outside its 24-hour window, is refused and nothing is written.
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua reply.lua line.lua outbound.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the lock's token (OPEN's ARGV[9])
-- ARGV[10] = the conversation's index member, '<from>|<to>'
-- ARGV[11] = '1' to start a conversation (OPEN found none live), else '0'
-- ARGV[12] = the new conversation's id (its 'sid'), with ARGV[11] = '1'
-- ARGV[13] = its state, JSON, with ARGV[11] = '1'
-- ARGV[14] = the message to queue (outbound.lua's payload)
-- ARGV[15] = '1' if it is a template (ContentSid), else '0'
-- ARGV[#ARGV - 1] = the message's transcript entry, without its time, or '' (transcript.lua)
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns {'queued'}; {'refused', code} (21610 opted out, 63016 outside WhatsApp's window:
-- the lock released, nothing written); {'lost'} when the lock is no longer the caller's.
local token, member, starts, sid, state, payload, template =
  ARGV[9], ARGV[10], ARGV[11] == '1', ARGV[12], ARGV[13], ARGV[14], ARGV[15] == '1'
local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then return {'lost'} end
local now = now_ms()

local function let_go()
  if holder == token then
    redis.call('DEL', lock)
  else  -- marked: someone waits
    handover().hand_lock()
  end
end

-- While `forget` removes the number's data nothing of it is written (sending it is refused).
if redis.call('EXISTS', forgetting) == 1 then
  let_go()
  return {'lost'}
end

local sender = pair(member)
local refused
if redis.call('HEXISTS', contacts, sender) == 1 then
  refused = 21610
elseif not template and string.sub(member, 1, 9) == 'whatsapp:' then
  local last = tonumber(redis.call('HGET', contacts, 'w:' .. member))
  if not last or now - last > WHATSAPP_WINDOW_MS then refused = 63016 end
end
if refused then
  let_go()
  return {'refused', refused}
end

if starts then
  local minute = math.floor(now / 60000)
  if count(minute, 's', 1) then renew(minute) end
  -- What an ended conversation left (its kept answers' 'm:' fields stay for redeliveries).
  local doomed = {}
  for _, name in ipairs(redis.call('HKEYS', conversation)) do
    if string.sub(name, 1, 2) ~= 'm:' then doomed[#doomed + 1] = name end
  end
  delete(conversation, doomed)
  local shown_from, shown_to = event_pair(member)
  redis.call('XADD', events, 'MAXLEN', '~', events_max, '*', 'type', 'started', 'from', shown_from,
             'to', shown_to, 'messages', '0', 'started_at', now, 'conversation', sid)
  redis.call('HSET', conversation, 'sid', sid, 'state', state, 'seq', '0', 'first_seen', now)
  redis.call('ZADD', index, now + ttl_ms, member)
  redis.call('PEXPIRE', index, live_keep_ms)
  redis.call('PEXPIRE', conversation, live_keep_ms)
else
  -- The reply it asks for has the conversation's TTL (its own, if a handler set one); neither
  -- its end nor its hash's life is brought forward (an operator's hold may run past them).
  local life_ms, keep_ms = own_ttl(redis.call('HGET', conversation, 'ttl'))
  redis.call('ZADD', index, 'GT', now + life_ms, member)
  redis.call('PEXPIRE', conversation, math.max(keep_ms, redis.call('PTTL', conversation)))
end
queue_outbound(member, payload, now)
if string.sub(member, 1, 9) == 'whatsapp:' then prune_windows(now) end
transcribe(ARGV[#ARGV - 1], now, starts, tonumber(redis.call('ZSCORE', index, member)) - now, true)
let_go()
return {'queued'}
