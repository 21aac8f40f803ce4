-- Outbound messages of a conversation (service/outbound.py): its outbox KEYS[10] (ids in commit
-- order, the first one the next to hand to Twilio), their records in KEYS[11], the tag's due
-- index KEYS[12], and the tag's contacts KEYS[13] (opt-outs, WhatsApp windows).
--
-- A record is two fields of KEYS[11]: '<id>' = the message as queued (JSON written by Python,
-- never rewritten here), and '<id>:s' = its state, a JSON object of scalars only (cjson would
-- write an empty list back as {}): status, stage, attempts, sid, error_code, error_message,
-- first_attempt_at, next_at, claim, maybe_accepted, updated_at, queued_at, n. KEYS[13]:
-- '<number>' = ms it opted out (STOP; START removes it), 'w:<from>|<to>' = its last inbound
-- message's ms (WhatsApp senders only: the 24-hour window), and 'w:' = where `prune_windows`
-- left off. KEYS[13] never expires: an opt-out holds until its START. A window's field goes
-- once its 24 hours have passed (`prune_windows`, as the tag's WhatsApp messages come in and go
-- out): it says when a number last wrote, which is kept no longer than the rule needs it.

-- Twilio's statuses ranked: a callback or an answer only moves a message up. Terminal ones
-- (10 and up) win over anything but a later terminal of a higher rank ('read' after
-- 'delivered', WhatsApp's).
local STATUS_RANK = {pending = 0, accepted = 1, scheduled = 1, queued = 2, sending = 3, sent = 4,
                     partially_delivered = 5, delivered = 10, undelivered = 10, failed = 10,
                     canceled = 10, read = 11}

-- Whether `status` may replace `current` on a record (an unknown status never does).
local function moves_up(current, status)
  local to = STATUS_RANK[status]
  return to ~= nil and to > (STATUS_RANK[current or 'pending'] or 0)
end

-- A conversation keeps the records of this many of its messages that left the outbox (handed
-- to Twilio or failed), its latest; the older ones go once twice as many are kept, so that the
-- cost of forgetting is spread over many messages.
local RECORDS_KEPT = 100

-- Forgets the records of the conversation's oldest messages that left its outbox (by their
-- state's updated_at), but its latest RECORDS_KEPT; queued ones stay.
local function forget_records()
  local queued = {}
  for _, id in ipairs(redis.call('LRANGE', outbound, 0, -1)) do queued[id] = true end
  local fields, left = redis.call('HGETALL', sent), {}
  for i = 1, #fields, 2 do
    local id = string.match(fields[i], '^(.*):s$')
    if id and not queued[id] then
      local read, state = pcall(cjson.decode, fields[i + 1])
      left[#left + 1] = {read and tonumber(state.updated_at) or 0, id}
    end
  end
  table.sort(left, function(a, b) return a[1] > b[1] end)
  local doomed = {}
  for i = RECORDS_KEPT + 1, #left do
    doomed[#doomed + 1] = left[i][2]
    doomed[#doomed + 1] = left[i][2] .. ':s'
  end
  delete(sent, doomed)
end

-- The records' life: a day past the conversation's end, and at least as long as the
-- conversation's hash (a longer TTL of its own: common.lua's own_ttl), never shortened.
local function keep_sent()
  redis.call('PEXPIRE', sent, math.max(live_keep_ms, redis.call('PTTL', conversation), redis.call('PTTL', sent)))
end

-- Queues the messages of `payload` (a JSON list: id, message JSON, id, message JSON, …) behind
-- the conversation `member`'s earlier ones; `now`: Redis' clock (ms). The conversation becomes
-- due now unless it is already due (or claimed, or waiting for a retry: its order holds).
local function queue_outbound(member, payload, now)
  local items = cjson.decode(payload)
  for i = 1, #items, 2 do
    -- queued_at and n (its place in this save) order the conversation's records for operators.
    local state = cjson.encode({status = 'pending', stage = 'queued', attempts = 0, updated_at = now,
                                queued_at = now, n = (i + 1) / 2})
    redis.call('HSET', sent, items[i], items[i + 1], items[i] .. ':s', state)
    redis.call('RPUSH', outbound, items[i])
  end
  redis.call('ZADD', due, 'NX', now, member)
  keep_sent()
  return #items / 2
end

-- WhatsApp's customer service window: free text may go this long after the number's last
-- inbound message.
local WHATSAPP_WINDOW_MS = 86400000
-- Contacts' fields one `prune_windows` examines (HSCAN's COUNT): each WhatsApp message costs a
-- small step, and the steps go round the whole hash faster than new numbers are added to it.
local PRUNE_STEP = 20

-- Forgets the WhatsApp windows of the tag that closed more than 24 hours ago (Redis 6.2 and
-- 7.0 have no per-field expiry): one HSCAN step over the contacts' 'w:*' fields from where the
-- previous step left off (its cursor in the field 'w:'); opt-outs are never touched.
local function prune_windows(now)
  local step = redis.call('HSCAN', contacts, redis.call('HGET', contacts, 'w:') or '0',
                          'MATCH', 'w:*', 'COUNT', PRUNE_STEP)
  local found, closed = step[2], {}
  for i = 1, #found, 2 do
    if found[i] ~= 'w:' and now - (tonumber(found[i + 1]) or 0) > WHATSAPP_WINDOW_MS then
      closed[#closed + 1] = found[i]
    end
  end
  delete(contacts, closed)
  if step[1] == '0' then
    redis.call('HDEL', contacts, 'w:')
  else
    redis.call('HSET', contacts, 'w:', step[1])
  end
end

-- What an inbound message tells the outbound rules: `kind` 'STOP' opts its sender out, 'START'
-- back in; a WhatsApp sender's message opens its 24-hour window.
local function note_inbound(member, kind, now)
  if kind == '' and string.sub(member, 1, 9) ~= 'whatsapp:' then return end
  local sender = pair(member)
  if kind == 'STOP' then
    redis.call('HSET', contacts, sender, now)
  elseif kind == 'START' then
    redis.call('HDEL', contacts, sender)
  end
  if string.sub(member, 1, 9) == 'whatsapp:' then
    redis.call('HSET', contacts, 'w:' .. member, now)
    prune_windows(now)
  end
end
