"""Pieces several task families share (image decoding, augmentation from config).

Tasks never import each other; what two of them need lives here or in `podium.engine`.
"""
