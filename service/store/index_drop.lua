-- INDEX_DROP (the operators' view): drops the index entry of a conversation whose hash is
-- gone, unless it came back meanwhile.
--
-- KEYS[1] = sms:conv:{NN}:<from>|<to>  the conversation's hash
-- KEYS[2] = sms:active:{NN}            its index shard (the same hash tag)
-- ARGV[1] = its index member, '<from>|<to>'
-- Returns 1 if it dropped the entry, else 0.
local conversation, index = KEYS[1], KEYS[2]
local member = ARGV[1]
if redis.call('EXISTS', conversation) == 1 then return 0 end
return redis.call('ZREM', index, member)
