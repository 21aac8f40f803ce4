-- Timers (service/timers.py): a conversation's pending timers are its hash's field 'timers',
-- JSON (name -> {id, due, data, reply}) as service/timers.py encodes it, and its entry in the
-- tag's due index (KEYS[14]) is scored by the earliest due (ms, Redis' clock). Python computes
-- both under the conversation's lock; a script only stores them. (Needs common.lua before it.)

-- Stores the timers' JSON `value` ('{}': none left) and its earliest due `earliest` (ms) for
-- the conversation `member`; '' leaves them as they are. The due index has no expiry: an entry
-- goes with its conversation's end (ending.lua), and one left behind (its hash deleted by
-- hand) is dropped by the sweeper once due (fire.lua).
local function keep_timers(member, value, earliest)
  if value == '' then return end
  if value == '{}' then
    redis.call('HDEL', conversation, 'timers')
    redis.call('ZREM', due_timers, member)
    return
  end
  redis.call('HSET', conversation, 'timers', value)
  redis.call('ZADD', due_timers, earliest, member)
end
