"""Running seal beyond one process: trials on Ray (``ray_runner``)."""
