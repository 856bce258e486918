"""Looking at the labels: overlays, contact sheets and an HTML report over the outputs of `ovsam-batch label`.

``reading`` scans the output tables (only the needed columns, bounded memory, hashed samples),
``overlay`` draws masks over images, ``sheet`` lays overlays out in a grid, ``page`` holds the HTML
building blocks (tables, inline SVG charts), and ``show`` and ``report`` are the two commands' logic.
"""
