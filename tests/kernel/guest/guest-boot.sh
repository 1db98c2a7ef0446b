#!/bin/sh
# A kernel-tier guest's setup, run once per boot from the runner's payload
# (mounted read-only at /payload).  The kernel command line says who this
# guest is: imgstorage.name=NODE imgstorage.ip=ADDRESS imgstorage.role=nas|vm.
# Then it becomes the test agent; the runner starts the daemon through it.
set -u
P=/payload
LOG=/var/log/imgstorage-boot.log
mkdir -p /var/log/imgstorage /var/lib/imgstorage
exec >>"$LOG" 2>&1

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^imgstorage\.$1=//p" | tail -n 1; }
NAME=$(arg name)
IP=$(arg ip)
ROLE=$(arg role)
step() { echo "[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { step "FAILED: $*"; echo "failed: $*" >/run/imgstorage-boot.status; }

step "guest $NAME ($ROLE) at $IP"
hostname "$NAME"
echo "$NAME" >/etc/hostname
{ echo "127.0.0.1 localhost"; cat "$P/hosts"; } >/etc/hosts

# Networking by MAC: 52:54:00:00:00:xx is qemu's user network (the broker at
# 10.0.2.2 and the agent's port forward), 52:54:00:00:01:xx the cluster's own
# wire between the guests.  No default route: nothing else is reachable.
ip link set lo up
for dev in /sys/class/net/*; do
    n=$(basename "$dev")
    mac=$(cat "$dev/address")
    case "$mac" in
        52:54:00:00:00:*) ip addr add 10.0.2.15/24 dev "$n"; ip link set "$n" up ;;
        52:54:00:00:01:*) ip addr add "$IP/24" dev "$n"; ip link set "$n" up ;;
    esac
done

# One initiator name per node, fixed, before anything starts iscsid.
echo "InitiatorName=iqn.2005-03.org.open-iscsi:$NAME" >/etc/iscsi/initiatorname.iscsi

step "loading modules"
for m in zfs dm_mod dm_snapshot configfs target_core_mod target_core_iblock iscsi_target_mod \
         iscsi_tcp; do
    modprobe "$m" || fail "modprobe $m"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config

step "creating zpool tank"
zpool create -f -o cachefile=none tank /dev/vdb || fail "zpool create"

step "installing imgstorage"
python3 -m pip install --quiet --no-index --no-deps --break-system-packages \
    --disable-pip-version-check "$P"/wheels/imgstorage-*.whl || fail "pip install"
cp "$P/conf/$NAME.json" /etc/imgstorage.conf || fail "no configuration for $NAME"

[ -f /run/imgstorage-boot.status ] || echo ok >/run/imgstorage-boot.status
step "ready: $(cat /run/imgstorage-boot.status)"
exec python3 "$P/agent.py" 10.0.2.15 7000
