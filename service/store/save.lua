-- SAVE, a message's round trip 2, only while the lock is still the message's: writes the
-- conversation (its 'started' event on its first message), or ends it; remembers the answer
-- under its MessageSid; counts the message in its minute; releases the lock, or hands it with
-- the conversation to the first in line. Nothing here can fail half-way: every value is
-- checked or bounded before the first write.
--
-- uses: common.lua tail.lua names.lua transcript.lua person.lua tally.lua ending.lua answers.lua reply.lua line.lua outbound.lua timers.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua, tail.lua)
-- ARGV[9]  = the message's token (OPEN's ARGV[9])
-- ARGV[10] = its MessageSid
-- ARGV[11] = the conversation's index member, '<from>|<to>'
-- ARGV[12] = the conversation's id (its 'sid')
-- ARGV[13] = its state, JSON
-- ARGV[14] = the answer to remember, as service/responses.py stores it
-- ARGV[15] = '1' if this message starts the conversation (it found none, or none readable)
-- ARGV[16] = why the conversation ends with this message ('handler', 'opt-out'), or ''
-- ARGV[17] = the message's time: OPEN's `now`, handed back
-- ARGV[18] = outbound messages to queue with this save (outbound.lua's `queue_outbound`), or ''
-- ARGV[19] = the message's opt-out keyword for the outbound rules ('STOP', 'START'), or ''
-- ARGV[20..24], sent only when one of them is not its default (most saves send none: then
-- #ARGV is 22, and each is read as its default):
-- ARGV[20] = its pending timers' JSON ('{}': none; '': unchanged) and ARGV[21] their earliest
--            due (ms), timers.lua's keep_timers; ARGV[22] = its own TTL in ms, or ''
-- ARGV[23] = '' for a message answered inline; for one among the inbound messages (its
--            handler ran past the webhook), 16 hex digits: the next inbound message's token is
--            its MessageSid, ';' and these
-- ARGV[24] = '1' to keep the conversation as it is (the handler failed or ran out of time):
--            only the answer is remembered, so that a redelivery does not run it again, and
--            the transcript's entries written; else '0'
-- ARGV[#ARGV - 2] = why the handler asks for a person, or '' (person.lua)
-- ARGV[#ARGV - 1] = the transcript's entries, or '' (transcript.lua)
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Writes, in this order: a stored conversation the caller could not read ended
-- (`ends().finish`); the minute's tallies (KEYS[9]); old answers forgotten (KEYS[1]); the
-- 'started' event (KEYS[7]); the conversation's fields and this answer (KEYS[1]); the index
-- entry and its expiry (KEYS[6]); then, ending it, `ends().finish` (ending.lua); the hash's
-- expiry; the outbound messages (KEYS[10..12]) and the rules' contacts (KEYS[13]); for an
-- inbound message, it taken off KEYS[16] and the lock passed to the next (KEYS[2], KEYS[15]);
-- else the lock (KEYS[2]) released, or handed over (line.lua's `handover().hand_lock`:
-- KEYS[3], KEYS[4], KEYS[5]). docs/design.md tells it step by step.
-- Returns 'saved', 'ended' (it ended the conversation with ARGV[16]'s reason), 'answered' (the
-- lock is not the message's and its answer is stored: saved already, nothing written), or
-- 'lost' (the lock is not the message's and its answer is not stored, or `forget` is removing
-- the sender: nothing written); an error, with nothing written, for an ARGV[16] other than '',
-- 'handler' and 'opt-out'. An inbound message's save takes it off the inbound messages; when more wait,
-- the lock passes to the next one and the reply is OPEN's 'opened' for it (reply.lua) followed
-- by 'token', its token, 'entry', the inbound entry and 'result', 'saved' or 'ended'.
local token, message_sid, member = ARGV[9], ARGV[10], ARGV[11]
local sid, state, answer, is_new, end_reason, opened_at = ARGV[12], ARGV[13], ARGV[14], ARGV[15] == '1',
  ARGV[16], ARGV[17]
local sends, inbound_keyword = ARGV[18], ARGV[19]
local rare = #ARGV > 22 and ARGV or {}  -- ARGV[20..24], or none sent: each its default
local own = rare[22] or ''
local life_ms, keep_ms = own_ttl(own)  -- this conversation's TTL and its hash's life
local next_hex, keeps = rare[23] or '', rare[24] == '1'

-- The lock first: while it is ours this message cannot have been saved (a save releases it), so
-- only a lock not ours needs the answer looked up (an earlier try of this call whose reply was
-- lost saved it already, or a rerun of its handler after this run's lease lapsed).
local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then
  return redis.call('HEXISTS', conversation, 'm:' .. message_sid) == 1 and 'answered' or 'lost'
end
-- While `forget` removes the sender's data (`forgetting`, its fence: tail.lua) nothing of it is
-- saved: the message is answered 503, and Twilio's retry starts afresh once forget is done.
if redis.call('EXISTS', forgetting) == 1 then
  if holder == token then redis.call('DEL', lock) end  -- one waiting behind it polls and takes it
  return 'lost'
end
-- The message's time is OPEN's (Redis' clock when this message took the lock, handed back):
-- no TIME here, and its text is written as it came, never formatted from a number. Messages
-- still get increasing times: the next one's OPEN takes the lock after this save released it.
local now = tonumber(opened_at)
-- Only a message ends a conversation here, and only as one of these: anything else is refused
-- before the first write (the lock stays the message's, for its caller to release).
if end_reason ~= '' and end_reason ~= 'handler' and end_reason ~= 'opt-out' then
  return redis.error_reply('SAVE: unknown end reason')
end

-- An opt-out with no conversation starts none; a failed or timed-out handler changes nothing.
local stores = not keeps and not (is_new and end_reason == 'opt-out')
-- A first message that found a conversation stored (one the caller could not read: a hand
-- edit) ends it first, with its 'ended' event and end hook: as 'operator', whose edit it was,
-- or as this opt-out.
local replaced = 0
if is_new and not keeps and redis.call('HEXISTS', conversation, 'sid') == 1 then
  replaced = ends().finish(member, stores and 'operator' or 'opt-out', now, now)
end
local minute = math.floor(now / 60000)
local first_of_minute = count(minute, 'm', 1)
if is_new and stores and count(minute, 's', 1) then first_of_minute = true end
if first_of_minute then renew(minute) end
local found = is_new and {} or redis.call('HMGET', conversation, 'seq', 'answers', 'last_seen', 'paused')
-- The answers kept for redeliveries: 'answers' = "<oldest one's ms> <how many>", so that they
-- are scanned only when one can be forgotten (out of the window, or over the cap). With one
-- answer kept 'answers' is left out (26 bytes, a size class of the hash): that one is the last
-- message's, at last_seen.
local oldest, held = string.match(found[2] or '', '^(%d+) (%d+)$')
if not found[2] and found[3] then oldest, held = found[3], '1' end
held = tonumber(held)
-- A conversation's first message reads its hash once: the answers to keep, the rest (what an
-- ended or unreadable conversation left) to go.
local starts = is_new and stores
local room = held and held < tonumber(replies_kept)
if starts or not (oldest and room and tonumber(oldest) > now - window_ms) then
  oldest, held = forget_answers(now - window_ms, replies_kept - 1, starts)
end
held = held + 1
local answered = {'m:' .. message_sid, opened_at .. ' ' .. answer}
if held > 1 then
  answered[3], answered[4] = 'answers', oldest .. ' ' .. held
end
local added, hold_left = 0, 0
if stores then
  if is_new then
    local sender, recipient = event_pair(member)
    redis.call('XADD', events, 'MAXLEN', '~', events_max, '*', 'type', 'started', 'from', sender,
               'to', recipient, 'messages', '1', 'started_at', opened_at, 'conversation', sid)
    answered[#answered + 1], answered[#answered + 2] = 'first_seen', opened_at  -- in the one HSET
  end
  if own ~= '' then answered[#answered + 1], answered[#answered + 2] = 'ttl', own end
  redis.call('HSET', conversation, 'sid', sid, 'state', state, 'seq', (tonumber(found[1]) or 0) + 1,
             'last_seen', opened_at, unpack(answered))
  if held == 1 and found[2] then redis.call('HDEL', conversation, 'answers') end
  keep_timers(member, rare[20] or '', rare[21])
  -- Held by an operator (handoff.lua): its time runs from the hold's end.
  hold_left = math.max((tonumber(found[4]) or 0) - now, 0)
  added = redis.call('ZADD', index, now + hold_left + life_ms, member)
  transcribe(ARGV[#ARGV - 1], opened_at, is_new, hold_left + life_ms)
  asks_for_person(ARGV[#ARGV - 2], member, now)
elseif keeps and not is_new then  -- the answers' bookkeeping goes with the answer
  redis.call('HSET', conversation, unpack(answered))
else
  redis.call('HSET', conversation, answered[1], answered[2])
end
-- A failed or timed-out run is written too, its message marked with the outcome: what it sent
-- past the webhook and the timeout's reply went out. Kept to the conversation's end (none
-- stored: from now) plus the retention.
if keeps and ARGV[#ARGV - 1] ~= '' then
  local ends_at = tonumber(redis.call('ZSCORE', index, member)) or now
  transcribe(ARGV[#ARGV - 1], opened_at, is_new, math.max(ends_at - now, 0))
end
-- The index outlives its entries by a day's grace: its expiry moves with a new entry and with
-- the first save of each minute in its tag, so at most a minute behind its latest entry's end,
-- not on every save. Never shortened: a conversation with a longer TTL of its own may be in it.
if added == 1 or first_of_minute then
  redis.call('PEXPIRE', index, math.max(live_keep_ms, keep_ms, redis.call('PTTL', index)))
end
local ended = 0
if end_reason ~= '' then
  ended = ends().finish(member, end_reason, now, now)
end
if not stores then ended = math.max(ended, replaced) end  -- the opt-out ended the stored one
redis.call('PEXPIRE', conversation,
           (end_reason ~= '' or keeps and is_new) and window_ms or keep_ms + hold_left)
if sends ~= '' then queue_outbound(member, sends, now) end
note_inbound(member, inbound_keyword, now)
if next_hex ~= '' then
  local first = redis.call('LINDEX', inbound, 0)
  if first and string.sub(first, 1, #message_sid + 1) == message_sid .. ' ' then
    redis.call('LPOP', inbound)
  end
  local following = redis.call('LINDEX', inbound, 0)
  if following then  -- the lock passes to it, with the conversation as this save left it
    local next_token = string.match(following, '^(%S+) ') .. ';' .. next_hex
    local at = now_ms()
    redis.call('SET', lock, holder == token and next_token or next_token .. '+', 'PX', lock_ms)
    redis.call('ZADD', pending, at + lock_ms, member)
    local found_next = redis.call('HMGET', conversation, 'm:', 'sid', 'state', 'seq', 'first_seen', 'paused',
                                 'timers', 'ttl')
    local turn = reply_opened(at, found_next, 0, 6)
    for _, value in ipairs({'token', next_token, 'entry', following, 'result', ended == 1 and 'ended' or 'saved'}) do
      turn[#turn + 1] = value
    end
    return turn
  end
  redis.call('ZREM', pending, member)
end
if holder == token then
  redis.call('DEL', lock)
else  -- marked: someone waits
  handover().hand_lock()
end
return ended == 1 and 'ended' or 'saved'
