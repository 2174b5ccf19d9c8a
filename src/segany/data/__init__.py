"""Loading and writing data: images, masks and annotation formats."""
