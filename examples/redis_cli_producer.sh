#!/usr/bin/env bash
# A producer without Python: bash + redis-cli drive one task through the shipped Lua script.
#
# It SCRIPT LOADs src/taskcast/lua/apply_change.lua once, then EVALSHAs one change document per
# step: create -> progress (in steps) -> complete (or fail with -e). Each reply is the task
# object after the change, printed as one JSON line; the script publishes each change, so SSE
# and WebSocket clients of a gateway on the same Redis see every step.
#
# Run it from the repository root (or anywhere, the default script path is found relative to
# this file):
#
#     examples/redis_cli_producer.sh                      # a new id from INCR taskcast:next_task_id
#     examples/redis_cli_producer.sh -h 127.0.0.1 -p 6379 -P taskcast -t 42
#     examples/redis_cli_producer.sh -t 43 -e "out of GPU memory"     # fail instead
#     examples/redis_cli_producer.sh -t 44 -f picture.png -u https://cdn.example/44.png
#
# Options (host/port/db as in redis-cli; a password comes from the REDISCLI_AUTH variable):
#   -h HOST      Redis host (default 127.0.0.1)
#   -p PORT      Redis port (default 6379)
#   -n DB        Redis database number (default 0)
#   -P PREFIX    key prefix P (default taskcast, as TASKCAST_PREFIX of the gateway)
#   -t TASK_ID   the task to create (default: the next id from INCR P:next_task_id)
#   -s SCRIPT    the Lua file (default: src/taskcast/lua/apply_change.lua of this repository)
#   -d SECONDS   pause between steps (default 0.5)
#   -u URL       image_url of the completed task (default https://cdn.example/<id>.png)
#   -f FILE      also send this image file (as image_base64; staged above 48 KiB)
#   -e MESSAGE   fail with this error_message instead of completing
#   -r SECONDS   retention of the finished task (default 86400, 0 = forever)
#
# Needs bash, redis-cli and base64 (coreutils). Exit status 0 when the task reached its final
# state, 1 when Redis refused a change (the REJECTED reason is printed) or was unreachable.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
host=127.0.0.1 port=6379 db=0 prefix=taskcast task_id="" delay=0.5
script="$here/../src/taskcast/lua/apply_change.lua"
image_url="" image_file="" error_message="" retention=86400

usage() { sed -n '/^# Options/,/^#$/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while getopts "h:p:n:P:t:s:d:u:f:e:r:" option; do
  case $option in
    h) host=$OPTARG ;;
    p) port=$OPTARG ;;
    n) db=$OPTARG ;;
    P) prefix=$OPTARG ;;
    t) task_id=$OPTARG ;;
    s) script=$OPTARG ;;
    d) delay=$OPTARG ;;
    u) image_url=$OPTARG ;;
    f) image_file=$OPTARG ;;
    e) error_message=$OPTARG ;;
    r) retention=$OPTARG ;;
    *) usage ;;
  esac
done

cli() { redis-cli -h "$host" -p "$port" -n "$db" "$@"; }

# JSON string: escape backslashes, quotes and control characters that the shell can carry.
json_string() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}; s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

[[ -r $script ]] || { echo "cannot read the Lua script $script" >&2; exit 1; }
[[ $retention =~ ^[0-9]+$ ]] || { echo "-r must be a whole number of seconds" >&2; exit 2; }

sha=$(cli SCRIPT LOAD "$(cat "$script")")
[[ $sha =~ ^[0-9a-f]{40}$ ]] || { echo "SCRIPT LOAD failed: $sha" >&2; exit 1; }

if [[ -z $task_id ]]; then
  task_id=$(cli INCR "$prefix:next_task_id")
fi
# Ids travel as decimal strings: Lua numbers are doubles and lose int64 precision.
[[ $task_id =~ ^[0-9]+$ ]] || { echo "bad task id: $task_id" >&2; exit 1; }
record="$prefix:task:{$task_id}"   # the braces are a Redis Cluster hash tag: keep them
channel="$record:events"

# One change: the document goes in through stdin (-x), so a large image_base64 is no problem
# for the argument list. A reply that is not a JSON object is an error (REJECTED <REASON> ...,
# or NOSCRIPT after a SCRIPT FLUSH or a failover: then load the script again and retry once).
change() {
  local document=$1 reply
  shift
  local keys=("$record" "$channel" "$@")  # a staged image adds its upload and image keys
  reply=$(printf '%s' "$document" | cli -x EVALSHA "$sha" "${#keys[@]}" "${keys[@]}" 2>&1) || true
  if [[ $reply == NOSCRIPT* ]]; then
    sha=$(cli SCRIPT LOAD "$(cat "$script")")
    reply=$(printf '%s' "$document" | cli -x EVALSHA "$sha" "${#keys[@]}" "${keys[@]}" 2>&1) || true
  fi
  if [[ $reply != "{"* ]]; then
    echo "change refused: $reply" >&2
    exit 1
  fi
  printf '%s\n' "$reply"
}

common="\"task_id\":\"$task_id\",\"retention_s\":$retention"
echo "task_id=$task_id"
change "{\"op\":\"create\",$common,\"type\":\"txt2img\",\"angle\":\"front\"}"

for progress in 20 40 60 80; do
  sleep "$delay"   # ... the real generation work goes here ...
  if [[ -n $error_message && $progress -gt 40 ]]; then
    break
  fi
  change "{\"op\":\"update\",$common,\"status\":\"processing\",\"progress\":$progress}"
done

sleep "$delay"
if [[ -n $error_message ]]; then
  change "{\"op\":\"update\",$common,\"status\":\"failed\",\"error_message\":$(json_string "$error_message")}"
else
  image="\"image_url\":$(json_string "${image_url:-https://cdn.example/$task_id.png}")"
  size=0
  [[ -n $image_file ]] && size=$(wc -c < "$image_file")
  if (( size > 49152 )); then
    # Above 64 KiB of base64, stage the raw bytes: every byte passed to a script costs Redis
    # time, while SET + the script's RENAME cost microseconds (README, "Large images").
    upload="$record:upload:$$$RANDOM"
    cli -x SET "$upload" < "$image_file" > /dev/null  # -x: stdin is the last argument
    cli PEXPIRE "$upload" 120000 > /dev/null           # left behind if the change is refused
    change "{\"op\":\"update\",$common,\"status\":\"completed\",$image,\"image_bytes\":$size}" \
      "$upload" "$record:image"
  else
    if [[ -n $image_file ]]; then
      # base64 without line breaks (GNU base64 wraps at 76 columns; macOS base64 does not).
      image+=",\"image_base64\":\"$(base64 < "$image_file" | tr -d '\n')\""
    fi
    change "{\"op\":\"update\",$common,\"status\":\"completed\",$image}"
  fi
fi
