"""The flamebook Jupyter kernel: IPython, with flame pools made native."""
