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
