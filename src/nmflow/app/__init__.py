"""The ``nmflow`` command: train, sweep and report. Needs the ``train`` extra (``pip install "nmflow[train]"``)."""
