-- Human handoff: a conversation waits for a person when its handler asks (`conversation.handoff`),
-- and an operator holds it (the bot paused) from "Take over" until "Hand back" or the hold's end.
-- The conversation's hash holds 'paused' = the hold's end (ms) and 'wants' = '<ms> <reason>' while
-- it waits; `waiting` (tail.lua) lists the tag's waiting ones by when they asked.

-- SAVE's part: the handler asked for a person (`reason`, '' when not) with this message at `now`.
-- A conversation already waiting keeps its first time; one an operator holds is not flagged.
local function asks_for_person(reason, member, now)
  if reason == '' then return end
  local paused = tonumber(redis.call('HGET', conversation, 'paused'))
  if paused and paused > now then return end
  if redis.call('ZADD', waiting, 'NX', now, member) == 1 then
    redis.call('HSET', conversation, 'wants', now .. ' ' .. reason)
  end
  redis.call('PEXPIRE', waiting, live_keep_ms)
end
