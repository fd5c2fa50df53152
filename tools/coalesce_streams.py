"""Merge consecutive stream outputs of each cell and apply carriage returns as a terminal would.

Progress bars (tqdm) redraw with "\\r"; a headless run stores every redraw as its own output, which
GitHub shows as hundreds of lines. This keeps only what a terminal would finally show. It changes no
other output. Used on the committed notebook after its clean papermill run:

    python tools/coalesce_streams.py liver_segmentation.ipynb
"""

from __future__ import annotations

import re
import sys

import nbformat


def collapse(text: str) -> str:
    """Render text as a terminal would: "\r" returns to the line start, "ESC[A" moves up a line.

    tqdm rewrites a whole line after each "\r", and draws nested bars one line lower, moving back
    up with "ESC[A"; the final screen is what a reader of a terminal would see.
    """
    rows, row = [""], 0
    for token in re.split(r"(\r|\n|\x1b\[[0-9;]*[A-Za-z])", text):
        if token == "\r":
            rows[row] = ""
        elif token == "\n":
            row += 1
            if row == len(rows):
                rows.append("")
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
        else:
            rows[row] += token
    kept = [r.rstrip() for r in rows if r.strip()]
    return "\n".join(kept) + ("\n" if kept else "")


def coalesce(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge adjacent stream outputs with the same name, then collapse carriage returns."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream" and ("\r" in out.text or "\x1b[" in out.text):
                out.text = collapse(out.text)
        cell.outputs = [o for o in merged if not (o.output_type == "stream" and not o.text.strip())]
    return nb


if __name__ == "__main__":
    for path in sys.argv[1:]:
        nb = nbformat.read(path, as_version=4)
        nbformat.write(coalesce(nb), path)
