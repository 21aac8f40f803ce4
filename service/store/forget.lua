-- FORGET: removes what one hash tag holds of a sender's number, in one atomic step: the keys of
-- its conversations (live and ended: hash, lock, line, wake-ups, transcript) found by the
-- caller, their index, waiting, due, timers' and pending entries, their failed outbound
-- messages' entries and WhatsApp windows, its opt-out if asked, their end hooks' payloads and,
-- on a Cluster, their events still in the tag's outbox. The caller has set the sender's fence
-- (KEYS[1]) first, so that no message of the number saves meanwhile (save.lua), and reads the
-- events stream itself, in batches.
--
-- KEYS[1] = <prefix>forgetting:{NN}:<number>  the fence (only checked to be there)
-- KEYS[2] = <prefix>active:{NN}               the index shard
-- KEYS[3] = <prefix>ending:{NN}               end hooks' payloads
-- KEYS[4] = <prefix>outbox:{NN}               a Cluster's outbox (elsewhere empty)
-- KEYS[5] = <prefix>waiting:{NN}              conversations waiting for a person
-- KEYS[6] = <prefix>due:{NN}                  conversations with outbound messages due
-- KEYS[7] = <prefix>contacts:{NN}             opt-outs ('<number>'), WhatsApp windows ('w:<pair>')
-- KEYS[8] = <prefix>timers:{NN}               conversations with pending timers
-- KEYS[9] = <prefix>pending:{NN}              conversations with inbound messages waiting
-- KEYS[10] = <prefix>failed:{NN}              failed outbound messages ('<id>|<from>|<to>')
-- KEYS[11…] = the number's keys in this tag (<prefix>*:{NN}:<number>|…)
-- ARGV[1] = the number
-- ARGV[2] = its keyed hash, as hashed events carry it, or ''
-- ARGV[3] = '1' to forget its opt-out record too (then it may be sent to again), else '0'
-- ARGV[4…] = its members of the index, the waiting set, the due, timers' and pending indexes
--            ('<number>|<to>')
-- Returns {live conversations ended, keys deleted, end hook payloads deleted, outbox entries
-- deleted}, or an error when the fence is not set.
local number, hashed = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('FORGET without its fence: set ' .. KEYS[1] .. ' first')
end
local live = 0
for i = 4, #ARGV do
  live = live + redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('ZREM', KEYS[6], ARGV[i])
  redis.call('HDEL', KEYS[7], 'w:' .. ARGV[i])
  redis.call('ZREM', KEYS[8], ARGV[i])
  redis.call('ZREM', KEYS[9], ARGV[i])
end
if ARGV[3] == '1' then redis.call('HDEL', KEYS[7], number) end
-- The tag's failed messages are its latest 100 (service/outbound_view.py): read whole, the number's go.
do
  local doomed = {}
  for _, member in ipairs(redis.call('ZRANGE', KEYS[10], 0, -1)) do
    if string.match(member, '^[^|]*|([^|]*)|') == number then doomed[#doomed + 1] = member end
  end
  if #doomed > 0 then redis.call('ZREM', KEYS[10], unpack(doomed)) end
end
local deleted = 0
for i = 11, #KEYS do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
local function names_it(value)
  return value == number or (hashed ~= '' and value == hashed)
end
local hooks = {}
local pending = redis.call('HGETALL', KEYS[3])
for i = 1, #pending, 2 do
  local ok, decoded = pcall(cjson.decode, pending[i + 1])
  if ok and type(decoded) == 'table' and (names_it(decoded['from']) or names_it(decoded[1])) then
    hooks[#hooks + 1] = pending[i]
  end
end
if #hooks > 0 then redis.call('HDEL', KEYS[3], unpack(hooks)) end
local relayed = 0
do
  local doomed = {}
  for _, entry in ipairs(redis.call('XRANGE', KEYS[4], '-', '+')) do
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if (fields[j] == 'from' or fields[j] == 'to') and names_it(fields[j + 1]) then
        doomed[#doomed + 1] = entry[1]
        break
      end
    end
  end
  if #doomed > 0 then relayed = redis.call('XDEL', KEYS[4], unpack(doomed)) end
end
return {live, deleted, #hooks, relayed}
