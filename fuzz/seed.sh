#!/usr/bin/env bash
# Seeds the fuzz corpora: patch_record with the fixture records (first byte: 0 text, 1 YAML,
# 2 JSON); wire with valid batches, queries and indexes made by the transfer crate's own
# encoders (examples/wire_seeds.rs; first byte: the decoder, see certo_fuzz::Route).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/patch_record
i=0
for f in ../fixtures/patches/valid/* ../fixtures/patches/invalid/*; do
  case $f in *.txt) b='\x00' ;; *.yaml) b='\x01' ;; *) b='\x02' ;; esac
  { printf "$b"; cat "$f"; } > "corpus/patch_record/seed$i"
  i=$((i + 1))
done
cargo run --quiet --example wire_seeds -- corpus/wire
