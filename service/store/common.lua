-- What every conversation script shares: its keys and the store's settings, each in the one
-- order the store sends them (service/keys.py: ConversationKeys.in_order; service/store/store.py:
-- ConversationStore.settings), and three small helpers.
--
-- KEYS[1] = sms:conv:{NN}:<from>|<to>     hash: the conversation
-- KEYS[2] = sms:lock:{NN}:<from>|<to>     string: the holder's token ('+' after it: waited for)
-- KEYS[3] = sms:queue:{NN}:<from>|<to>    zset: waiting tokens by ticket
-- KEYS[4] = sms:waiters:{NN}:<from>|<to>  hash: waiting token -> ms until which it waits
-- KEYS[5] = sms:wake:{NN}:<from>|<to>:    a waiter's wake-up list is this and its token
-- KEYS[6] = sms:active:{NN}               zset: the index, member '<from>|<to>' -> its end (ms)
-- KEYS[7] = sms:events (a Cluster's: sms:outbox:{NN})  stream: lifecycle events
-- KEYS[8] = sms:ending:{NN}               hash: conversation id -> the end hook's payload
-- KEYS[9] = sms:minutes:{NN}              hash: '<minute><code>' -> that minute's tally
-- KEYS[10] = sms:out:{NN}:<from>|<to>     list: outbound message ids not yet handed to Twilio
-- KEYS[11] = sms:sent:{NN}:<from>|<to>    hash: outbound message id -> its record (outbound.lua)
-- KEYS[12] = sms:due:{NN}                 zset: '<from>|<to>' -> when its next outbound is due
-- KEYS[13] = sms:contacts:{NN}            hash: opt-outs and WhatsApp windows (outbound.lua)
-- KEYS[14] = sms:timers:{NN}              zset: the due index, '<from>|<to>' -> earliest due (ms)
-- KEYS[15] = sms:pending:{NN}             zset: conversations with inbound messages -> the ms
--                                          by which their lock must be renewed
-- KEYS[16] = sms:inbound:{NN}:<from>|<to> list: messages acknowledged, not yet handled, each
--                                          '<MessageSid> <fields as JSON>' (the first runs)
-- ARGV[1] = LOCK_TTL in ms                ARGV[5] = REPLIES_KEPT
-- ARGV[2] = a waiter's patience in ms     ARGV[6] = how long a live conversation's hash is
-- ARGV[3] = CONVERSATION_TTL in ms                  kept: the TTL and a day's grace, in ms
-- ARGV[4] = REDELIVERY_WINDOW in ms       ARGV[7] = EVENTS_MAX
--                                         ARGV[8] = '1' to keep ended conversations for the end
--                                                   hook, else '0'
-- ARGV[9…] = the script's own.
local conversation, lock, queue, waiters, wake, index, events, ending, minutes = unpack(KEYS, 1, 9)
local outbound, sent, due, contacts, due_timers, pending, inbound = unpack(KEYS, 10, 16)
-- The settings stay the strings Redis passes: a command takes them as they are, arithmetic
-- converts a numeral by itself, and only a comparison needs tonumber (each conversion costs,
-- so none is made on a path that does not need it).
local lock_ms, patience_ms, ttl_ms, window_ms, replies_kept, live_keep_ms, events_max, hooks =
  unpack(ARGV, 1, 8)

-- The conversation's own time to live (`own`, ms, the hash's 'ttl'; '' or
-- false for CONVERSATION_TTL): the TTL and the
-- hash's physical life (the TTL and a day's grace) that its save uses.
local function own_ttl(own)
  if not own or own == '' then return ttl_ms, live_keep_ms end
  return own, own + (live_keep_ms - ttl_ms)
end

-- Redis' clock in epoch ms: expiries and windows never depend on the app hosts' clocks.
local function now_ms()
  local clock = redis.call('TIME')
  return clock[1] * 1000 + math.floor(clock[2] / 1000)
end

-- Deletes the fields `names` of the hash `key`: one HDEL per thousand, not one per field.
local function delete(key, names)
  for i = 1, #names, 1000 do
    redis.call('HDEL', key, unpack(names, i, math.min(i + 999, #names)))
  end
end

-- '<from>|<to>' -> from, to.
local function pair(member)
  local bar = string.find(member, '|', 1, true)
  return string.sub(member, 1, bar - 1), string.sub(member, bar + 1)
end
