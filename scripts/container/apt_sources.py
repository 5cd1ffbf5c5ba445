#!/usr/bin/env python3
"""Prints the archive URI that this machine's apt sources use for one Debian suite.

Used by scripts/ci-container.sh to make its base-image stand-ins with debootstrap from the same mirror the
machine already uses, so that the repository names no host. Reads /etc/apt/sources.list and
/etc/apt/sources.list.d/ in both formats (one-line `deb URI SUITE COMPONENTS...` and deb822 `.sources`
paragraphs), considers `deb` entries only (not `deb-src`), skips disabled deb822 paragraphs, and prints the
first URI whose suites include the one asked for. Exit status 1, with a message, when none does.

Usage: apt_sources.py SUITE [SOURCES_DIR_ROOT]   e.g. apt_sources.py bookworm-security
"""

import glob
import os
import sys


def one_line_entries(path):
    for raw in open(path, encoding="utf-8", errors="replace"):
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield words[0], [words[1]]


def deb822_entries(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" not in fields.get("types", []):
            continue
        if [v.lower() for v in fields.get("enabled", ["yes"])] == ["no"]:
            continue
        for uri in fields.get("uris", []):
            yield uri, fields.get("suites", [])


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    suite = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) == 3 else "/"
    etc = os.path.join(root, "etc/apt")
    files = [os.path.join(etc, "sources.list")] + sorted(glob.glob(os.path.join(etc, "sources.list.d/*")))
    for path in files:
        if not os.path.isfile(path):
            continue
        entries = deb822_entries(path) if path.endswith(".sources") else one_line_entries(path)
        for uri, suites in entries:
            if suite in suites:
                print(uri.rstrip("/"))
                return 0
    print(f"no 'deb' entry for suite {suite!r} in {etc}/sources.list or sources.list.d/", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
