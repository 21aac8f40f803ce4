-- The line of messages waiting for a conversation's lock (a ticket lock): KEYS[3] holds their
-- tokens by ticket, KEYS[4] each one's heartbeat. A token is '<MessageSid>;<16 hex digits>'.
-- (Needs common.lua and reply.lua before it.)

-- The first in line whose heartbeat is still on (the others gave up: they leave it).
local function head_of(token, now)
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  while head and head ~= token and (tonumber(redis.call('HGET', waiters, head)) or 0) <= now do
    redis.call('ZREM', queue, head)
    redis.call('HDEL', waiters, head)
    head = redis.call('ZRANGE', queue, 0, 0)[1]
  end
  return head
end

-- The hand-over, made on first use (as ending.lua's `ends()`): a release's and a save's, only
-- when someone waits.
local made_handover
local function handover()
  if made_handover then return made_handover end
  -- Pushes `turn` to the wake-up list of the waiter `head` (its BLPOP returns it): '1' to ask
  -- again, or OPEN's reply as JSON (reply.lua) when the lock is handed to it.
  local function wake_up(head, turn)
    redis.call('RPUSH', wake .. head, turn)
    redis.call('PEXPIRE', wake .. head, patience_ms + lock_ms)
  end

  -- A release's hand-over: the first in line is woken to ask again.
  local function wake_first(now)
    local head = head_of(nil, now)
    if head then wake_up(head, '1') end
  end

  -- A save's hand-over: the lock goes straight to the first in line with what its OPEN would
  -- have returned, so that it starts without asking again: the conversation as this save left
  -- it, or the stored answer if its MessageSid (its token's first part) was answered while it
  -- waited, a redelivery behind the original (then the next in line gets the turn). No one in
  -- line: the lock is freed.
  local function hand_lock()
    local now = now_ms()
    local head = head_of(nil, now)
    while head do
      local message_sid = string.match(head, '^(.*);%x+$')
      if not message_sid then
        -- A waiter of a version before service/store/ ('<MessageSid>:<hex>', or bare hex
        -- before commit fef70c2) reads no list of names: it is woken to ask again, as a
        -- release wakes it. This branch can go once no such version runs.
        redis.call('DEL', lock)
        return wake_up(head, '1')
      end
      redis.call('ZREM', queue, head)
      redis.call('HDEL', waiters, head)
      local found = redis.call('HMGET', conversation, 'm:' .. message_sid, 'sid', 'state', 'seq',
                               'first_seen', 'last_seen', 'paused', 'timers', 'ttl')
      if found[1] then
        wake_up(head, cjson.encode(reply_answered(found[1], found[2])))
        head = head_of(nil, now)
      else
        local behind = redis.call('ZCARD', queue) > 0
        redis.call('SET', lock, behind and head .. '+' or head, 'PX', lock_ms)
        return wake_up(head, cjson.encode(reply_opened(now, found, 0, 7)))
      end
    end
    redis.call('DEL', lock)
  end
  made_handover = {wake_first = wake_first, hand_lock = hand_lock}
  return made_handover
end
