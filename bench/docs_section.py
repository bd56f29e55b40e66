#!/usr/bin/env python3
"""Replaces the section of a markdown file that starts with the section text's first line
(`## title`) up to the next `## ` heading, or appends it; written atomically.
Usage: docs_section.py docs/benchmarks.md "$SECTION" """
import os, re, sys

path, section = sys.argv[1], sys.argv[2].rstrip() + "\n"
title = section.splitlines()[0]
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
m = re.search("^" + re.escape(title) + r"\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
if m:
    rest = text[m.end():]
    text = text[:m.start()] + section + ("\n" + rest if rest else "")
else:
    text = text.rstrip() + "\n\n" + section
open(path + ".tmp", "w").write(text)
os.replace(path + ".tmp", path)
