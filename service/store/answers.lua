-- The answers kept for redeliveries: field 'm:<MessageSid>' = "<ms> <answer>" of the
-- conversation's hash, one per message answered within REDELIVERY_WINDOW, at most REPLIES_KEPT.

-- Forgets the answers older than `horizon` (ms), and the oldest beyond `limit` (and, with
-- `with_fields`, the conversation's own fields too, in the same read: a conversation starts
-- afresh); returns the oldest kept answer's time (its text, or false) and how many are kept.
local function forget_answers(horizon, limit, with_fields)
  local fields = redis.call('HGETALL', conversation)
  local answers, doomed = {}, {}
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'm:' then
      local stamp = string.match(fields[i + 1], '^(%d+) ')
      local at = tonumber(stamp)
      if at == nil or at <= horizon then
        doomed[#doomed + 1] = fields[i]
      else
        answers[#answers + 1] = {at, fields[i], stamp}
      end
    elseif with_fields then
      doomed[#doomed + 1] = fields[i]
    end
  end
  table.sort(answers, function(a, b) return a[1] > b[1] end)
  for i = limit + 1, #answers do doomed[#doomed + 1] = answers[i][2] end
  delete(conversation, doomed)
  local kept = math.min(#answers, limit)
  return kept > 0 and answers[kept][3], kept
end
