-- OPEN's reply: a flat list of names and values ('status', …), also what a save's hand-over
-- pushes to a waiter's wake-up list (as JSON); decoded in one place (service/store/store.py:
-- decode_turn).

-- A redelivery: the answer stored for its MessageSid (field 'm:<MessageSid>' = "<ms> <answer>";
-- `stored`), and the conversation's id.
local function reply_answered(stored, sid)
  return {'status', 'answered', 'answer', (string.gsub(stored, '^%d+ ', '', 1)), 'sid', sid or ''}
end

-- The lock is the message's: its time (`now`, ms), the conversation as `found` holds it
-- (HMGET of 'm:…', 'sid', 'state', 'seq', 'first_seen', 'last_seen', and 'paused' at `paused_at`,
-- then 'timers' and 'ttl'), and whether it ended an overdue one (1 or 0). 'paused': until when an
-- operator holds it (person.lua); 'timers', 'ttl': its timers and own TTL (timers.lua), each
-- only when the conversation has it (most have neither: a shorter reply to read).
local function reply_opened(now, found, ended_overdue, paused_at)
  local reply = {'status', 'opened', 'now', now, 'sid', found[2] or '', 'state', found[3] or '',
                 'seq', found[4] or '', 'first_seen', found[5] or '', 'ended_overdue', ended_overdue,
                 'paused', paused_at and found[paused_at] or ''}
  if paused_at and found[paused_at + 1] then
    reply[#reply + 1], reply[#reply + 2] = 'timers', found[paused_at + 1]
  end
  if paused_at and found[paused_at + 2] then
    reply[#reply + 1], reply[#reply + 2] = 'ttl', found[paused_at + 2]
  end
  return reply
end
