"""Temporary builder for solutions/06 (removed before merge)."""

import sys

import nbformat

PATH = "solutions/06_intervening_on_features.ipynb"
nb = nbformat.read(PATH, as_version=4)
nb.cells = nb.cells[:3]
cells = []


def md(text, tags=()):
    c = nbformat.v4.new_markdown_cell(text.strip("\n"))
    if tags:
        c.metadata["tags"] = list(tags)
    cells.append(c)


def code(text, tags=()):
    c = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        c.metadata["tags"] = list(tags)
    cells.append(c)


exec(open(sys.argv[1]).read())
nb.cells += cells
nbformat.write(nb, PATH)
print(len(nb.cells), "cells")
