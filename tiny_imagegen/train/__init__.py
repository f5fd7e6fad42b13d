"""Training a tiny model with this package's own code.

shapes_dataset.py  a procedural captioned dataset of coloured shapes (Pillow, seeded, no files)
scene_parser.py    reads an image back into objects and scores it against its caption
"""
