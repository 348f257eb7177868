#!/bin/sh
# Certo guest harness (busybox sh, run by /init with the image mounted at /root).
# Protocol (plain HTTP/1.0 over busybox nc; every request carries "Authorization: Bearer KEY"
# and "X-Certo-VM: NAME"; the server refuses a key presented with another VM's name):
#   POST URL/api/v1/guest/join     (empty)            -> "session KEY", "hostname N", "node_type T", "test SUITE GLOB"...
#   POST URL/api/v1/guest/service  "SVC PORT up|failed" (the host then looks at PORT from outside)
#   POST URL/api/v1/guest/result   "SUITE NAME pass|fail|error SECONDS" + output (last 16 KiB)
#   POST URL/api/v1/guest/log      the harness's log lines since the last post
#   POST URL/api/v1/guest/done     "ok" | "error MESSAGE"
# join takes the VM's token (fw_cfg or the kernel command line); every later call takes the
# session key join returned. Before any code of the image runs, the token is taken out of
# the image's sight (fw_cfg unloaded, the command line masked); the key lives only in this
# shell's memory: it is in no file, no environment and no command line (requests are
# written by the shell's printf into nc, so no process's argv holds it).
TEST_TIMEOUT=120
HTTP_TIMEOUT=60
W=/tmp/certo
mkdir -p $W

say() { echo "certo-harness: $*"; echo "$*" >> $W/harness.log; }
indent() { sed 's/^/certo-harness: | /'; }

for w in $(cat /proc/cmdline); do
  case $w in
    certo.url=*) URL=${w#certo.url=} ;;
    certo.vm=*) VM=${w#certo.vm=} ;;
    certo.token=*) TOKEN=${w#certo.token=} ;;
    certo.hang=1) HANG=1 ;;
    certo.crash=1) CRASH=1 ;;
  esac
done

# The token may travel in QEMU's fw_cfg instead of the command line (kept out of logs).
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/certo/token/raw
if [ "${TOKEN:-}" = fwcfg ]; then
  TOKEN=$(cat $FWCFG 2>/dev/null | tr -d '\n')
fi

# Out of the image's sight from now on: the fw_cfg device goes (the module is unloaded; if it
# cannot be, an empty mount covers it in the image's /sys), and the image's /proc/cmdline
# shows the command line without the token.
hide_token() {
  [ -d /sys/firmware/qemu_fw_cfg ] && rmmod qemu_fw_cfg 2>/dev/null
  if [ -d /root/sys/firmware/qemu_fw_cfg/by_name ]; then
    mount -t tmpfs -o size=4k,mode=0 certo-hidden /root/sys/firmware/qemu_fw_cfg \
      || say "warning: the fw_cfg device could not be hidden from the image"
  fi
  if [ -e /root/proc/cmdline ]; then
    { sed 's/certo\.token=[^ ]*/certo.token=hidden/' /proc/cmdline > $W/cmdline \
      && mount -o bind $W/cmdline /root/proc/cmdline; } \
      || say "warning: the kernel command line could not be masked in the image"
  fi
}
hide_token

if [ -z "${URL:-}" ] || [ -z "${TOKEN:-}" ]; then
  say "error: certo.url or certo.token missing from the kernel command line"
  exit 2
fi
case $URL in
  http://*) ;;
  *) say "error: certo.url must be an http:// URL: $URL"; exit 2 ;;
esac
HOSTPORT=${URL#http://}
PREFIX=
case $HOSTPORT in */*) PREFIX=/${HOSTPORT#*/}; PREFIX=${PREFIX%/}; HOSTPORT=${HOSTPORT%%/*} ;; esac
HOST=${HOSTPORT%:*}
PORT=${HOSTPORT##*:}
[ "$HOST" = "$HOSTPORT" ] && PORT=80
AUTH=$TOKEN

if [ "${HANG:-}" = 1 ]; then
  say "hanging on purpose (certo.hang=1)"
  while :; do sleep 3600; done
fi

ERRORS=
# post ENDPOINT BODYFILE: POST, response body in $W/resp; non-zero on failure (error on the
# console). A busy orchestrator (503: it refused the request before handling it) is tried
# again, up to 6 times over about 20 s: many guests report at once on a large testbed. Other
# failures are not (the request may have been handled). The request is written by
# printf (a shell builtin: no process shows the key).
post() {
  try=1
  while :; do
    post_once "$1" "$2" && return 0
    [ "${status:-}" = 503 ] || return 1
    [ "$try" -ge 6 ] && return 1
    say "POST /api/v1/guest/$1: trying again in $try s"
    sleep "$try"
    try=$((try + 1))
  done
}
post_once() {
  rm -f $W/resp $W/raw
  len=$(wc -c < "$2")
  {
    printf 'POST %s/api/v1/guest/%s HTTP/1.0\r\nHost: %s\r\nAuthorization: Bearer %s\r\nX-Certo-VM: %s\r\nContent-Type: text/plain\r\nContent-Length: %s\r\n\r\n' \
      "$PREFIX" "$1" "$HOSTPORT" "$AUTH" "${VM:-}" "$len"
    cat "$2"
  } | timeout $HTTP_TIMEOUT nc -w 10 "$HOST" "$PORT" > $W/raw 2> $W/nc.err
  status=$(head -n 1 $W/raw | awk '{ print $2 }')
  awk 'body { print; next } /^\r?$/ { body = 1 }' $W/raw > $W/resp
  case $status in
    2??) return 0 ;;
  esac
  say "error: POST /api/v1/guest/$1 failed: HTTP ${status:-none}: $(head -c 300 $W/resp | tr '\n' ' ')$(tr '\n' ' ' < $W/nc.err)"
  return 1
}
# report ENDPOINT TEXT
report() {
  printf '%s\n' "$2" > $W/body
  post "$1" $W/body && return 0
  ERRORS="$ERRORS $1"
  return 1
}
# The listening TCP sockets, one "PORT INODE" per line (the port in hex, as the kernel
# writes it): a service that takes over a port another one listened on (3506's top BDII
# stopping the BDII to take 2170) has a socket of its own, so its port counts as new.
listening() {
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    awk '$4 == "0A" { n = split($2, a, ":"); print a[n], $10 }' | sort -u
}
uptime_s() { read -r u _ < /proc/uptime; echo "$u"; }
# stream_log: POST the log lines written since the last call.
SENT=0
stream_log() {
  total=$(wc -l < $W/harness.log)
  [ "$total" -gt "$SENT" ] || return 0
  tail -n +$((SENT + 1)) $W/harness.log | head -n $((total - SENT)) > $W/logchunk
  post log $W/logchunk && SENT=$total
}

: > $W/empty
if [ -n "${CERTO_FATAL:-}" ]; then
  report done "error $CERTO_FATAL"
  exit 1
fi
say "joining $URL as ${VM:-?}"
if ! post join $W/empty; then
  say "error: join refused; powering off"
  exit 1
fi
NAME= NT= SESSION=
: > $W/tests
while read -r key a b; do
  case $key in
    session) SESSION=$a ;;
    hostname) NAME=$a ;;
    node_type) NT=$a ;;
    test) echo "$a $b" >> $W/tests ;;
  esac
done < $W/resp
rm -f $W/resp $W/raw
if [ -z "$SESSION" ]; then
  say "error: join answered no session key; powering off"
  exit 1
fi
# From now on the session key acts for this VM; the VM token is spent.
AUTH=$SESSION
TOKEN=
SESSION=
say "joined: hostname ${NAME:-?} node_type ${NT:-?} suites $(wc -l < $W/tests) (uptime $(uptime_s)s)"

if [ "${CRASH:-}" = 1 ]; then
  say "crashing on purpose after joining (certo.crash=1)"
  exit 70
fi

if [ -n "$NAME" ]; then
  hostname "$NAME"
  echo "$NAME" > /root/etc/hostname
fi

# The node type's services: every init script that runs something of /usr/libexec/glite/.
# RPM images also ship S60SVC copies (for busybox rcS): each service is started once.
for f in /root/etc/init.d/*; do
  [ -f "$f" ] || continue
  svc=${f##*/}
  grep -q /usr/libexec/glite/ "$f" || continue
  case $svc in
    S[0-9][0-9]*) [ -e "/root/etc/init.d/${svc#S[0-9][0-9]}" ] && continue ;;
  esac
  # A first line of its own: with nothing listening before, an empty first file would make
  # awk take the second one's lines for the first's (NR == FNR holds in both).
  { echo before; listening; } > $W/before
  if chroot /root /etc/init.d/$svc start < /dev/null > $W/svc.out 2>&1; then state=up; else state=failed; fi
  indent < $W/svc.out
  port=0
  if [ $state = up ]; then
    for i in $(seq 1 20); do
      listening > $W/after
      hex=$(awk 'NR == FNR { seen[$0] = 1; next } !($0 in seen) { print $1; exit }' $W/before $W/after)
      [ -n "$hex" ] && { port=$((0x$hex)); break; }
      sleep 0.1
    done
  fi
  say "service $svc $port $state"
  report service "$svc $port $state" && say "service $svc: $(head -c 300 $W/resp | tr '\n' ' ')"
done

# The test suites: GLOB is a path inside the image; scripts run in the image, sorted.
while read -r suite glob; do
  found=0
  for t in /root$glob; do
    [ -f "$t" ] || continue
    found=1
    rel=${t#/root}
    name=${rel##*/}
    name=${name%.sh}
    t0=$(uptime_s)
    timeout $TEST_TIMEOUT chroot /root /bin/sh "$rel" < /dev/null > $W/out 2>&1
    rc=$?
    t1=$(uptime_s)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    if [ $rc = 0 ]; then
      result=pass
    elif awk -v s="$secs" -v l=$TEST_TIMEOUT 'BEGIN { exit !(s >= l) }'; then
      result=error
      echo "certo-harness: timed out after ${TEST_TIMEOUT}s" >> $W/out
    elif [ $rc = 126 ] || [ $rc = 127 ]; then
      result=error
    else
      result=fail
    fi
    indent < $W/out
    say "result $suite $name $result $secs"
    { echo "$suite $name $result $secs"; tail -c 16384 $W/out; } > $W/body
    post result $W/body || ERRORS="$ERRORS result:$name"
    stream_log
  done
  [ $found = 1 ] || say "suite $suite: no test matches $glob"
done < $W/tests

say "all suites run"
stream_log
if [ -z "$ERRORS" ]; then
  report done ok
else
  report done "error cannot report:$ERRORS"
fi
say "done (uptime $(uptime_s)s)"
