"""``python -m metaopt``: the ``metaopt`` command, as torchrun starts it (``torchrun ... -m metaopt run CONFIG``)."""

from metaopt.cli import app

if __name__ == "__main__":
    app(prog_name="metaopt")
