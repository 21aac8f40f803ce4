-- The keys every conversation script is sent after common.lua's nine, counted from the end
-- (service/keys.py: ConversationKeys.in_order), so that keys added before them move nothing:
-- KEYS[#KEYS - 2] = sms:waiting:{NN}                    zset: '<from>|<to>' -> ms since its
--                                                       handler asked for a person (handoff.lua)
-- KEYS[#KEYS - 1] = sms:forgetting:{NN}:<from>          string: the sender's fence while forget
--                                                       runs (save.lua)
-- KEYS[#KEYS]     = sms:transcript:{NN}:<from>|<to>     stream: the transcript (transcript.lua)
local waiting, forgetting, transcript = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
