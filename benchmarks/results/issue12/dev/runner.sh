#!/bin/bash
# Sequential queue: each line of queue.txt "variant seed [tag]"; processed in order, one at a time.
cd /work/wt12
i=0
while true; do
  line=$(sed -n "$((i+1))p" /tmp/dev12/queue.txt)
  if [ -z "$line" ]; then
    [ -e /tmp/dev12/STOP ] && exit 0
    sleep 5; continue
  fi
  i=$((i+1))
  [ "$line" = "STOP" ] && exit 0
  set -- $line
  echo "$(date -u +%T) start $line" >> /tmp/dev12/runner.log
  PYTHONPATH=/work/wt12 nice -n 10 /work/main/.venv/bin/python $(dirname $0)/screen.py $line > /tmp/dev12/logs/$1-$2$3.log 2>&1
  echo "$(date -u +%T) end $line rc=$?" >> /tmp/dev12/runner.log
done
