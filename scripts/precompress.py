"""Writes a gzip sibling (`name.css.gz`) next to each text asset of a collectstatic
directory, for Strata's load balancer to send to clients that accept gzip. Siblings that
would not be smaller are not written; up-to-date ones are kept.

Usage: python scripts/precompress.py STATIC_ROOT
"""

import gzip
import sys
from pathlib import Path

TEXT = {".css", ".js", ".mjs", ".svg", ".json", ".map", ".txt", ".html", ".xml"}


def main(root):
    for path in Path(root).rglob("*"):
        if not path.is_file() or path.suffix not in TEXT:
            continue
        sibling = path.with_name(path.name + ".gz")
        if sibling.exists() and sibling.stat().st_mtime >= path.stat().st_mtime:
            continue
        data = path.read_bytes()
        packed = gzip.compress(data, compresslevel=9, mtime=0)
        if len(packed) < len(data):
            sibling.write_bytes(packed)


if __name__ == "__main__":
    main(sys.argv[1])
