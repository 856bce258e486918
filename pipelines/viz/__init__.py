"""Looking at the labels: overlays, contact sheets and an HTML report over the outputs of `ovsam-batch label`.

``reading`` scans the output tables (only the needed columns, bounded memory), ``overlay`` draws masks
over images, ``sheet`` lays overlays out in a grid, ``show`` and ``report`` are the two commands' logic.
"""
