"""The application: image-folder I/O, tiling, `restore run` and the ``restore`` command line."""
