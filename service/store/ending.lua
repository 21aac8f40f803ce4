-- Ending a conversation: every way of ending (SAVE's 'handler' and 'opt-out', OPEN's and the
-- sweeper's 'expired', an operator's 'operator') goes through `ends().finish`.
--
-- Made on first use: `ends()` makes these helpers the first time a script's run calls it. A
-- `local function` is a closure made on every run of a script, used or not, and most runs end
-- nothing (line.lua's `handover()` is made the same way, for the same reason).

local made_ends
local function ends()
  if made_ends then return made_ends end
  local REASONS = {expired = 'e', operator = 'o', ['opt-out'] = 'x', handler = 'h'}  -- tally codes

  -- The conversation's own fields go; the answers kept for redeliveries ('m:…') stay, and the
  -- hash with them expires within REDELIVERY_WINDOW: nothing else of it is kept.
  local function clear_fields()
    local doomed = {}
    for _, name in ipairs(redis.call('HKEYS', conversation)) do
      if string.sub(name, 1, 2) ~= 'm:' then doomed[#doomed + 1] = name end
    end
    delete(conversation, doomed)
    redis.call('PEXPIRE', conversation, window_ms)
  end

  -- Ends the conversation `member` stored in KEYS[1], if there is one, as `reason` at
  -- `ended_at` (ms; `now`: Redis' clock): its 'ended' event, its tallies and, with the end hook,
  -- its payload in KEYS[8], in the same atomic step as its fields and index entry going.
  -- Returns 1 if it ended one, else 0.
  --
  -- The 'ended' event's fields: type, from, to, reason, messages, started_at, ended_at,
  -- conversation (service/lifecycle.py: Event). The end hook's payload, a JSON map: from, to,
  -- reason, messages, started_at, ended_at, state, timers (the ones pending, as stored)
  -- (service/history.py: Ending.decode).
  local function finish(member, reason, ended_at, now)
    local found = redis.call('HMGET', conversation, 'sid', 'seq', 'first_seen', 'state', 'timers')
    local scheduled = tonumber(redis.call('ZSCORE', index, member))
    if scheduled and scheduled > ended_at then transcript_ends(scheduled, ended_at) end
    redis.call('ZREM', index, member)
    redis.call('ZREM', waiting, member)
    redis.call('ZREM', due_timers, member)  -- its timers go with it (the 'timers' field: below)
    if not found[1] then
      clear_fields()
      return 0
    end
    local sender, recipient = pair(member)
    local messages, started_at = found[2] or '0', found[3] or '0'
    local shown_from, shown_to = event_pair(member)
    redis.call('XADD', events, 'MAXLEN', '~', events_max, '*', 'type', 'ended', 'from', shown_from,
               'to', shown_to, 'reason', reason, 'messages', messages, 'started_at', started_at,
               'ended_at', ended_at, 'conversation', found[1])
    local minute, code = math.floor(now / 60000), REASONS[reason]
    local first = count(minute, code, 1)
    first = count(minute, 'd', math.max(ended_at - (tonumber(started_at) or ended_at), 0)) or first
    if count(minute, 'n', tonumber(messages) or 0) or first then renew(minute) end
    if hooks == '1' then
      redis.call('HSET', ending, found[1], cjson.encode({
        from = sender, to = recipient, reason = reason, messages = messages, started_at = started_at,
        ended_at = tostring(ended_at), state = found[4] or '{}', timers = found[5] or '{}'}))
      -- Kept as long as the conversation would have been: gone a day after the last end if no
      -- process runs the hook any more (a deployment that dropped it).
      redis.call('PEXPIRE', ending, live_keep_ms)
    end
    clear_fields()
    return 1
  end
  made_ends = {finish = finish}
  return made_ends
end
