"""One module per family: what is its own of the pipeline (pipeline.py holds the shared loop)."""
