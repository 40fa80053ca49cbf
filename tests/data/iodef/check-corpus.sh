#!/bin/sh
# Checks the IODEF corpus next to this script: every valid/ document and every
# redaction/ file passes the RFC 7970 schema (xmllint), valid documents stay
# under 4 KiB, and no corpus file carries a comment, processing instruction,
# XML declaration or DOCTYPE (RFC 6120 §11.1 forbids them in XMPP).
# Usage: check-corpus.sh [path/to/iodef-2.0.xsd]   (or set IODEF_XSD)
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
xsd=${1:-${IODEF_XSD:-$dir/../../../../shared/data/iodef/schema/iodef-2.0.xsd}}
status=0
for f in "$dir"/valid/*.xml "$dir"/redaction/*.xml; do
    if ! out=$(xmllint --nonet --noout --schema "$xsd" "$f" 2>&1); then
        echo "$out"
        status=1
    fi
done
for f in "$dir"/valid/*.xml; do
    if [ "$(wc -c <"$f")" -gt 4096 ]; then echo "$f: larger than 4 KiB"; status=1; fi
done
if grep -l -e '<!--' -e '<?' -e '<!DOCTYPE' "$dir"/valid/*.xml "$dir"/invalid/*.xml "$dir"/redaction/*.xml; then
    echo "the files above hold a comment, PI, XML declaration or DOCTYPE"
    status=1
fi
[ "$status" -eq 0 ] && echo "corpus OK: $(ls "$dir"/valid/*.xml | wc -l) valid, $(ls "$dir"/redaction/*.xml | wc -l) redaction files pass $xsd"
exit "$status"
