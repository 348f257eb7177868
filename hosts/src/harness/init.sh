#!/bin/busybox sh
# Certo guest /init (busybox sh, in the initramfs). Mounts the image at /root, brings up the
# network from the certo.* kernel parameters, runs /bin/certo-harness, powers off.
# Everything goes to the serial console with a "certo-harness:" prefix.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "certo-harness: $*"; }

off() {
  sync
  for m in /root/proc/cmdline /root/sys/firmware/qemu_fw_cfg /root/dev /root/sys /root/proc /root; do
    grep -q " $m " /proc/mounts && umount "$m" 2>/dev/null
  done
  sync
  say "powering off"
  poweroff -f
  # Without ACPI power-off, reboot: on_reboot=destroy ends the domain too.
  sleep 2
  reboot -f
}

read -r up _ < /proc/uptime
say "init started (uptime ${up}s)"

for w in $(cat /proc/cmdline); do
  case $w in
    certo.ip=*) IP=${w#certo.ip=} ;;
    certo.gw=*) GW=${w#certo.gw=} ;;
    certo.panic=1) PANIC=1 ;;
  esac
done

if [ "${PANIC:-}" = 1 ]; then
  say "kernel panic requested (certo.panic=1)"
  echo 1 > /proc/sys/kernel/sysrq
  echo c > /proc/sysrq-trigger
fi

while read -r m; do
  insmod "/lib/modules/$m.ko" || say "error: insmod $m failed"
done < /etc/certo-modules

ip link set lo up
if [ -n "${IP:-}" ]; then
  for i in $(seq 1 50); do
    [ -e /sys/class/net/eth0 ] && break
    sleep 0.1
  done
  ip link set eth0 up && ip addr add "$IP" dev eth0 && { [ -z "${GW:-}" ] || ip route add default via "$GW"; } \
    || say "error: cannot configure eth0 with $IP via ${GW:-none}"
fi

# A failure before the harness can run is still reported: the harness posts "done error ...".
fatal() {
  say "error: $*"
  CERTO_FATAL="$*" /bin/certo-harness
  off
}

ROOTDEV=
for i in $(seq 1 100); do
  for d in /dev/vda /dev/xvda; do
    [ -b "$d" ] && ROOTDEV=$d && break 2
  done
  sleep 0.1
done
[ -n "$ROOTDEV" ] || fatal "no root disk (/dev/vda, /dev/xvda)"
mount -t ext4 -o rw "$ROOTDEV" /root || fatal "cannot mount $ROOTDEV (ext4) on /root"
mkdir -p /root/proc /root/sys /root/dev /root/tmp
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
mount -o bind /dev /root/dev

read -r up _ < /proc/uptime
say "root $ROOTDEV mounted, network ${IP:-none} (uptime ${up}s)"

/bin/certo-harness
say "harness exited with status $?"
off
