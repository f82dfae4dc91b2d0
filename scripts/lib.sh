#!/usr/bin/env bash
# Helpers shared by deploy.sh and the scripts in scripts/. Source it.

# Installs the Debian packages named if the command $1 is missing:
#   need_command redis-server redis-server redis-tools
need_command() {
  local cmd=$1
  shift
  if command -v "$cmd" >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $cmd is missing; install it (Debian package: $*)" >&2
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "error: $cmd is missing; run as root or: apt-get install -y $*" >&2
      return 1
    fi
  fi
  echo "installing $* (for $cmd)..." >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
}

# Installs redis-server and redis-cli if missing.
need_redis() {
  need_command redis-server redis-server redis-tools
  need_command redis-cli redis-tools
}

# True if something listens on 127.0.0.1:$1.
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits up to $2 seconds (default 30) for URL $1 to answer 200.
wait_http() {
  local url=$1 deadline=$((SECONDS + ${2:-30}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  echo "error: $url did not answer within ${2:-30} s" >&2
  return 1
}

# Prints $1 distinct free loopback ports on one line, separated by spaces:
#   read -r kv_port api_port < <(free_ports 2)
# Each is below the kernel's ephemeral range (32768 and up), so no outgoing
# connection holds it, and none is a default (6379 6380 8080 9091) that
# others' stacks use. One call for all of them: ports picked in separate
# $(...) subshells could not see each other, and could repeat.
free_ports() {
  local taken=" 6379 6380 8080 9091 " ports=() port
  while [ "${#ports[@]}" -lt "$1" ]; do
    port=$((20000 + RANDOM % 12000))
    case "$taken" in *" $port "*) continue ;; esac
    taken+="$port "
    port_in_use "$port" || ports+=("$port")
  done
  echo "${ports[*]}"
}

# Waits until `./deploy.sh --local` (process $2, its output in the file $1,
# which may not exist yet) prints "kvq is running". Fails, showing that
# output prefixed by "$3:", if the process exits first or 15 minutes pass (a
# first run builds the release binaries).
# Stops the `./deploy.sh --local` of pid $1 as Ctrl-C would, and checks that
# it exited within 30 s and freed the KVQ_LOCAL_*_PORT ports; $2 names the
# caller in messages.
stop_local_stack() {
  local pid=$1 who=$2 port
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$who: deploy.sh did not stop on Ctrl-C" >&2
    return 1
  fi
  wait "$pid" 2>/dev/null || true
  for port in "$KVQ_LOCAL_KV_PORT" "$KVQ_LOCAL_QUEUE_PORT" "$KVQ_LOCAL_API_PORT" "$KVQ_LOCAL_WORKER_HEALTH_PORT"; do
    if port_in_use "$port"; then
      echo "$who: port $port is still in use after the stack stopped" >&2
      return 1
    fi
  done
}

wait_local_stack() {
  local out=$1 pid=$2 who=$3 deadline=$((SECONDS + 900))
  until grep -qs "kvq is running" "$out"; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      echo "$who: deploy.sh --local did not come up:" >&2
      cat "$out" >&2
      return 1
    fi
    sleep 0.5
  done
}
