#!/usr/bin/env bash
# Controls a guest that images/boot.sh runs, from the host.
#
#   images/guest.sh --image IMG | [--monitor SOCKET] [--pidfile FILE] [--console FILE] [--test-console SOCKET]
#                   powerdown | link-down | link-up | kill | wait-console REGEX TIMEOUT | wait-boot TIMEOUT
#                   | exec [--timeout S] COMMAND...
#
# --image IMG takes boot.sh's defaults for IMG (IMG.qmp, IMG.qemu.pid, IMG.console.log, IMG.cmd);
# the other options name those files one by one, as boot.sh was given them.
#
#   powerdown      ACPI power button (QMP system_powerdown): systemd shuts the guest down and QEMU
#                  exits, so boot.sh ends with status 0.
#   link-down/up   unplugs and plugs the guest's network cable (QMP set_link net0 false/true).
#   kill           kill -9 of QEMU: a power cut (boot.sh ends with status 137).
#   wait-console REGEX TIMEOUT
#                  waits until a line of the serial console log matches the extended regex
#                  (Python re.search); prints that line; status 1 on timeout (seconds). The console
#                  is no proof of the end of the boot: systemd stops printing its status there
#                  once the serial getty holds the console, so a unit that starts later (Lichen's)
#                  can leave "Reached target multi-user.target" unprinted; use wait-boot.
#   wait-boot TIMEOUT
#                  waits (through the test console, which runs before the boot ends) until systemd
#                  has finished booting: prints the state; status 0 for "running", 1 otherwise
#                  ("degraded": a unit failed, listed), 124 past TIMEOUT seconds.
#   exec [--timeout S] COMMAND...
#                  runs COMMAND (one shell line: the words joined by spaces) as root in the guest
#                  through the test console of an image made with mkimage.sh --test-console;
#                  prints its output (stdout and stderr together) and exits with its status: 124
#                  when it ran past S seconds (default 60; killed with SIGTERM, 137 when SIGKILL was
#                  needed 5 s later) or when the guest did not answer within S + 5 seconds.
set -euo pipefail
PROG=guest.sh
# shellcheck source=images/board-lib.sh
. "$(dirname "$0")/board-lib.sh"
usage() { sed -n '4,6p' "$0" | sed 's/^# *//' >&2; exit 2; }

qmp='' pidfile='' console='' test_console=''
while (($#)); do
  case $1 in
    --image)
      [[ -n ${2:-} ]] || usage
      qmp=$(default_qmp "$2") pidfile=$(default_pidfile "$2") console=$(default_console "$2")
      test_console=$(default_test_console "$2")
      shift 2 ;;
    --monitor) qmp=${2:-}; shift 2 || usage ;;
    --pidfile) pidfile=${2:-}; shift 2 || usage ;;
    --console) console=${2:-}; shift 2 || usage ;;
    --test-console) test_console=${2:-}; shift 2 || usage ;;
    -h | --help) usage ;;
    -*) echo "images/guest.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
(($#)) || usage
need_tools "python3|python3|speaks QMP and the test console protocol"
action=$1
shift

# qmp COMMAND [JSON ARGUMENTS]: one QMP command; prints its return value.
qmp() {
  [[ -n $qmp ]] || die "no --monitor (or --image) to reach QEMU's QMP socket"
  [[ -S $qmp ]] || die "$qmp is not a socket: is boot.sh running?"
  python3 - "$qmp" "$@" <<'PY'
import json, socket, sys
path, command = sys.argv[1], sys.argv[2]
arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
f = s.makefile("rw")
def call(name, args=None):
    msg = {"execute": name}
    if args is not None:
        msg["arguments"] = args
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:  # events (a SHUTDOWN, a NIC_RX_FILTER_CHANGED) may come before the answer
        line = f.readline()
        if not line:
            sys.exit("QMP closed the connection")
        reply = json.loads(line)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            sys.exit("QMP %s: %s" % (name, reply["error"].get("desc", reply["error"])))
json.loads(f.readline())  # the greeting
call("qmp_capabilities")
print(json.dumps(call(command, arguments)))
PY
}

case $action in
  powerdown) qmp system_powerdown >/dev/null ;;
  link-down) qmp set_link '{"name": "net0", "up": false}' >/dev/null ;;
  link-up) qmp set_link '{"name": "net0", "up": true}' >/dev/null ;;
  kill)
    [[ -n $pidfile && -s $pidfile ]] || die "no QEMU pid file (${pidfile:-give --pidfile or --image}): is boot.sh running?"
    pid=$(tr -dc 0-9 <"$pidfile")
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == qemu-system-* ]] || die "process $pid of $pidfile is not QEMU"
    kill -9 "$pid"
    ;;
  wait-console)
    (($# == 2)) || usage
    [[ -n $console ]] || die "no --console (or --image) to read"
    python3 - "$console" "$1" "$2" <<'PY'
import os, re, sys, time
path, pattern, limit = sys.argv[1], re.compile(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
pos, pending = 0, b""
while True:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        data = b""
    if len(data) == 0 and os.path.exists(path) and os.path.getsize(path) < pos:
        pos, pending = 0, b""  # a new run rewrote the log
        continue
    pos += len(data)
    pending += data
    *lines, pending = pending.split(b"\n")
    for line in lines:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if pattern.search(text):
            print(text)
            sys.exit(0)
    if time.monotonic() >= deadline:
        sys.exit("images/guest.sh: no console line matched %r within %g s" % (sys.argv[2], limit))
    time.sleep(0.2)
PY
    ;;
  wait-boot)
    (($# == 1)) || usage
    [[ $1 =~ ^[1-9][0-9]*$ ]] || die "wait-boot TIMEOUT is in whole seconds"
    # The request waits in the port's buffer until the guest's test console opens it.
    # shellcheck disable=SC2016 # expanded by the guest's shell
    exec "$0" --test-console "$test_console" exec --timeout "$1" \
      's=$(systemctl is-system-running --wait); echo "$s"; [ "$s" = running ] || { systemctl --failed --no-pager; exit 1; }'
    ;;
  exec)
    limit=60
    if [[ ${1:-} == --timeout ]]; then limit=${2:-}; shift 2 || usage; fi
    [[ $limit =~ ^[1-9][0-9]*$ ]] || die "exec --timeout is in whole seconds"
    (($#)) || usage
    [[ -n $test_console ]] || die "no --test-console (or --image) socket"
    [[ -S $test_console ]] || die "$test_console is not a socket: is boot.sh running?"
    python3 - "$test_console" "$limit" "$*" <<'PY'
import base64, os, socket, sys, time
path, limit, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ident = os.urandom(6).hex()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
# The guest side polls for a host once a second and runs one command at a time; the deadline
# covers both, plus the answer's way back.
deadline = time.monotonic() + limit + 5
s.sendall(("%s %d %s\n" % (ident, limit, base64.b64encode(script.encode()).decode())).encode())
buf = b""
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        print("images/guest.sh: no answer from the guest's test console within %d s" % limit, file=sys.stderr)
        sys.exit(124)
    s.settimeout(left)
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        continue
    if not chunk:
        sys.exit("images/guest.sh: the test console closed (QEMU stopped?)")
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        parts = line.decode("ascii", "replace").strip().split(" ")
        if len(parts) >= 2 and parts[0] == ident:  # answers to an earlier, abandoned request are skipped
            sys.stdout.buffer.write(base64.b64decode(parts[2]) if len(parts) > 2 else b"")
            sys.stdout.flush()
            status = int(parts[1])
            sys.exit(status)
PY
    ;;
  *) echo "images/guest.sh: unknown command $action" >&2; usage ;;
esac
