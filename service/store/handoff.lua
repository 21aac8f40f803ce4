-- HANDOFF: an operator takes over a live conversation (the bot paused until the hold ends), or
-- hands it back (the bot resumes, with the state the operator set).
--
-- uses: common.lua tail.lua transcript.lua
-- KEYS[1..], ARGV[1..8]: the conversation's keys and the store's settings (common.lua, tail.lua)
-- ARGV[9]  = the conversation's index member, '<from>|<to>'
-- ARGV[10] = 'take' or 'back'
-- ARGV[11] = take: how long the hold lasts (ms); back: the state the operator saw, or '' to
--            leave the state as it is
-- ARGV[12] = back: the state to resume with (JSON)
-- Returns take: {1, how long the handler's ask for a person had waited, in ms, or -1 without
-- one}; back: {1}; either:
-- {0} when it is not live, back: {-1} while a message holds its lock (ask again), {-2} when
-- its state changed since the operator read it.
local member, action = ARGV[9], ARGV[10]
local now = now_ms()
local expiry = tonumber(redis.call('ZSCORE', index, member))
if not expiry or expiry <= now or redis.call('EXISTS', conversation) == 0 then return {0} end
-- Its time to live: its own, if a handler set one (common.lua).
local life_ms, keep_ms = own_ttl(redis.call('HGET', conversation, 'ttl'))
if action == 'take' then
  local hold_ends = now + tonumber(ARGV[11])
  local wants = redis.call('HGET', conversation, 'wants')
  redis.call('HSET', conversation, 'paused', hold_ends)
  redis.call('HDEL', conversation, 'wants')
  redis.call('ZREM', waiting, member)
  -- Its time runs from the hold's end (the hash is kept a day's grace after, as a save keeps it).
  local ends = math.max(expiry, hold_ends + life_ms)
  redis.call('ZADD', index, ends, member)
  transcript_ends(expiry, ends)
  redis.call('PEXPIRE', conversation, ends - now - life_ms + keep_ms)
  local asked = wants and tonumber(string.match(wants, '^(%d+)'))
  return {1, asked and now - asked or -1}
end
if redis.call('EXISTS', lock) == 1 then return {-1} end
if ARGV[11] ~= '' then
  if redis.call('HGET', conversation, 'state') ~= ARGV[11] then return {-2} end
  redis.call('HSET', conversation, 'state', ARGV[12])
end
redis.call('HDEL', conversation, 'paused')
redis.call('ZADD', index, now + life_ms, member)
transcript_ends(expiry, now + life_ms)
redis.call('PEXPIRE', conversation, keep_ms)
return {1}
