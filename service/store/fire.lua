-- FIRE: a due timer's effect, once the sweeper holds the conversation's lock (its OPEN, with a
-- 'timer;<16 hex digits>' token): the handler's state, the conversation's timers without the
-- fired one (and with those the handler set), its end if the handler ended it, the messages it
-- sent and its reply queued for the outbound sender (outbound.lua); then the lock
-- released or handed over, as a message's SAVE does. The fired timer leaves in the same atomic
-- step as its effect is written, so a timer whose firing crashed before this fires again, and
-- one fired here never does: its id is the fence. A timer firing is no message: the
-- conversation's count, last message and answers stay; its time to live starts again.
--
-- uses: common.lua tail.lua names.lua transcript.lua tally.lua ending.lua reply.lua line.lua outbound.lua timers.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the sweeper's token (its OPEN's ARGV[9])
-- ARGV[10] = the conversation's index member, '<from>|<to>'
-- ARGV[11] = the fired timer's name, or '' when nothing is due after all (then only ARGV[14]
--            and ARGV[15] are stored: the due index set right, and the lock released)
-- ARGV[12] = the fired timer's id
-- ARGV[13] = the conversation's state, JSON
-- ARGV[14] = its pending timers' JSON ('{}': none) and ARGV[15] their earliest due (ms),
--            timers.lua's keep_timers
-- ARGV[16] = its own TTL in ms, or ''
-- ARGV[17] = 'handler' if the handler ended the conversation, else ''
-- ARGV[18] = the firing's time: OPEN's `now`, handed back
-- ARGV[19] = outbound messages to queue with it (outbound.lua's `queue_outbound`), or ''
-- ARGV[#ARGV - 1] = their transcript entries, or '' (transcript.lua; only with ARGV[19])
-- ARGV[#ARGV] = the numbers its events carry (names.lua)
-- Returns 'fired', 'ended' (the handler ended it), 'kept' (nothing fired) or 'lost' (the lock is
-- not the sweeper's, or the timer is no longer there: nothing written).
local token, member, name, id = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local state, value, earliest, own, end_reason, now = ARGV[13], ARGV[14], ARGV[15], ARGV[16], ARGV[17],
  tonumber(ARGV[18])
local sends = ARGV[19] or ''

local holder = redis.call('GET', lock)
if holder ~= token and holder ~= token .. '+' then return 'lost' end

local function let_go()
  if holder == token then
    redis.call('DEL', lock)
  else  -- marked: a message waits
    handover().hand_lock()
  end
end

if name == '' then
  keep_timers(member, value, earliest)
  let_go()
  return 'kept'
end
-- The timer's id (12 hex digits, unique to it) in the stored timers, by a plain search rather
-- than decoding them all.
local stored = redis.call('HGET', conversation, 'timers')
if not stored or not string.find(stored, '"id":"' .. id .. '"', 1, true) then  -- cannot happen
  -- under the lock: refused anyway
  let_go()
  return 'lost'
end
local life_ms, keep_ms = own_ttl(own)
if own ~= '' then
  redis.call('HSET', conversation, 'state', state, 'ttl', own)
else
  redis.call('HSET', conversation, 'state', state)
end
keep_timers(member, value, earliest)
redis.call('ZADD', index, now + life_ms, member)
redis.call('PEXPIRE', index, math.max(keep_ms, redis.call('PTTL', index)))  -- never shortened
transcribe(ARGV[#ARGV - 1] or '', now, false, life_ms)  -- before an end, which moves its expiry
local ended = 0
if end_reason ~= '' then
  ended = ends().finish(member, end_reason, now, now)
end
redis.call('PEXPIRE', conversation, end_reason ~= '' and window_ms or keep_ms)
if sends ~= '' then queue_outbound(member, sends, now) end
let_go()
return ended == 1 and 'ended' or 'fired'
