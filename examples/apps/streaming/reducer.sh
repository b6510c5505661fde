#!/bin/sh
# Streaming reducer: reads all of the task's `key<TAB>value` lines, sorted by key, on stdin;
# writes `key<TAB>value` lines (each becomes `key value` in mr-out-<r>).
# Sums the values of each run of equal keys (input is sorted, so one pass suffices).
awk -F '\t' '
  $1 != key { if (NR > 1) print key "\t" sum; key = $1; sum = 0 }
  { sum += $2 }
  END { if (NR > 0) print key "\t" sum }
'
