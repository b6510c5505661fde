#!/bin/sh
# Streaming mapper: reads the split on stdin, writes `key<TAB>value` lines.
# Emits (lower-cased word, 1) for every run of ASCII letters.
LC_ALL=C tr -cs 'A-Za-z' '\n' | LC_ALL=C tr 'A-Z' 'a-z' | awk 'NF { print $0 "\t1" }'
