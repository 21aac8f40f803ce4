#!/bin/sh
# Sentinel's client-reconfig-script: after a failover, demote the old master at once.
#
# Sentinel itself demotes it only about ten seconds after the switch. With
# min-replicas-to-write set (see docs/deploying.md, "Topologies"), the new master refuses writes until it
# has a replica again, so every second the old master waits is a second of 503s.
# Sentinel calls: <master-name> <role> <state> <from-ip> <from-port> <to-ip> <to-port>
# (role is "leader" on the Sentinel that ran the failover). A master that is really down
# cannot be reached: the command fails harmlessly and Sentinel demotes it when it returns.
[ "$2" = "leader" ] || exit 0
exec redis-cli -h "$4" -p "$5" REPLICAOF "$6" "$7" >/dev/null 2>&1
